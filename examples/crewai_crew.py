"""CrewAI: guard the agent's tools (from @tool, or BaseTool subclasses) as they are.

A scripted model (a custom CrewAI BaseLLM, no network, no API key) answers in
CrewAI's own Thought / Action / Observation format. The crew refunds an order,
then the whole crew is run again, as after a crash: the refund does not run a
second time, and the agent reads "already done". CrewAI injects nothing into a
tool: scope each user with guard.workflow(...). Run: python examples/crewai_crew.py
"""

import json
import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # no telemetry export: this example stays offline
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from crewai import Agent, Crew, Task  # noqa: E402 - after the telemetry switches
from crewai.llms.base_llm import BaseLLM  # noqa: E402
from crewai.tools import tool  # noqa: E402

from ledger import Guard  # noqa: E402

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[str] = []


@tool("refund")
def refund(order_id: int, amount: float) -> str:
    """Refund an order to the customer's card."""
    REFUNDS.append(f"order {order_id}: {amount}")
    return f"refunded {amount} on order {order_id}"


class ScriptedLLM(BaseLLM):
    """Plays back turns in CrewAI's text format: (tool, arguments) for an action, or the final
    answer; keeps the observations (tool results) the crew shows it."""

    def __init__(self, turns: list) -> None:
        super().__init__(model="scripted")
        self._turns = list(turns)
        self.observations: list[str] = []

    def call(self, messages, *args, **kwargs) -> str:
        last = messages[-2]["content"] if isinstance(messages, list) and len(messages) > 1 else ""
        if messages[-2]["role"] == "assistant" and "\nObservation: " in last:
            self.observations.append(last.rpartition("\nObservation: ")[2].strip())
        turn = self._turns.pop(0)
        if isinstance(turn, str):
            return f"Thought: I have what I need.\nFinal Answer: {turn}"
        name, arguments = turn
        return f"Thought: I should call {name}.\nAction: {name}\nAction Input: {json.dumps(arguments)}"

    def supports_function_calling(self) -> bool:
        return False  # the text format above, not native tool calls


def run(tools: list, turns: list) -> list[str]:
    """The tool results of one crew run (a new crew, as a retry after a crash makes)."""
    llm = ScriptedLLM(turns)
    agent = Agent(role="support", goal="Refund what is asked.", backstory="A careful agent.", llm=llm,
                  tools=tools, cache=False)  # CrewAI's own cache lives as long as the crew; the ledger outlives it
    task = Task(description="Refund order 42.", expected_output="A short confirmation.", agent=agent)
    Crew(agents=[agent], tasks=[task]).kickoff()
    return llm.observations


def main() -> None:
    tools = guard.wrap_tools([refund], blocked_return="already done: this refund ran before")
    script = [("refund", {"order_id": 42, "amount": 30.0}), "Refund is done."]
    for attempt in (1, 2):
        print(f"crew run {attempt}: tool results {run(tools, script)}")
    print("refunds that ran:", REFUNDS)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    main()
