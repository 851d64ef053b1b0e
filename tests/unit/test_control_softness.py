"""Unit: Control-LoRA gating and positive-only rows (engine/sdxl/control/softness.py); the factors are
checked against Fooocus in tests/golden/test_controlnet_softness.py."""

from __future__ import annotations

import pytest
import torch

from engine.sdxl.control.softness import control_active, positive_rows_only, softness_factors
from engine.sdxl.sampling.model_sampling import DiscreteEPS


@pytest.mark.parametrize("stop_at", [0.0, 0.3, 0.5, 1.0])
def test_control_active_while_sigma_at_or_above_percent_to_sigma(stop_at: float) -> None:
    ms = DiscreteEPS()
    bound = ms.percent_to_sigma(stop_at)
    for sigma in ms.sigmas.tolist():
        assert control_active(sigma, stop_at, ms) == (sigma >= bound)
    if 0.0 < stop_at < 1.0:
        assert control_active(bound, stop_at, ms)
        assert not control_active(bound * (1 - 1e-6), stop_at, ms)
    # stop_at 0 never runs on the schedule; stop_at 1 always does.
    assert control_active(ms.sigma_max, stop_at, ms) == (stop_at > 0.0)
    assert control_active(ms.sigma_min, stop_at, ms) == (stop_at >= 1.0)


def test_positive_rows_only_zeros_negative_chunks() -> None:
    residual = torch.ones(4, 3, 2, 2)
    out = positive_rows_only(residual, [1, 0])  # [negative ×2, positive ×2], the denoiser's order
    assert not out[:2].any() and torch.equal(out[2:], residual[2:])
    with pytest.raises(ValueError, match="cond_or_uncond"):
        positive_rows_only(residual, [1, 0, 0])


def test_softness_zero_is_identity_and_needs_two_outputs() -> None:
    assert softness_factors(0.0) == (1.0,) * 10
    with pytest.raises(ValueError):
        softness_factors(0.25, 1)
