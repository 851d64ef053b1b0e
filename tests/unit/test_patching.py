"""Unit: LoCon (conv, Tucker mid), LoHa and LoKr patch math, checked through what the layers compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.sdxl.models.patching import (
    DiffPatch,
    LohaPatch,
    LokrPatch,
    LoraPatch,
    PatchShapeError,
    apply_patches,
    patch_delta,
    patch_numel,
)

GEN = torch.Generator().manual_seed(7)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_locon_conv_delta_equals_running_down_then_up() -> None:
    weight, x = _randn(6, 5, 3, 3), _randn(1, 5, 8, 8)
    down, up = _randn(4, 5, 3, 3), _randn(6, 4, 1, 1)
    merged = apply_patches(weight, [(LoraPatch(up=up, down=down, alpha=2.0), 0.7)])
    lora_path = F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, merged, padding=1),
                               F.conv2d(x, weight, padding=1) + 0.7 * (2.0 / 4) * lora_path, atol=1e-4, rtol=1e-4)


def test_locon_tucker_mid_equals_down_mid_up_convolutions() -> None:
    weight, x = _randn(6, 5, 3, 3), _randn(1, 5, 8, 8)
    down, mid, up = _randn(4, 5, 1, 1), _randn(4, 4, 3, 3), _randn(6, 4, 1, 1)
    patch = LoraPatch(up=up, down=down, alpha=None, mid=mid)
    assert patch_numel(patch) == weight.numel()
    merged = apply_patches(weight, [(patch, 1.0)])
    lora_path = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, merged, padding=1), F.conv2d(x, weight, padding=1) + lora_path,
                               atol=1e-4, rtol=1e-4)


def test_loha_is_the_hadamard_product_of_two_low_rank_products() -> None:
    w1_a, w1_b, w2_a, w2_b = _randn(6, 2), _randn(2, 5), _randn(6, 3), _randn(3, 5)
    delta = patch_delta(LohaPatch(w1_a, w1_b, w2_a, w2_b, alpha=4.0), 0.5, (6, 5))
    expected = torch.einsum("or,ri,os,si->oi", w1_a, w1_b, w2_a, w2_b) * 0.5 * (4.0 / 2)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)


def test_loha_tucker_for_conv() -> None:
    w1_a, w1_b, t1 = _randn(2, 6), _randn(2, 5), _randn(2, 2, 3, 3)
    w2_a, w2_b, t2 = _randn(2, 6), _randn(2, 5), _randn(2, 2, 3, 3)
    delta = patch_delta(LohaPatch(w1_a, w1_b, w2_a, w2_b, None, t1, t2), 1.0, (6, 5, 3, 3))
    m1 = torch.einsum("abkl,ao,bi->oikl", t1, w1_a, w1_b)
    m2 = torch.einsum("abkl,ao,bi->oikl", t2, w2_a, w2_b)
    torch.testing.assert_close(delta, m1 * m2, atol=1e-5, rtol=1e-5)


def test_lokr_is_a_kronecker_product() -> None:
    w1, w2_a, w2_b = _randn(2, 3), _randn(4, 2), _randn(2, 5)
    delta = patch_delta(LokrPatch(w1=w1, w2_a=w2_a, w2_b=w2_b, alpha=1.0), 2.0, (8, 15))
    w2 = w2_a @ w2_b
    for i in range(2):
        for j in range(3):
            block = delta[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5]
            torch.testing.assert_close(block, 2.0 * (1.0 / 2) * w1[i, j] * w2, atol=1e-5, rtol=1e-5)


def test_lokr_full_factors_are_not_scaled_and_conv_w2_broadcasts() -> None:
    w1, w2 = _randn(2, 2), _randn(3, 4, 3, 3)
    delta = patch_delta(LokrPatch(w1=w1, w2=w2, alpha=8.0), 1.0, (6, 8, 3, 3))
    torch.testing.assert_close(delta[3:6, 0:4], w1[1, 0] * w2)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(PatchShapeError):
        apply_patches(torch.zeros(4, 4), [(DiffPatch(torch.zeros(4, 5)), 1.0)])
    with pytest.raises(PatchShapeError):
        apply_patches(torch.zeros(4, 4), [(LoraPatch(up=torch.zeros(4, 2), down=torch.zeros(2, 5)), 1.0)])
