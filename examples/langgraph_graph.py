"""LangGraph: guard the tools a ToolNode runs, and a plain node function.

The graph charges an order (a plain node), then lets a model send the
confirmation through a ToolNode. A scripted model (langchain_core's
FakeMessagesListChatModel: no network, no API key) asks for the confirmation
twice in one turn, and the whole graph is run a second time for the same order,
as a job queue does when it redelivers a job. The card is charged once (the
second run gets the recorded receipt) and one confirmation is sent.
Run: python examples/langgraph_graph.py
"""

from typing import Annotated

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedState, ToolNode
from typing_extensions import TypedDict  # what MessagesState is built on

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
CHARGED: list[int] = []
SENT: list[str] = []


class Order(TypedDict):
    order_id: int
    amount: float


class State(MessagesState, Order):
    receipt: str


def charge_card(order: Order) -> dict:
    """A plain node: LangGraph hands it only the Order keys of the state."""
    CHARGED.append(order["order_id"])
    return {"receipt": f"ch_{order['order_id']}"}


@tool
def send_confirmation(order_id: int, state: Annotated[dict, InjectedState]) -> str:
    """Email the customer that their order is paid."""
    SENT.append(f"order {order_id}, receipt {state['receipt']}")
    return "sent"


def call(name: str, n: int, **args) -> dict:
    return {"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}


model = FakeMessagesListChatModel(responses=[
    AIMessage("", tool_calls=[call("send_confirmation", 1, order_id=7),
                              call("send_confirmation", 2, order_id=7)]),   # a duplicate in one turn
    AIMessage("Order 7 is paid and confirmed."),
    AIMessage("", tool_calls=[call("send_confirmation", 3, order_id=7)]),  # the redelivered job
    AIMessage("Order 7 is paid and confirmed."),
])


def agent(state: State) -> dict:
    return {"messages": [model.invoke(state["messages"])]}


def next_step(state: State) -> str:
    return "tools" if state["messages"][-1].tool_calls else END


guard.policy(charge_card, replay=True)  # a repeated run gets the recorded receipt back
[charge_node] = guard.wrap_tools([charge_card])
tools = guard.wrap_tools([send_confirmation], blocked_return="already sent")

graph = StateGraph(State)
graph.add_node("charge_card", charge_node)
graph.add_node("agent", agent)
graph.add_node("tools", ToolNode(tools))
graph.add_edge(START, "charge_card")
graph.add_edge("charge_card", "agent")
graph.add_conditional_edges("agent", next_step, ["tools", END])
graph.add_edge("tools", "agent")
app = graph.compile()

if __name__ == "__main__":
    for run in (1, 2):
        final = app.invoke({"messages": [HumanMessage("Charge order 7")], "order_id": 7, "amount": 25.0})
        replies = [m.content for m in final["messages"] if m.type == "tool"]
        print(f"run {run}: receipt {final['receipt']}, tool replies {replies}")
    print("charged:", CHARGED)
    print("confirmations sent:", SENT)
