"""``python -m tests.mcp.stdio_fake_server [STEP_DELAY_S]``: the real ``hooocus mcp`` stdio server over the
torch-free FakeRunner, for the stdio and MCP Inspector tests. Not a test module."""

from __future__ import annotations

import logging
import sys

from engine.jobs import Engine
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import ImageStore
from engine.testing import FakeRunner
from hooocus_mcp.cli import serve_stdio_local


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    step_delay_s = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    images = ImageStore()
    runtime = Runtime(Settings(), Engine(FakeRunner(step_delay_s=step_delay_s), image_sink=images.put), images)
    runtime.start()
    try:
        serve_stdio_local(runtime)
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
