"""Standalone FastMCP (the `fastmcp` package): guard a server's tools where they are declared.

`@guard.once` goes above `@mcp.tool`: fastmcp registers the function and hands it
back, and the guard finds that registration and guards the server's tool in
place. An in-memory client (no network, no subprocess) retries a refund the way a
client does after a dropped connection, and two signed-in users ask for the same
refund: each user's refund runs once. Nothing here writes to stdout but the
example's own report, which keeps a stdio server's channel clean.
Run: python examples/fastmcp_server.py
"""

import asyncio

from fastmcp import Client, Context, FastMCP
from fastmcp.server.dependencies import get_access_token
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken

from ledger import Guard

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
mcp = FastMCP("billing")
REFUNDS: list[str] = []


@guard.once  # above @mcp.tool: guards the tool the server registered
@mcp.tool
def refund(order_id: int, ctx: Context) -> str:
    """Refund an order to the signed-in customer."""
    REFUNDS.append(f"order {order_id} for {get_access_token().client_id}")
    return f"refunded order {order_id}"


@mcp.tool
@guard.once(replay=True)  # below works too; replay=True: a repeat gets the recorded answer
def order_status(order_id: int) -> str:
    """Look up an order (the answer is shared by repeats)."""
    return f"order {order_id}: shipped"


def sign_in(client_id: str) -> None:
    """What the server's auth middleware does once it checked a bearer token; the signed-in
    caller is part of a call's identity, so two users' identical requests both run."""
    auth_context_var.set(AuthenticatedUser(AccessToken(token="token", client_id=client_id, scopes=[])))


async def main() -> None:
    for user, calls in [("alice", [("refund", {"order_id": 7}), ("refund", {"order_id": 7}),  # a retry
                                   ("order_status", {"order_id": 7}), ("order_status", {"order_id": 7})]),
                        ("bob", [("refund", {"order_id": 7})])]:
        sign_in(user)
        async with Client(mcp) as client:
            for name, arguments in calls:
                result = await client.call_tool(name, arguments, raise_on_error=False)
                print(f"{user}: {name}({arguments}) -> {result.content[0].text}")
    print("refunds that ran:", REFUNDS)
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")


if __name__ == "__main__":
    asyncio.run(main())
