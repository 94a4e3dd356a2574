"""Google ADK: guard the agent's FunctionTool objects as they are.

A scripted model (a custom ADK BaseLlm, no network, no API key) asks for the
same refund twice in one turn and again in the next, the way a model retries,
and the same script runs for two users. Each user's refund runs once: the
ToolContext ADK injects says who calls (its app and user), and its session and
invocation do not count. Run: python examples/google_adk_agent.py
"""

import asyncio
from typing import AsyncGenerator

from google.adk.agents import LlmAgent
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.adk.runners import InMemoryRunner
from google.adk.tools import FunctionTool, ToolContext
from google.genai import types

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
REFUNDS: list[str] = []


def refund(order_id: int, amount: float, tool_context: ToolContext) -> str:
    """Refund an order to the customer's card."""
    REFUNDS.append(f"{tool_context.user_id}: order {order_id}, {amount}")
    return f"refunded {amount} on order {order_id}"


class ScriptedLlm(BaseLlm):
    """Plays back turns: a list of (tool, arguments) calls, or the final answer."""

    model: str = "scripted"
    turns: list

    async def generate_content_async(self, llm_request: LlmRequest,
                                     stream: bool = False) -> AsyncGenerator[LlmResponse, None]:
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            parts = [types.Part(text=turn)]
        else:
            parts = [types.Part(function_call=types.FunctionCall(id=f"call_{len(self.turns)}_{i}", name=name,
                                                                 args=arguments))
                     for i, (name, arguments) in enumerate(turn)]
        yield LlmResponse(content=types.Content(role="model", parts=parts),
                          usage_metadata=types.GenerateContentResponseUsageMetadata(prompt_token_count=0,
                                                                                   candidates_token_count=0))


async def run(tools: list, turns: list, user: str) -> list:
    """The tool results of one run of a new agent for `user`, in a new session."""
    agent = LlmAgent(name="support", model=ScriptedLlm(turns=list(turns)), tools=tools,
                     instruction="Refund what is asked.")
    runner = InMemoryRunner(agent=agent, app_name="shop")
    session = await runner.session_service.create_session(app_name="shop", user_id=user)
    results = []
    async for event in runner.run_async(user_id=user, session_id=session.id,
                                        new_message=types.Content(role="user", parts=[types.Part(text="go")])):
        results += [part.function_response.response["result"] for part in event.content.parts or []
                    if part.function_response] if event.content else []
    return results


async def main() -> None:
    tools = guard.wrap_tools([FunctionTool(refund)], blocked_return="already done: this refund ran before")
    script = [
        [("refund", {"order_id": 42, "amount": 30.0})] * 2,   # a duplicate in one turn
        [("refund", {"amount": 30.0, "order_id": 42})],       # and a retry
        "Refund is done.",
    ]
    for user in ("ada", "bob"):
        print(f"{user}: tool results {sorted(await run(tools, script, user))}")
    print("refunds that ran, one for each user:", REFUNDS)
    print("{executed} refunds ran; {blocked} duplicates were blocked".format_map(guard.stats()))


if __name__ == "__main__":
    asyncio.run(main())
