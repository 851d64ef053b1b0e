"""A runner for the Ray Serve tests that reports, through files in a folder both processes see,
what happened on the replica: every step it ran, which process ran it, when a job started and
ended, and whether it saw its cancel token. Ray pickles it by reference, so it lives in a module
the replica's worker process can import (not in the test module, which imports pytest fixtures)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.jobs import RunContext
from engine.core.request import GenerationRequest
from engine.core.settings import Settings
from engine.core.testing import FakeRunner, fake_image

#: A job whose prompt starts with this holds at HOLD_STEP until its cancel token is set or the
#: test writes the release file, so the test can act while the job is known to be mid-run.
HOLD_PREFIX = "hold"
HOLD_STEP = 2
#: The longest a held job waits (a safety net so a broken test cannot hang a replica forever).
HOLD_LIMIT_S = 60.0


@dataclass
class ProbeRunner:
    probe_dir: Path
    names: FakeRunner = field(default_factory=FakeRunner)  # check/options like the in-process fake

    def check(self, request: GenerationRequest) -> None:
        self.names.check(request)

    def options(self) -> dict[str, object]:
        return self.names.options()

    def recover_after_oom(self) -> None:
        pass

    def _log(self, job_id: str, line: str) -> None:
        with open(self.probe_dir / f"{job_id}.log", "a", encoding="utf-8") as f:
            f.write(f"{time.time():.6f} {os.getpid()} {line}\n")

    def run(self, ctx: RunContext) -> None:
        req = ctx.request
        steps = req.steps or 4
        seed = req.seed if req.seed is not None else 1
        ctx.started({"prompt": req.prompt, "steps": steps}, [seed], steps)
        self._log(ctx.job_id, "start")
        for name, array in sorted(ctx.inputs.items()):  # what crossed from the front door
            digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
            self._log(ctx.job_id, f"input {name} {'x'.join(map(str, array.shape))} {digest}")
        try:
            for step in range(1, steps + 1):
                ctx.check_cancelled()
                self._log(ctx.job_id, f"step {step}")
                if req.prompt.startswith(HOLD_PREFIX) and step == HOLD_STEP:
                    self._hold(ctx)
                ctx.progress(step, steps)
            ctx.image(fake_image(req, 0, seed))
        finally:
            self._log(ctx.job_id, f"end cancel_set={ctx.cancel.is_set()}")

    def _hold(self, ctx: RunContext) -> None:
        release = self.probe_dir / f"{ctx.job_id}.release"
        import ray  # only on a replica, where Ray is running

        self._log(ctx.job_id, f"actor {ray.get_runtime_context().get_actor_name()}")
        self._log(ctx.job_id, "holding")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not ctx.cancel.is_set() and not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._log(ctx.job_id, f"held cancel_set={ctx.cancel.is_set()}")


def probe_factory(probe_dir: Path):
    """A RunnerFactory (settings, model) -> ProbeRunner writing into ``probe_dir``."""

    def factory(settings: Settings, model: str | None) -> ProbeRunner:
        return ProbeRunner(Path(probe_dir))

    return factory
