"""Control-LoRA output scaling and gating for PyraCanny / CPDS (spec §12.3).

Fooocus applies each control model with ``strength = weight``, ``start = 0``, ``end = stop_at`` and its
own "softness" (default 0.25): control output ``i`` of the 10 (9 input-block zero-convs, high
resolution first, then the middle block) is multiplied by ``1 − softness·(1 − i/9)``, so the
high-resolution outputs are damped most (0.75) and the middle block not at all (1.0).

The control is active while ``σ ≥ percent_to_sigma(stop_at)`` and only on the positive branch (the
negative rows of a batched UNet call get no residual). These are pure functions over diffusers'
ControlNet outputs (``down_block_res_samples`` + ``mid_block_res_sample``); checked against
``refdata/weights/controlnet_softness.json`` by ``tests/golden/test_controlnet_softness.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

__all__ = [
    "CONTROL_OUTPUT_COUNT",
    "DEFAULT_SOFTNESS",
    "control_active",
    "positive_rows_only",
    "scale_control_outputs",
    "softness_factors",
]

#: spec §12.3: an SDXL ControlNet / Control-LoRA yields 9 input-block residuals + the middle block's.
CONTROL_OUTPUT_COUNT = 10
#: spec §12.3: Fooocus's default softness (its "controlnet_softness" developer setting).
DEFAULT_SOFTNESS = 0.25
#: Fooocus's cond_or_uncond code for a negative-branch chunk of the batch.
_UNCOND = 1


class _PercentToSigma(Protocol):
    def percent_to_sigma(self, percent: float) -> float: ...


def softness_factors(softness: float = DEFAULT_SOFTNESS, count: int = CONTROL_OUTPUT_COUNT) -> tuple[float, ...]:
    """The multiplier of each control output, ``1 − softness·(1 − i/(count−1))`` for i = 0..count−1."""
    if count < 2:
        raise ValueError(f"count must be at least 2, got {count}")
    last = count - 1
    return tuple(1.0 - softness * (1.0 - i / last) for i in range(count))


def scale_control_outputs(down: Sequence[torch.Tensor], mid: torch.Tensor, *, strength: float,
                          softness: float = DEFAULT_SOFTNESS) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Softness then strength on a ControlNet's outputs (Fooocus's order: the model's forward applies
    softness, the control merge then multiplies by strength). ``down`` has 9 tensors for SDXL."""
    factors = softness_factors(softness, len(down) + 1)
    outs = [t * f for t, f in zip([*down, mid], factors, strict=True)]
    outs = [t * strength for t in outs]
    return outs[:-1], outs[-1]


def positive_rows_only(residual: torch.Tensor, cond_or_uncond: Sequence[int]) -> torch.Tensor:
    """``residual`` with the negative-branch chunks zeroed (spec §12.3: control on the positive branch
    only). ``cond_or_uncond`` has one code per equal chunk of the batch (0 cond, 1 uncond)."""
    if not cond_or_uncond or residual.shape[0] % len(cond_or_uncond):
        raise ValueError(f"cond_or_uncond has {len(cond_or_uncond)} entries for a batch of {residual.shape[0]}")
    keep = torch.tensor([code != _UNCOND for code in cond_or_uncond], dtype=residual.dtype, device=residual.device)
    keep = keep.repeat_interleave(residual.shape[0] // len(cond_or_uncond))
    return residual * keep.view(-1, *([1] * (residual.ndim - 1)))


def control_active(sigma: float, stop_at: float, model_sampling: _PercentToSigma) -> bool:
    """spec §12.3: a control with ``start = 0, end = stop_at`` runs while ``σ ≥ percent_to_sigma(stop_at)``
    (``start = 0`` maps to a sigma above any schedule, so only the end bound matters)."""
    return float(sigma) >= model_sampling.percent_to_sigma(stop_at)
