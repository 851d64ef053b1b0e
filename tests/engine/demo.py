"""Helpers for running the demo model's SDXLRunner directly (without an Engine) in the engine tests."""

from __future__ import annotations

import numpy as np


class StubEngine:
    """The two things RunContext needs from an Engine (the submit-time resolver is not ours)."""

    image_sink = None

    def _count_step(self) -> None:
        pass


def noise_image(height: int, width: int) -> np.ndarray:
    """A seeded HWC uint8 noise picture (the same seed in every test, so runs are repeatable)."""
    return np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
