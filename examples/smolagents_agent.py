"""smolagents: guard the agent's Tool objects (from @tool or Tool subclasses) as they are.

A scripted model (a custom smolagents Model, no network, no API key) asks for
the same refund twice in one step and again in the next, the way a model
retries, then gives its final answer. The refund runs once; the agent reads
"already done" for the duplicates. smolagents injects nothing into a tool: scope
each user with guard.workflow(...). Run: python examples/smolagents_agent.py
"""

from smolagents import ToolCallingAgent, tool
from smolagents.models import ChatMessage, ChatMessageToolCall, ChatMessageToolCallFunction, Model

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[str] = []


@tool
def refund(order_id: int, amount: float) -> str:
    """Refund an order to the customer's card.

    Args:
        order_id: The order to refund.
        amount: How much to refund.
    """
    REFUNDS.append(f"order {order_id}: {amount}")
    return f"refunded {amount} on order {order_id}"


class ScriptedModel(Model):
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""

    def __init__(self, turns: list) -> None:
        super().__init__(model_id="scripted")
        self.turns = list(turns)

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None,
                 **kwargs) -> ChatMessage:
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            turn = [("final_answer", {"answer": turn})]
        calls = [ChatMessageToolCall(ChatMessageToolCallFunction(arguments, name), f"call_{len(self.turns)}_{i}",
                                     "function")
                 for i, (name, arguments) in enumerate(turn)]
        return ChatMessage(role="assistant", content="", tool_calls=calls)


def tool_results(agent: ToolCallingAgent) -> list[str]:
    """What the tool calls of the run returned, a line each (the final answer left out)."""
    return [line for step in agent.memory.steps if getattr(step, "tool_calls", None)
            and step.tool_calls[0].name != "final_answer" for line in step.observations.splitlines()]


def main() -> None:
    tools = guard.wrap_tools([refund], blocked_return="already done: this refund ran before")
    script = [
        [("refund", {"order_id": 42, "amount": 30.0})] * 2,   # a duplicate in one step
        [("refund", {"amount": 30.0, "order_id": 42})],       # and a retry
        "Refund is done.",
    ]
    agent = ToolCallingAgent(tools=tools, model=ScriptedModel(script), verbosity_level=0)
    answer = agent.run("Refund order 42.")
    for result in sorted(tool_results(agent)):
        print("tool result:", result)
    print("refunds that ran:", REFUNDS)
    print("final answer:", answer)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    main()
