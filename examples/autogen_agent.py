"""AutoGen (autogen-agentchat): guard the agent's FunctionTool objects as they are.

A scripted model (AutoGen's ReplayChatCompletionClient, no network, no API key)
asks for the same refund twice in one turn and again in the next, the way a
model retries. The refund runs once; the agent reads "already done" for the
duplicates. The CancellationToken AutoGen passes is not part of a call's
identity; scope each user with guard.workflow(...). Run: python examples/autogen_agent.py
"""

import asyncio
import json
import logging

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import EVENT_LOGGER_NAME, CancellationToken, FunctionCall
from autogen_core.models import CreateResult, RequestUsage
from autogen_core.tools import FunctionTool
from autogen_ext.models.replay import ReplayChatCompletionClient

from ledger import Guard

logging.getLogger(EVENT_LOGGER_NAME).setLevel(logging.ERROR)  # the replay client warns on every token count
guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[str] = []


async def refund(order_id: int, amount: float, cancellation_token: CancellationToken) -> str:
    """Refund an order to the customer's card."""
    REFUNDS.append(f"order {order_id}: {amount}")
    return f"refunded {amount} on order {order_id}"


def scripted_client(turns: list) -> ReplayChatCompletionClient:
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""
    results = []
    for n, turn in enumerate(turns):
        if isinstance(turn, str):
            results.append(turn)
            continue
        calls = [FunctionCall(id=f"call_{n}_{i}", name=name, arguments=json.dumps(arguments))
                 for i, (name, arguments) in enumerate(turn)]
        results.append(CreateResult(finish_reason="function_calls", content=calls,
                                    usage=RequestUsage(prompt_tokens=0, completion_tokens=0), cached=False))
    return ReplayChatCompletionClient(results, model_info={
        "vision": False, "function_calling": True, "json_output": False, "family": "unknown",
        "structured_output": False})


async def run(agent: AssistantAgent, task: str) -> list[str]:
    """The tool results of one agent run."""
    result = await agent.run(task=task)
    return [r.content for m in result.messages if isinstance(m, ToolCallExecutionEvent) for r in m.content]


async def main() -> None:
    tools = guard.wrap_tools([FunctionTool(refund, description="Refund an order.")],
                             blocked_return="already done: this refund ran before")
    script = [
        [("refund", {"order_id": 42, "amount": 30.0})] * 2,   # a duplicate in one turn
        [("refund", {"amount": 30.0, "order_id": 42})],       # and a retry
        "Refund is done.",
    ]
    agent = AssistantAgent("support", model_client=scripted_client(script), tools=tools, max_tool_iterations=3)
    for result in sorted(await run(agent, "Refund order 42.")):
        print("tool result:", result)
    print("refunds that ran:", REFUNDS)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    asyncio.run(main())
