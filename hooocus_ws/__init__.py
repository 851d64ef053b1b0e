"""Hooocus websocket front door (Starlette). Importing it starts nothing.

- ``hooocus_ws.app.create_app(runtime, *, tokens, ...)``: the app (``/v1/ws``, HTTP companions, page, ``/mcp``);
- ``hooocus_ws.cli.add_parser(subparsers)`` / ``run(args, settings)``: the ``hooocus serve`` command (job history,
  graceful SIGTERM), called by the product CLI ``hooocus.cli``;
- ``hooocus_ws.client.HooocusClient`` / ``SyncHooocusClient`` / ``generate_images_sync``: the Python client;
- ``hooocus_ws.protocol``: the ``hooocus.v1`` messages, binary frames and JSON Schema (docs/protocol.md).
"""
