"""LlamaIndex: guard the agent's FunctionTool objects (or a ToolSpec) as they are.

A scripted model (LlamaIndex's MockFunctionCallingLLM with a response generator,
no network, no API key) asks for the same refund twice in one turn and again in
the next, the way a model retries. The refund runs once; the agent reads
"already done" for the duplicates. The workflow Context the agent injects is
passed on and does not count: scope each user with guard.workflow(...).
Run: python examples/llama_index_agent.py
"""

import asyncio

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[str] = []


async def refund(ctx: Context, order_id: int, amount: float) -> str:
    """Refund an order to the customer's card."""
    REFUNDS.append(f"order {order_id}: {amount}")
    return f"refunded {amount} on order {order_id}"


def scripted_llm(turns: list) -> MockFunctionCallingLLM:
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""
    turns = list(turns)

    def respond(messages, **kwargs) -> ChatMessage:
        turn = turns.pop(0)
        if isinstance(turn, str):
            return ChatMessage(role=MessageRole.ASSISTANT, content=turn)
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            ToolCallBlock(tool_call_id=f"call_{len(turns)}_{i}", tool_name=name, tool_kwargs=arguments)
            for i, (name, arguments) in enumerate(turn)])
    return MockFunctionCallingLLM(response_generator=respond)


async def run(agent: FunctionAgent, request: str) -> list[str]:
    """The agent's tool results, in the order the tools finished."""
    handler = agent.run(request)
    results = [event.tool_output.content async for event in handler.stream_events()
               if isinstance(event, ToolCallResult)]
    await handler
    return results


async def main() -> None:
    tools = guard.wrap_tools([FunctionTool.from_defaults(refund)],
                             blocked_return="already done: this refund ran before")
    script = [
        [("refund", {"order_id": 42, "amount": 30.0})] * 2,   # a duplicate in one turn
        [("refund", {"amount": 30.0, "order_id": 42})],       # and a retry
        "Refund is done.",
    ]
    agent = FunctionAgent(tools=tools, llm=scripted_llm(script), system_prompt="Refund what is asked.")
    for result in sorted(await run(agent, "Refund order 42.")):
        print("tool result:", result)
    print("refunds that ran:", REFUNDS)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    asyncio.run(main())
