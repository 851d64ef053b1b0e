"""Image helpers the input-image tests share (issue 14 at the engine, CLI, websocket and MCP doors):
encoded pictures, data URIs, and a FakeRunner that keeps the decoded inputs each job saw. One copy,
so every door's tests build their inputs the same way."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from engine.core.jobs import RunContext
from engine.core.testing import FakeRunner


class InputsRecorder(FakeRunner):
    """A FakeRunner that keeps what each job's RunContext.inputs held, by job id."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.seen: dict[str, dict[str, np.ndarray]] = {}

    def run(self, ctx: RunContext) -> None:
        self.seen[ctx.job_id] = {k: np.array(v) for k, v in ctx.inputs.items()}
        super().run(ctx)


def encode(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def solid_png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    return encode(Image.new("RGB", (width, height), color))


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of seeded random pixels: different seeds give different bytes (and sha256 references)."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(array))
