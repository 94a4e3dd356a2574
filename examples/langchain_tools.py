"""LangChain: guard StructuredTool objects (sync and async) as they are.

A scripted chat model (langchain_core's GenericFakeChatModel: no network, no
API key) asks to send the same invoice twice in one turn and retries a refund
in the next; a small tool-calling loop runs what it asks for. Each side effect
happens once; the duplicates get "already done". Run: python examples/langchain_tools.py
"""

import asyncio

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
SIDE_EFFECTS: list[str] = []


@tool
def send_invoice(customer: str, amount: float) -> str:
    """Email an invoice to a customer."""
    SIDE_EFFECTS.append(f"invoice {customer} {amount}")
    return f"invoice for {amount} sent to {customer}"


@tool
async def refund(order_id: int) -> str:
    """Refund an order."""
    SIDE_EFFECTS.append(f"refund {order_id}")
    return f"order {order_id} refunded"


def call(name: str, n: int, **args) -> dict:
    return {"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}


model = GenericFakeChatModel(messages=iter([
    AIMessage("", tool_calls=[call("send_invoice", 1, customer="acme", amount=120.0),
                              call("send_invoice", 2, amount=120.0, customer="acme")]),
    AIMessage("", tool_calls=[call("refund", 3, order_id=9)]),
    AIMessage("", tool_calls=[call("refund", 4, order_id=9)]),   # the model retries
    AIMessage("All done."),
]))


async def main() -> None:
    tools = guard.wrap_tools([send_invoice, refund], blocked_return="already done")
    by_name = {t.name: t for t in tools}
    messages = [HumanMessage("Invoice acme for 120 and refund order 9.")]
    while True:
        reply = await model.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for tool_call in reply.tool_calls:
            result: ToolMessage = await by_name[tool_call["name"]].ainvoke(tool_call)
            print(f"{tool_call['name']}({tool_call['args']}) -> {result.content}")
            messages.append(result)
    print("side effects:", SIDE_EFFECTS)
    print("model:", messages[-1].content)


if __name__ == "__main__":
    asyncio.run(main())
