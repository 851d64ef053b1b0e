"""Test doubles shared by the engine, websocket and MCP tests. No torch.

:class:`FakeRunner` behaves like the SDXL runner from the outside (events, cancel at every step,
images with metadata) but only sleeps; it records every step it runs so tests can prove that the
single GPU worker never interleaves two jobs, and it can inject faults.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from engine.core.errors import HooocusError, UnknownModel, UnknownStyle
from engine.core.events import ImageReady
from engine.core.formats import MIME_BY_FORMAT, PIL_FORMAT
from engine.core.jobs import RunContext
from engine.core.request import GenerationRequest
from engine.sdxl.modes import PERFORMANCE_MODES


class FakeOutOfMemoryError(RuntimeError):
    """Named like torch's, so the engine treats it as an out-of-memory error."""


FakeOutOfMemoryError.__name__ = "OutOfMemoryError"


@dataclass
class FakeRunner:
    step_delay_s: float = 0.0
    #: Called as on_step(job_id, step) before each step; tests use it as a barrier.
    on_step: Callable[[str, int], None] | None = None
    #: Raise this exception (or call it to build one) at (prompt, step) to inject a fault.
    faults: dict[tuple[str, int], BaseException] = field(default_factory=dict)
    known_models: tuple[str, ...] = ("demo",)
    known_styles: tuple[str, ...] = ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp", "Random Style")
    #: Downscale final images to this side so tests stay fast; None = full size.
    image_max_side_px: int | None = 64
    step_log: list[tuple[str, int]] = field(default_factory=list)
    oom_recoveries: int = 0
    _active: int = 0
    _active_lock: threading.Lock = field(default_factory=threading.Lock)
    max_concurrent_seen: int = 0
    #: Honour ctx.image_indices, so the engine may split a job's images over several FakeRunners.
    supports_image_subset: bool = False

    def check(self, request: GenerationRequest) -> None:
        if request.base_model is not None and request.base_model not in self.known_models:
            raise UnknownModel(f"unknown model {request.base_model!r}; available: {', '.join(self.known_models)}",
                               loc=("base_model",))
        for i, style in enumerate(request.styles or ()):
            if style not in self.known_styles:
                raise UnknownStyle(f"unknown style {style!r}", loc=("styles", i))

    def recover_after_oom(self) -> None:
        self.oom_recoveries += 1

    def options(self) -> dict[str, object]:
        from engine.core.constants import PERFORMANCE_NAMES, SAMPLER_NAMES, SCHEDULER_NAMES, SDXL_ASPECT_RATIOS
        return {"models": list(self.known_models), "refiners": [], "loras": [], "styles": list(self.known_styles),
                "samplers": list(SAMPLER_NAMES), "schedulers": list(SCHEDULER_NAMES),
                "aspect_ratios": list(SDXL_ASPECT_RATIOS), "performances": list(PERFORMANCE_NAMES),
                "defaults": GenerationRequest().model_dump(mode="json")}

    def steps_for(self, request: GenerationRequest) -> int:
        return request.steps or PERFORMANCE_MODES[request.performance].steps

    def run(self, ctx: RunContext) -> None:
        with self._active_lock:
            self._active += 1
            self.max_concurrent_seen = max(self.max_concurrent_seen, self._active)
        try:
            self._run(ctx)
        finally:
            with self._active_lock:
                self._active -= 1

    def _run(self, ctx: RunContext) -> None:
        req = ctx.request
        steps = self.steps_for(req)
        seed = req.seed if req.seed is not None else 12345
        seeds = [seed if req.disable_seed_increment else (seed + i) % 2**63 for i in range(req.image_number)]
        width, height = req.size
        ctx.started({"prompt": req.prompt, "width": width, "height": height, "steps": steps,
                     "seeds": [str(s) for s in seeds], "model": "fake"}, seeds, steps * len(seeds))
        for index, image_seed in enumerate(seeds):
            if ctx.image_indices is not None and index not in ctx.image_indices:
                continue
            for step in range(1, steps + 1):
                ctx.check_cancelled()
                if self.on_step is not None:
                    self.on_step(ctx.job_id, step)
                fault = self.faults.get((req.prompt, step))
                if fault is not None:
                    raise fault
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                self.step_log.append((ctx.job_id, step))
                ctx.check_cancelled()
                ctx.progress(step, steps, image_index=index, image_count=len(seeds))
                ctx.preview(np.full((8, 8, 3), step % 256, dtype=np.uint8), step=step, image_index=index)
            ctx.image(fake_image(req, index, image_seed, max_side_px=self.image_max_side_px))


def fake_image(req: GenerationRequest, index: int, seed: int, *, max_side_px: int | None = 64) -> ImageReady:
    """A solid-colour image whose colour depends on the seed, encoded as the request asks."""
    width, height = req.size
    if max_side_px is not None and max(width, height) > max_side_px:
        scale = max_side_px / max(width, height)
        width, height = max(8, int(width * scale)), max(8, int(height * scale))
    rgb = hashlib.sha256(str(seed).encode()).digest()[:3]
    image = Image.new("RGB", (width, height), tuple(rgb))
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMAT[req.output_format])
    data = buf.getvalue()
    return ImageReady(job_id="", index=index, seed=seed, data=data, mime=MIME_BY_FORMAT[req.output_format],
                      width=width, height=height, sha256=hashlib.sha256(data).hexdigest(),
                      metadata={"prompt": req.prompt, "seed": str(seed), "fake": True})


class StepGate:
    """A barrier for FakeRunner.on_step: the job blocks at ``step`` until ``release()``."""

    def __init__(self, step: int, *, timeout_s: float = 30.0) -> None:
        self.step = step
        self.timeout_s = timeout_s
        self.reached = threading.Event()
        self._go = threading.Event()

    def __call__(self, job_id: str, step: int) -> None:
        if step == self.step and not self._go.is_set():
            self.reached.set()
            if not self._go.wait(self.timeout_s):
                raise HooocusError("StepGate was never released", code="internal_error")

    def release(self) -> None:
        self._go.set()
