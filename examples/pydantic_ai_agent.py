"""Pydantic AI: guard the agent's tools (a FunctionToolset, or Tool objects) as they are.

A scripted model (Pydantic AI's FunctionModel, no network, no API key) asks to
text the customer twice in one turn, the way a model repeats itself, and the same
script runs for two users. Each user gets one text: the RunContext's deps say
who calls (their plain fields count, the SMS gateway client in them does not).
Run: python examples/pydantic_ai_agent.py
"""

from dataclasses import dataclass

from pydantic_ai import Agent, FunctionToolset, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind


class SmsGateway:
    """Stands in for an HTTP client: it has no canonical form, so it does not count."""

    def __init__(self) -> None:
        self.sent: list[str] = []


@dataclass
class Deps:
    user_id: str
    gateway: SmsGateway


toolset = FunctionToolset()


@toolset.tool
def text_customer(ctx: RunContext[Deps], message: str) -> str:
    """Send the customer a text message."""
    ctx.deps.gateway.sent.append(f"{ctx.deps.user_id}: {message}")
    return "texted"


def scripted_model(turns: list) -> FunctionModel:
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""
    turns = list(turns)

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = turns.pop(0)
        if isinstance(turn, str):
            return ModelResponse(parts=[TextPart(turn)])
        return ModelResponse(parts=[ToolCallPart(name, arguments, tool_call_id=f"call_{len(turns)}_{i}")
                                    for i, (name, arguments) in enumerate(turn)])
    return FunctionModel(respond)


def tool_results(result) -> list:
    return [part.content for message in result.all_messages() for part in message.parts
            if isinstance(part, ToolReturnPart)]


def main() -> None:
    guarded = guard.wrap_tools(toolset, blocked_return="already done: this text was sent before")
    gateway = SmsGateway()
    for user in ("ada", "bob"):
        script = [[("text_customer", {"message": "Your refund is on its way."})] * 2, "Told them."]
        agent = Agent(scripted_model(script), deps_type=Deps, toolsets=[guarded])
        result = agent.run_sync("Tell the customer about the refund.", deps=Deps(user, gateway))
        print(f"{user}: tool results {sorted(tool_results(result))}")  # the agent runs the two calls at once
    print("texts sent:", gateway.sent)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    main()
