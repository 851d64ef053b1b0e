"""Hooocus websocket front door (Starlette). Importing it starts nothing."""
