"""Guidance and the anisotropic filter: properties the golden rows do not spell out."""

from __future__ import annotations

import pytest
import torch

from engine.sdxl.sampling import guidance
from engine.sdxl.sampling.anisotropic import adaptive_anisotropic_filter
from engine.sdxl.sampling.guidance import (
    compute_cfg,
    progress_from_timestep,
    sharpness_sampling_function,
)


def test_cfg_one_returns_the_positive_prediction_untouched() -> None:
    x, x0 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert sharpness_sampling_function(x, x0, None, cfg=1.0, sharpness=30.0, adaptive_cfg=7.0, timestep=500) is x0


def test_cfg_above_one_needs_the_negative() -> None:
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="x0_neg"):
        sharpness_sampling_function(x, x, None, cfg=4.0, sharpness=2.0, adaptive_cfg=7.0, timestep=500)


def test_zero_sharpness_or_first_step_skips_the_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("filter must not run when alpha is 0")

    monkeypatch.setattr(guidance, "adaptive_anisotropic_filter", boom)
    x, pos, neg = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    expected = x - ((x - neg) + 4.0 * ((x - pos) - (x - neg)))
    out = sharpness_sampling_function(x, pos, neg, cfg=4.0, sharpness=0.0, adaptive_cfg=7.0, timestep=300)
    torch.testing.assert_close(out, expected)
    # t = 999: progress 0, alpha 0 whatever the sharpness.
    sharpness_sampling_function(x, pos, neg, cfg=4.0, sharpness=2.0, adaptive_cfg=7.0, timestep=999)


def test_mimicking_only_strictly_above_adaptive_cfg() -> None:
    uncond, cond = torch.randn(4), torch.randn(4)
    plain = uncond + 7.0 * (cond - uncond)
    torch.testing.assert_close(compute_cfg(uncond, cond, 7.0, 7.0, 0.0), plain)
    # Early (progress 0) cfg 12 behaves like cfg 7; at the end like cfg 12.
    torch.testing.assert_close(compute_cfg(uncond, cond, 12.0, 7.0, 0.0), plain)
    torch.testing.assert_close(compute_cfg(uncond, cond, 12.0, 7.0, 1.0), uncond + 12.0 * (cond - uncond))


def test_progress_is_float32() -> None:
    assert progress_from_timestep(999) == 0.0 and progress_from_timestep(0) == 1.0
    assert progress_from_timestep(torch.tensor([795, 795])) == float(torch.tensor(1.0) - torch.tensor(795.0) / 999.0)


def test_filter_keeps_constants_and_treats_batch_items_independently() -> None:
    const = torch.full((1, 4, 16, 16), 0.7)
    guide = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(adaptive_anisotropic_filter(const, guide), const)
    a, b = torch.randn(1, 4, 16, 20), torch.randn(1, 4, 16, 20)
    ga, gb = torch.randn(1, 4, 16, 20), torch.randn(1, 4, 16, 20) * 3
    both = adaptive_anisotropic_filter(torch.cat([a, b]), torch.cat([ga, gb]))
    torch.testing.assert_close(both, torch.cat([adaptive_anisotropic_filter(a, ga), adaptive_anisotropic_filter(b, gb)]))


def test_filter_smooths_less_across_an_edge_of_the_guide() -> None:
    """Joint bilateral: an edge in the guidance image (all channels) holds the blur back."""
    x = torch.zeros(1, 4, 16, 16)
    x[..., :, 8:] = 1.0
    along_edge = adaptive_anisotropic_filter(x, g=x.clone())
    flat_guide = adaptive_anisotropic_filter(x, g=torch.randn(1, 4, 16, 16) * 1e-3)
    leak_guided = float(along_edge[..., :, 7].mean())
    leak_flat = float(flat_guide[..., :, 7].mean())
    assert leak_flat > 0.3  # a flat guide gives (nearly) a plain Gaussian blur
    assert leak_guided < 0.1 * leak_flat


def test_eager_and_tensor_guidance_share_one_implementation(monkeypatch) -> None:
    """The compiled path (tensor scalars) and the eager reference run the same CFG code: a change
    to the math in one place reaches both (issue 13.5: no duplicated guidance formula)."""
    from engine.sdxl.sampling import guidance

    calls: list[type] = []
    real_compute_cfg = guidance.compute_cfg

    def spy(uncond, cond, cfg_scale, adaptive_cfg, progress):
        calls.append(type(cfg_scale))
        return real_compute_cfg(uncond, cond, cfg_scale, adaptive_cfg, progress)

    monkeypatch.setattr(guidance, "compute_cfg", spy)
    g = torch.Generator().manual_seed(3)
    x, x0_pos, x0_neg = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    eager = guidance.sharpness_sampling_function(x, x0_pos, x0_neg, cfg=9.0, sharpness=2.0, adaptive_cfg=7.0,
                                                 timestep=torch.tensor([500.0]))
    tensors = guidance.guidance_tensors(x, x0_pos, x0_neg, torch.tensor([500.0]), torch.tensor(9.0),
                                        torch.tensor(7.0), torch.tensor(2.0))
    assert calls == [float, torch.Tensor]
    # Tolerance: the tensor path computes alpha = 0.001·sharpness·progress in float32 instead of
    # double, so it may round one ulp apart (bound used by tests/unit/test_acceleration.py: 1e-5
    # relative); measured over 20 seeds × 3 timesteps on CPU: 0 difference.
    torch.testing.assert_close(tensors, eager, rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
