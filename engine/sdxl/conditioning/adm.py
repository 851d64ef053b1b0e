"""SDXL size conditioning ("ADM") with Fooocus's negative ADM guidance (spec §4, refiner: §4 and §8).

Fooocus embeds two 6-number size lists per prompt: an *emphasized* one (the original size scaled by
1.5 for the positive prompt, 0.8 for the negative) and a *consistent* one (the rounded target size
everywhere). The UNet uses the emphasized half while the discrete timestep is above
``999 * (1 - adm_scaler_end)`` and the consistent half after that.

With diffusers the 6 numbers are the UNet's ``added_cond_kwargs["time_ids"]``; the UNet embeds them
itself (``add_time_proj`` = ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``), so the
pipeline only needs :func:`adm_time_ids` and :func:`use_emphasized_adm`. :func:`sdxl_adm_vector`
builds the full 5632-wide Fooocus vector for checks against the golden data.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

PromptType = Literal["positive", "negative", ""]
TimeIds = tuple[int, int, int, int, int, int]

#: Fooocus PatchSettings defaults (spec §4).
DEFAULT_POSITIVE_ADM_SCALE = 1.5
DEFAULT_NEGATIVE_ADM_SCALE = 0.8
DEFAULT_ADM_SCALER_END = 0.3

#: SDXL refiner aesthetic scores (spec §4, "SDXL refiner ADM").
REFINER_POSITIVE_AESTHETIC = 6.0
REFINER_NEGATIVE_AESTHETIC = 2.5

#: Width of one embedded number (Fooocus ``Timestep(256)``).
ADM_EMBED_DIM = 256
#: Width of the pooled CLIP-G vector that leads each half of the SDXL vector.
POOLED_DIM = 1280


def round_to_64(value: float) -> int:
    """``int(round(v / 64)) * 64`` with Python's banker's rounding on a float (spec §4)."""
    return int(round(float(value) / 64.0)) * 64


def sdxl_time_ids(width: int, height: int, *, size_scale: float) -> TimeIds:
    """``[int(h·s), int(w·s), 0, 0, r64(h), r64(w)]``: original size (truncated), crop, target (spec §4)."""
    return (int(height * size_scale), int(width * size_scale), 0, 0, round_to_64(height), round_to_64(width))


def adm_time_ids(width: int, height: int, prompt_type: PromptType, *,
                 positive_scale: float = DEFAULT_POSITIVE_ADM_SCALE,
                 negative_scale: float = DEFAULT_NEGATIVE_ADM_SCALE) -> tuple[TimeIds, TimeIds]:
    """(emphasized, consistent) time ids for one prompt (spec §4 table and "Two 6-number lists").

    ``width``/``height`` are the latent size × 8 of the sampling call. The consistent list uses the
    rounded target size as "original size" too, not the raw size.
    """
    if prompt_type == "positive":
        scale = positive_scale
    elif prompt_type == "negative":
        scale = negative_scale
    else:
        scale = 1.0
    # "Other" prompt types keep the raw size: int(x * 1.0) == x for integer pixel sizes.
    emphasized = sdxl_time_ids(width, height, size_scale=scale)
    target_h, target_w = round_to_64(height), round_to_64(width)
    consistent: TimeIds = (target_h, target_w, 0, 0, target_h, target_w)
    return emphasized, consistent


def use_emphasized_adm(timestep: float, adm_scaler_end: float) -> bool:
    """True while the discrete UNet timestep is above ``999·(1 − adm_scaler_end)`` (spec §4 "Switch")."""
    return timestep > 999.0 * (1.0 - adm_scaler_end)


def timestep_embedding_256(values: torch.Tensor) -> torch.Tensor:
    """Fooocus ``Timestep(256)``: ``cat(cos(v·f), sin(v·f))``, ``f_k = exp(−ln(10000)·k/128)`` (spec §4).

    ``values``: [N] numbers -> [N, 256] float32.
    """
    half = ADM_EMBED_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.reshape(-1, 1).float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed_numbers(numbers: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Embed each number separately and flatten: [len·256]."""
    return timestep_embedding_256(torch.tensor(numbers, dtype=torch.float32, device=device)).flatten()


def sdxl_adm_vector(pooled: torch.Tensor, width: int, height: int, prompt_type: PromptType, *,
                    positive_scale: float = DEFAULT_POSITIVE_ADM_SCALE,
                    negative_scale: float = DEFAULT_NEGATIVE_ADM_SCALE) -> torch.Tensor:
    """Fooocus's SDXL ``y``: ``[pooled, emb(emphasized), pooled, emb(consistent)]`` -> [B, 5632] (spec §4).

    ``pooled``: [B, 1280] CLIP-G pooled output. The first 2816 numbers are what a diffusers UNet
    computes from ``text_embeds=pooled`` and ``time_ids=emphasized``; the last 2816 likewise for
    ``consistent``.
    """
    emphasized, consistent = adm_time_ids(width, height, prompt_type,
                                          positive_scale=positive_scale, negative_scale=negative_scale)
    batch = pooled.shape[0]
    emb_e = _embed_numbers(tuple(float(v) for v in emphasized), pooled.device).to(pooled.dtype)
    emb_c = _embed_numbers(tuple(float(v) for v in consistent), pooled.device).to(pooled.dtype)
    return torch.cat([pooled, emb_e.expand(batch, -1), pooled, emb_c.expand(batch, -1)], dim=1)


def select_adm_half(adm: torch.Tensor, timestep: float, adm_scaler_end: float) -> torch.Tensor:
    """Fooocus ``timed_adm``: the emphasized or consistent half of a 5632-wide ``y`` (spec §4 "Switch").

    Other widths (the refiner's 2560) pass through unchanged.
    """
    if adm.shape[1] != 2 * (POOLED_DIM + 6 * ADM_EMBED_DIM):
        return adm
    half = adm.shape[1] // 2
    return adm[:, :half] if use_emphasized_adm(timestep, adm_scaler_end) else adm[:, half:]


def refiner_aesthetic_score(prompt_type: PromptType) -> float:
    """6.0 for positive (and other) prompts, 2.5 for negative (spec §4 "SDXL refiner ADM")."""
    return REFINER_NEGATIVE_AESTHETIC if prompt_type == "negative" else REFINER_POSITIVE_AESTHETIC


def refiner_time_ids(width: int, height: int, aesthetic_score: float) -> tuple[float, float, float, float, float]:
    """``[h, w, 0, 0, aesthetic]``: the SDXL refiner's 5 numbers, no timed switch (spec §4)."""
    return (float(height), float(width), 0.0, 0.0, float(aesthetic_score))


def refiner_adm_vector(pooled: torch.Tensor, width: int, height: int, prompt_type: PromptType) -> torch.Tensor:
    """The refiner's ``y``: ``cat(pooled G 1280, 5×256)`` -> [B, 2560] (spec §4)."""
    numbers = refiner_time_ids(width, height, refiner_aesthetic_score(prompt_type))
    emb = _embed_numbers(numbers, pooled.device).to(pooled.dtype)
    return torch.cat([pooled, emb.expand(pooled.shape[0], -1)], dim=1)
