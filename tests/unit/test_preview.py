"""Unit: latent preview conversion and resizing (spec §16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sdxl.preview import latent_rgb_factors, latent_to_rgb, resize_preview


def test_conversion_truncates_instead_of_rounding() -> None:
    # Channel 0 only: rgb = 0.392 * v. Pick v so that (rgb + 1) / 2 * 255 = 200.9 -> 200, not 201.
    value = ((200.9 / 255.0) * 2.0 - 1.0) / 0.3920
    x0 = torch.zeros(1, 4, 2, 3)
    x0[0, 0] = value
    out = latent_to_rgb(x0)
    assert out.shape == (2, 3, 3)
    assert out[0, 0, 0] == 200


def test_clamps_and_uses_first_image_only() -> None:
    x0 = torch.stack([torch.full((4, 2, 2), 100.0), torch.full((4, 2, 2), -100.0)])
    out = latent_to_rgb(x0)
    expected = np.where(latent_rgb_factors("sdxl").sum(0).numpy() > 0, 255, 0)
    np.testing.assert_array_equal(out[0, 0], expected)


def test_accepts_3d_half_precision_and_other_formats() -> None:
    x0 = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(1))
    full = latent_to_rgb(x0)
    assert latent_to_rgb(x0.half()).shape == full.shape == (5, 7, 3)
    assert not np.array_equal(latent_to_rgb(x0, latent_format="sd15"), full)
    np.testing.assert_array_equal(latent_to_rgb(x0, latent_format="playground"), full)
    with pytest.raises(ValueError, match="unknown latent format"):
        latent_to_rgb(x0, latent_format="flux")


@pytest.mark.parametrize(("shape", "max_side", "expected"), [
    ((112, 144, 3), 64, (50, 64, 3)),
    ((144, 112, 3), 64, (64, 50, 3)),
    ((100, 100, 3), 256, (100, 100, 3)),   # never scaled up
    ((300, 1, 3), 30, (30, 1, 3)),         # a side never drops to 0
])
def test_resize_preview_keeps_aspect(shape: tuple[int, int, int], max_side: int,
                                     expected: tuple[int, int, int]) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = resize_preview(rgb, max_side)
    assert out.shape == expected
    assert out.dtype == np.uint8


def test_resize_preview_rejects_non_positive_size() -> None:
    with pytest.raises(ValueError):
        resize_preview(np.zeros((4, 4, 3), dtype=np.uint8), 0)
