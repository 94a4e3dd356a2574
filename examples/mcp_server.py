"""MCP: guard every tool of a server built with the official `mcp` package, in one line.

The server's tools are registered as usual, then guard.wrap_tools(server)
guards them all in place. An MCP client connected in memory (no network, no
subprocess) calls a tool the way a client does after a dropped connection: the
same call again. The ticket is filed once. Nothing here writes to stdout but
the example's own report, which keeps a stdio server's channel clean.
Run: python examples/mcp_server.py
"""

import asyncio

from ledger import Guard

try:  # mcp >= 2
    from mcp import Client
    from mcp.server.mcpserver import Context, MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import Context, FastMCP as Server
    from mcp.shared.memory import create_connected_server_and_client_session
    Client = None

guard = Guard(":memory:")  # records in memory: this example leaves no files behind
server = Server("helpdesk")
TICKETS: list[str] = []


@server.tool()
def file_ticket(title: str, priority: int, ctx: Context) -> str:
    """Open a support ticket."""
    TICKETS.append(title)
    return f"ticket #{len(TICKETS)} opened: {title}"


@server.tool()
async def search_tickets(query: str) -> str:
    """Search tickets (read-only)."""
    return f"{sum(query in t for t in TICKETS)} ticket(s) match {query!r}"


guard.policy("search_tickets", unlimited=True)   # read-only: always runs
guard.wrap_tools(server, blocked_return="already done: this ticket was filed before")


async def connect():
    if Client is not None:
        return Client(server)
    return create_connected_server_and_client_session(server._mcp_server)


async def main() -> None:
    async with await connect() as client:
        calls = [("file_ticket", {"title": "printer on fire", "priority": 1}),
                 ("file_ticket", {"title": "printer on fire", "priority": 1}),   # the client retries
                 ("file_ticket", {"priority": 1, "title": "printer on fire"}),
                 ("search_tickets", {"query": "printer"})]
        for name, arguments in calls:
            result = await client.call_tool(name, arguments)
            print(f"{name}({arguments}) -> {result.content[0].text}")
    print("tickets filed:", TICKETS)


if __name__ == "__main__":
    asyncio.run(main())
