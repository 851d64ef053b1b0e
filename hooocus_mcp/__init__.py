"""Hooocus MCP front door. Importing it starts nothing."""
