"""OpenAI Agents SDK: guard the agent's FunctionTool objects as they are.

A scripted model (a custom agents `Model`, no network, no API key) asks for the
same refund three times, the way a model does when it retries after a timeout,
and once for another order. The refund runs once per order; the agent sees
"already done" for the duplicates. Run: python examples/openai_agents_sdk.py
"""

import asyncio
import json

from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[int] = []


@function_tool
def refund(order_id: int, amount: float) -> str:
    """Refund an order to the customer's card."""
    REFUNDS.append(order_id)
    return f"refunded {amount} on order {order_id}"


class ScriptedModel(Model):
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""

    def __init__(self, turns: list) -> None:
        self.turns = list(turns)

    async def get_response(self, *args, **kwargs) -> ModelResponse:
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            output = [ResponseOutputMessage(
                id="msg_1", type="message", role="assistant", status="completed",
                content=[ResponseOutputText(type="output_text", text=turn, annotations=[])])]
        else:
            output = [ResponseFunctionToolCall(type="function_call", call_id=f"call_{id(turn)}_{i}",
                                               name=name, arguments=json.dumps(arguments))
                      for i, (name, arguments) in enumerate(turn)]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    async def stream_response(self, *args, **kwargs):
        raise NotImplementedError("this example does not stream")
        yield


async def main() -> None:
    set_tracing_disabled(True)  # no trace export: this example stays offline
    tools = guard.wrap_tools([refund], blocked_return="already done: this refund ran before")
    script = [
        [("refund", {"order_id": 42, "amount": 30.0})],
        [("refund", {"order_id": 42, "amount": 30.0}),   # a retry, and a duplicate in one turn
         ("refund", {"amount": 30.0, "order_id": 42})],
        [("refund", {"order_id": 43, "amount": 12.5})],
        "Refunds are done.",
    ]
    agent = Agent(name="support", instructions="Refund what the customer asks.", tools=tools)
    result = await Runner.run(agent, "Refund order 42, and 43 too.",
                              run_config=RunConfig(model=ScriptedModel(script)))
    for item in result.new_items:
        if item.type == "tool_call_output_item":
            print("tool result:", item.output)
    print("refunds that ran:", REFUNDS)
    print("final answer:", result.final_output)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    asyncio.run(main())
