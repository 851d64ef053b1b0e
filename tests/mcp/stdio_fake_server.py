"""``python -m tests.mcp.stdio_fake_server [STEP_DELAY_S [DATA_DIR]]``: the real ``hooocus mcp`` stdio server
over the torch-free FakeRunner, for the stdio and MCP Inspector tests. Not a test module.

Without DATA_DIR the engine keeps everything in memory; with it, the server runs exactly as embedded
``hooocus mcp --data-dir DATA_DIR`` does (job history and image folder there), with the settings read
from ``HOOOCUS_*`` variables as the real entry point reads them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from engine.core.jobs import Engine
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import load_settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner
from hooocus_mcp.cli import serve_embedded, serve_stdio_local


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    step_delay_s = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    runner = FakeRunner(step_delay_s=step_delay_s)
    if len(sys.argv) > 2:
        settings, _ = load_settings(cli={"data_dir": Path(sys.argv[2])})
        serve_embedded(create_runtime(settings, runner=runner))
        return
    settings, _ = load_settings()  # HOOOCUS_* variables, e.g. the stdin line cap
    images = ImageStore()
    runtime = Runtime(settings, Engine(runner, image_sink=images.put), images)
    runtime.start()
    try:
        serve_stdio_local(runtime)
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
