"""Weight patch math: LoRA/LoCon, LoHa, LoKr, full diffs and Fooocus's uint8 inpaint patch (spec §11.1).

Fooocus merges every patch into the weights when a model loads (no runtime adapter). For one
weight it starts from the original, converts to float32, adds each patch in order and casts the
sum back to the weight's dtype once; :func:`apply_patches` does the same.

The LoCon "mid" (Tucker), LoHa and LoKr formulas follow the LyCORIS conventions (KohakuBlueleaf/
LyCORIS, Apache-2.0), rewritten here from their definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class PatchShapeError(ValueError):
    """A patch does not produce as many numbers as the weight it targets (Fooocus skips such a patch)."""


@dataclass(frozen=True)
class LoraPatch:
    """``W += s · (up @ down) · (alpha / rank)``; no scaling without alpha; rank = ``down.shape[0]``.

    ``up``: [out, r] or [out, r, 1, 1]; ``down``: [r, in] or [r, in, kh, kw] (LoCon conv);
    ``mid``: optional [r, r, kh, kw] Tucker core (then ``down`` is [r, in, 1, 1]).
    """

    up: Tensor
    down: Tensor
    alpha: float | None = None
    mid: Tensor | None = None


@dataclass(frozen=True)
class LohaPatch:
    """LoHa: ``W += s · (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, optional Tucker cores t1/t2."""

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None


@dataclass(frozen=True)
class LokrPatch:
    """LoKr: ``W += s · (alpha / r) · kron(w1, w2)``; each factor full or as a low-rank product."""

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class DiffPatch:
    """``W += s · diff`` (full weight difference; shapes must match exactly)."""

    diff: Tensor


@dataclass(frozen=True)
class FooocusPatch:
    """Fooocus inpaint patch: ``W += s · ((w_u8 / 255) · (max − min) + min)`` (spec §11.1)."""

    w_uint8: Tensor
    w_min: float | Tensor
    w_max: float | Tensor


WeightPatch = LoraPatch | LohaPatch | LokrPatch | DiffPatch | FooocusPatch


def _f32(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _tucker(core: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    """Rebuild a conv kernel from a Tucker core: ``[r, r, kh, kw]`` with ``w_b [r, in]``, ``w_a [r, out]``."""
    return torch.einsum("ijkl,jr,ip->prkl", core, w_b, w_a)


def patch_numel(patch: WeightPatch) -> int:
    """How many numbers the patch's delta has (to check it against a weight before merging)."""
    if isinstance(patch, LoraPatch):
        inner = patch.down.shape[1] * (math.prod(patch.mid.shape[2:]) if patch.mid is not None
                                       else math.prod(patch.down.shape[2:]))
        return patch.up.shape[0] * inner
    if isinstance(patch, LohaPatch):
        if patch.t1 is not None:
            return patch.w1_a.shape[1] * patch.w1_b.shape[1] * math.prod(patch.t1.shape[2:])
        return patch.w1_a.shape[0] * patch.w1_b.shape[1]
    if isinstance(patch, LokrPatch):
        w1 = patch.w1.shape if patch.w1 is not None else (patch.w1_a.shape[0], patch.w1_b.shape[1])  # type: ignore[union-attr]
        if patch.w2 is not None:
            w2 = math.prod(patch.w2.shape)
        elif patch.t2 is not None:
            w2 = patch.w2_a.shape[1] * patch.w2_b.shape[1] * math.prod(patch.t2.shape[2:])  # type: ignore[union-attr]
        else:
            w2 = patch.w2_a.shape[0] * patch.w2_b.shape[1]  # type: ignore[union-attr]
        return math.prod(w1) * w2
    if isinstance(patch, DiffPatch):
        return patch.diff.numel()
    return patch.w_uint8.numel()


def patch_delta(patch: WeightPatch, strength: float, shape: torch.Size | tuple[int, ...], *,
                device: torch.device | str = "cpu") -> Tensor:
    """The float32 amount ``strength · ΔW`` a patch adds to a weight of ``shape`` (spec §11.1)."""
    device = torch.device(device)
    if isinstance(patch, DiffPatch):
        if tuple(patch.diff.shape) != tuple(shape):
            raise PatchShapeError(f"diff shape {tuple(patch.diff.shape)} != weight shape {tuple(shape)}")
        return strength * _f32(patch.diff, device)
    if isinstance(patch, FooocusPatch):
        if tuple(patch.w_uint8.shape) != tuple(shape):
            raise PatchShapeError(f"fooocus patch shape {tuple(patch.w_uint8.shape)} != weight shape {tuple(shape)}")
        w_min = _f32(torch.as_tensor(patch.w_min), device)
        w_max = _f32(torch.as_tensor(patch.w_max), device)
        return strength * ((_f32(patch.w_uint8, device) / 255.0) * (w_max - w_min) + w_min)
    if patch_numel(patch) != math.prod(shape):
        raise PatchShapeError(f"{type(patch).__name__} gives {patch_numel(patch)} numbers, weight {tuple(shape)} "
                              f"has {math.prod(shape)}")
    if isinstance(patch, LoraPatch):
        up, down = _f32(patch.up, device), _f32(patch.down, device)
        scale = strength * (patch.alpha / down.shape[0] if patch.alpha is not None else 1.0)
        if patch.mid is not None:
            # down'[a, i, h, w] = Σ_b mid[a, b, h, w] · down[b, i]  (Tucker core × input projection)
            down = torch.einsum("abhw,bi->aihw", _f32(patch.mid, device), down.flatten(1))
        return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)
    if isinstance(patch, LohaPatch):
        w1_a, w1_b = _f32(patch.w1_a, device), _f32(patch.w1_b, device)
        w2_a, w2_b = _f32(patch.w2_a, device), _f32(patch.w2_b, device)
        scale = strength * (patch.alpha / w1_b.shape[0] if patch.alpha is not None else 1.0)
        if patch.t1 is not None and patch.t2 is not None:
            m1 = _tucker(_f32(patch.t1, device), w1_b, w1_a)
            m2 = _tucker(_f32(patch.t2, device), w2_b, w2_a)
        else:
            m1, m2 = w1_a @ w1_b, w2_a @ w2_b
        return (scale * (m1 * m2)).reshape(shape)
    # LoKr
    rank: int | None = None
    if patch.w1 is not None:
        w1 = _f32(patch.w1, device)
    else:
        assert patch.w1_a is not None and patch.w1_b is not None
        rank = patch.w1_b.shape[0]
        w1 = _f32(patch.w1_a, device) @ _f32(patch.w1_b, device)
    if patch.w2 is not None:
        w2 = _f32(patch.w2, device)
    else:
        assert patch.w2_a is not None and patch.w2_b is not None
        rank = patch.w2_b.shape[0]
        w2_a, w2_b = _f32(patch.w2_a, device), _f32(patch.w2_b, device)
        w2 = _tucker(_f32(patch.t2, device), w2_b, w2_a) if patch.t2 is not None else w2_a @ w2_b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = strength * (patch.alpha / rank if patch.alpha is not None and rank is not None else 1.0)
    return (scale * torch.kron(w1, w2)).reshape(shape)


def apply_patches(weight: Tensor, patches: Sequence[tuple[WeightPatch, float]]) -> Tensor:
    """Return ``weight`` with every ``(patch, strength)`` added in order; float32 math, original dtype out.

    Raises :class:`PatchShapeError` when a patch does not fit the weight.
    """
    merged = weight.detach().to(torch.float32, copy=True)
    for patch, strength in patches:
        merged += patch_delta(patch, strength, merged.shape, device=merged.device)
    return merged.to(weight.dtype)
