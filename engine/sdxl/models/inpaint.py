"""Fooocus's inpaint engine on SDXL: the denoiser wrapper, the inpaint head input and the patch file.

Spec §12.2 ("Denoiser wrapper", "Inpaint head and patch"); golden data
``refdata/weights/inpaint_denoiser_wrapper.*`` and the ``fooocus`` cases of ``patch_weights.*``.

- :class:`InpaintDenoiser` wraps the x0 denoiser for every sampling call. The known region is
  re-noised to the current σ with noise from its *own* CPU generator seeded ``(seed + 1) mod MAX_SEED``
  (so it never disturbs the sampler's noise), and the output keeps the known latent outside the mask.
- :func:`inpaint_head_feed` / :func:`inpaint_head_feature`: what the inpaint head convolves, and the
  feature added to the output of UNet input block 0 at every call.
- :func:`fooocus_patches_from_state_dict`: a ``.fooocus.patch`` (as safetensors: ``<key>::w`` uint8,
  ``<key>::min``/``<key>::max``) as :class:`~engine.sdxl.models.patching.FooocusPatch` objects; the weight
  diff itself is :func:`engine.sdxl.models.patching.patch_delta` (not duplicated here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.core.constants import MAX_SEED
from engine.sdxl.models.patching import FooocusPatch

__all__ = [
    "PATCH_KEY_SEPARATOR",
    "InpaintDenoiser",
    "energy_seed",
    "fooocus_patches_from_state_dict",
    "inpaint_head_feature",
    "inpaint_head_feed",
]

#: ``<model key>::w`` / ``::min`` / ``::max`` in the safetensors form of a ``.fooocus.patch``.
PATCH_KEY_SEPARATOR = "::"
_PATCH_PARTS = ("w", "min", "max")


def energy_seed(seed: int) -> int:
    """The seed of the wrapper's own generator: ``(seed + 1) mod MAX_SEED`` (spec §12.2)."""
    return (int(seed) + 1) % MAX_SEED


class InpaintDenoiser:
    """The inpaint rule around an x0 denoiser, one instance per sampling run (spec §12.2).

    ``known_latent`` is the VAE-space latent of the filled crop (``latent_fill``); it is scaled by
    ``scaling_factor`` into model space once. ``mask`` is the latent mask, 1 = inpaint. At each call
    with the sampler's ``x`` and ``sigma`` ([B] or scalar)::

        energy = randn(x.shape, generator=G) · σ
        x_in   = x·m + (L + energy)·(1 − m)
        out    = model(x_in)·m + L·(1 − m)

    The draws come from one CPU generator created here, in call order, so two runs with the same seed
    see the same energy on every device.
    """

    def __init__(self, known_latent: Tensor, mask: Tensor, seed: int, *, scaling_factor: float) -> None:
        self.known = known_latent * scaling_factor
        self.mask = mask.to(self.known)
        self.generator = torch.Generator(device="cpu").manual_seed(energy_seed(seed))

    def __call__(self, model: Callable[[Tensor], Tensor], x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma_t.dim() == 1:
            sigma_t = sigma_t[:, None, None, None]
        energy = torch.randn(x.shape, generator=self.generator, device="cpu", dtype=torch.float32)
        energy = energy.to(x) * sigma_t.to(x)
        known = self.known.to(x)
        mask = self.mask.to(x)
        x_in = x * mask + (known + energy) * (1.0 - mask)
        return model(x_in) * mask + known * (1.0 - mask)


def inpaint_head_feed(latent_mask: Tensor, latent_inpaint: Tensor, *, scaling_factor: float) -> Tensor:
    """``cat[latent_mask, scaling_factor · latent_inpaint]``: [B, 1+4, h, w] (before padding)."""
    return torch.cat([latent_mask.to(latent_inpaint), latent_inpaint * scaling_factor], dim=1)


def inpaint_head_feature(feed: Tensor, head_weight: Tensor) -> Tensor:
    """The head's output: a 3×3 conv of the replicate-padded feed with ``head_weight`` [320, 5, 3, 3]."""
    return F.conv2d(F.pad(feed, (1, 1, 1, 1), mode="replicate"), head_weight.to(feed))


def fooocus_patches_from_state_dict(tensors: Mapping[str, Tensor]) -> dict[str, FooocusPatch]:
    """Group ``<key>::w`` / ``::min`` / ``::max`` tensors into one :class:`FooocusPatch` per model key.

    A key with a missing part, or a tensor name without the separator, is a ``ValueError`` naming it:
    a half-read patch file must not merge silently.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        key, sep, part = name.rpartition(PATCH_KEY_SEPARATOR)
        if not sep or part not in _PATCH_PARTS or not key:
            raise ValueError(f"not a fooocus patch tensor name: {name!r} (expected <key>::w|min|max)")
        parts.setdefault(key, {})[part] = tensor
    patches: dict[str, FooocusPatch] = {}
    for key, found in sorted(parts.items()):
        missing = [p for p in _PATCH_PARTS if p not in found]
        if missing:
            raise ValueError(f"fooocus patch key {key!r} lacks {missing}")
        if found["w"].dtype != torch.uint8:
            raise ValueError(f"fooocus patch key {key!r}: w must be uint8, got {found['w'].dtype}")
        patches[key] = FooocusPatch(found["w"], found["min"], found["max"])
    return patches
