"""Hooocus MCP front door over the shared engine. Importing it starts nothing.

Public API::

    from hooocus_mcp.tools import build_server, ServerOptions      # tools + resources, any transport
    from hooocus_mcp.backend import LocalBackend                   # this process's engine
    from hooocus_mcp.remote import RemoteBackend                   # a running 'hooocus serve'
    from hooocus_mcp.http import create_mcp_mount, McpMount        # /mcp inside the serve app
    from hooocus_mcp.cli import add_parser, run                    # the 'hooocus mcp' sub-command

Every import from the ``mcp`` SDK lives in ``hooocus_mcp._sdk``.
"""
