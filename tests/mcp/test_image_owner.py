"""Issue 11.7 on the MCP side: ``hooocus://images/{sha256}`` is readable by the principal whose job
made the image (or an admin), not by any caller that knows the hash (the PNG holds the prompt)."""

from __future__ import annotations

import pytest

from engine.core.access import Principal
from engine.core.runtime import Runtime
from hooocus_mcp._sdk import Client, MCPError
from hooocus_mcp.backend import LocalBackend
from hooocus_mcp.tools import ServerOptions, build_server

pytestmark = pytest.mark.anyio


def server_for(runtime: Runtime, caller: Principal):
    return build_server(LocalBackend(runtime), ServerOptions(default_caller=caller, progress_min_interval_s=0))


async def test_image_resource_is_private_to_its_owner_and_admins(runtime: Runtime) -> None:
    alice = Principal("alice", frozenset({"generate", "cancel:own"}))
    bob = Principal("bob", frozenset({"generate", "cancel:own"}))
    admin = Principal("root", frozenset({"admin"}))
    async with Client(server_for(runtime, alice)) as as_alice, Client(server_for(runtime, bob)) as as_bob, \
            Client(server_for(runtime, admin)) as as_admin:
        made = await as_alice.call_tool("generate_image", {"prompt": "mine", "performance": "Lightning"})
        uri = made.structured_content["images"][0]["uri"]
        mine = (await as_alice.read_resource(uri)).contents[0]
        assert (await as_admin.read_resource(uri)).contents[0].blob == mine.blob
        with pytest.raises(MCPError):
            await as_bob.read_resource(uri)
