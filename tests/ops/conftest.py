"""A real ``hooocus serve`` (FakeRunner entry point) as a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ALICE = "alice-ops-token-0123456789abcdef"
BOB = "bob-ops-token-0123456789abcdefgh"
ADMIN = "admin-ops-token-0123456789abcde"
TOKENS_TEXT = f"alice {ALICE} generate,cancel:own\nbob {BOB} generate,cancel:own\nadmin {ADMIN} admin\n"
REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING_RE = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """``python -m tests.ops.fake_serve serve --port 0 ...``; stderr collected line by line."""

    def __init__(self, data_dir: Path, *, step_ms: float = 40.0, grace_s: float = 20.0,
                 log_level: str = "info") -> None:
        env = {**os.environ, "HOOOCUS_TOKENS": TOKENS_TEXT, "HOOOCUS_SHUTDOWN_GRACE_S": str(grace_s),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("HOOOCUS_CONFIG", None)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ops.fake_serve", "--fake-step-ms", str(step_ms), "serve",
             "--port", "0", "--data-dir", str(data_dir), "--log-level", log_level],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_for_port(timeout_s=30.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_for_port(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = _LISTENING_RE.search(line)
                if match:
                    return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code (the output is read to its end)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
