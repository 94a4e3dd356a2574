"""LlamaIndex: guard the agent's FunctionTool objects (or a ToolSpec) as they are.

A scripted model (LlamaIndex's MockFunctionCallingLLM with a response generator,
no network, no API key) asks to cancel the same order twice in one turn and
again in the next, the way a model retries. The order is cancelled once; the
agent reads "already cancelled" for the duplicates. The workflow Context the
agent injects is passed on and does not count: scope each user with
guard.workflow(...).
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
CANCELLED: list[str] = []


async def cancel_order(ctx: Context, order_id: int, reason: str = "not given") -> str:
    """Cancel an order that has not shipped, and tell the warehouse to stop it."""
    CANCELLED.append(f"order {order_id} ({reason})")
    return f"cancelled order {order_id}"


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
    tools = guard.wrap_tools([FunctionTool.from_defaults(cancel_order)],
                             blocked_return="already cancelled: the warehouse was told before")
    cancel = {"order_id": 17, "reason": "ordered twice"}
    script = [
        [("cancel_order", cancel)] * 2,                        # a duplicate in one turn
        [("cancel_order", dict(reversed(cancel.items())))],    # and a retry, arguments in another order
        "Order 17 is cancelled.",
    ]
    agent = FunctionAgent(tools=tools, llm=scripted_llm(script), system_prompt="Cancel the orders asked for.")
    results = await run(agent, "Please cancel order 17, I ordered it twice.")
    print("the agent read:", *sorted(results), sep="\n  ")
    print(f"orders cancelled: {CANCELLED}")
    print("{executed} cancellation ran; {blocked} repeats were blocked".format_map(guard.stats()))


if __name__ == "__main__":
    asyncio.run(main())
