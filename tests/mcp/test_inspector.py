"""Drive the stdio server with a client nobody here wrote: the MCP Inspector's CLI mode (npm).

Slow (npx may download the Inspector first); skipped when ``npx`` is absent or the package cannot
be installed. ``HOOOCUS_MCP_INSPECTOR`` picks the npm spec (default: the latest release).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.paths import REPO_ROOT

pytestmark = pytest.mark.slow
INSPECTOR = os.environ.get("HOOOCUS_MCP_INSPECTOR", "@modelcontextprotocol/inspector")


def inspector(*method_args: str) -> dict:
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed")
    command = ["npx", "-y", INSPECTOR, "--cli", sys.executable, "-m", "tests.mcp.stdio_fake_server",
               *method_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    start = done.stdout.find("{")
    if done.returncode != 0 and start < 0 and "npm error" in done.stderr:
        pytest.skip(f"the MCP Inspector could not be installed: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout[start:])


def test_inspector_lists_tools() -> None:
    tools = {tool["name"]: tool for tool in inspector("--method", "tools/list")["tools"]}
    assert set(tools) == {"generate_image", "edit_image", "enhance_image", "describe_image", "get_job", "cancel_job",
                          "list_options"}
    assert tools["generate_image"]["inputSchema"]["required"] == ["prompt"]
    assert "outputSchema" in tools["generate_image"]


def test_inspector_calls_generate_image() -> None:
    result = inspector("--method", "tools/call", "--tool-name", "generate_image", "--tool-arg", "prompt=a fox",
                       "--tool-arg", "performance=Lightning", "--tool-arg", "image_number=2")
    assert result["isError"] is False
    kinds = [block["type"] for block in result["content"]]
    assert kinds.count("image") == 2 and kinds.count("resource_link") == 2
    assert result["structuredContent"]["status"] == "completed"
    assert len(result["structuredContent"]["images"]) == 2
