"""Fooocus's IP-Adapter cross-attention, as pure tensor functions (spec §12.4).

This is *not* diffusers' decoupled IP-Adapter (``attn(q, k_t, v_t) + s·attn(q, k_i, v_i)``). Fooocus
appends each image prompt's projected tokens to the text keys and values of every patched attn2 layer
and runs ONE softmax over text + image tokens, after two rescalings (spec §12.4):

- channel penalty: ``w = weight · C / 1280`` where C is the layer's channel width (640 or 1280), so
  the 640-wide layers get half the weight;
- keys: ``k_ip = ip_k · w``;
- values, mean-preserving: ``v_ip = (ip_v − mean_tokens(ip_v)) + mean_tokens(ip_v) · w``, so the weight
  scales only the tokens' shared mean and keeps their spread.

Each batch row takes the image tokens (cond) or the learned negative-image tokens (uncond) as its
``cond_or_uncond`` entry says (0 → cond, 1 → uncond, Fooocus's convention). An image prompt joins
only while ``progress < stop_at``; several prompts concatenate their tokens in order.

Note that ``weight = 0`` does not switch a prompt off: its keys become 0, so its tokens still take
softmax mass (logit 0 each) while their values sum to zero (the offsets are mean-free); the text part
of the output shrinks by ``Z_text / (Z_text + n_tokens)``. That is Fooocus's behaviour and the golden
case ``out_3`` records it; a caller that wants "off" drops the prompt.

Checked against Fooocus's own patcher in ``tests/golden/test_ip_adapter_attention.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CHANNEL_PENALTY_WIDTH",
    "COND",
    "UNCOND",
    "ImagePromptKV",
    "attention",
    "fooocus_ip_attention",
    "image_prompt_kv",
    "rows_by_cond_or_uncond",
    "scale_image_tokens",
]

#: spec §12.4: the channel penalty divides the layer width by this (1280 = SDXL's widest attn2).
CHANNEL_PENALTY_WIDTH = 1280.0
#: Fooocus's cond_or_uncond codes for a batch row.
COND, UNCOND = 0, 1


@dataclass(frozen=True)
class ImagePromptKV:
    """One image prompt's projected tokens at ONE attention layer, with its schedule.

    ``k_cond``/``v_cond``: ``[1, T, C]`` from the image; ``k_uncond``/``v_uncond``: ``[1, T, C]`` from the
    learned negative-image embedding. ``stop_at`` in 0..1 (progress), ``weight`` in 0..2.
    """

    k_cond: torch.Tensor
    v_cond: torch.Tensor
    k_uncond: torch.Tensor
    v_uncond: torch.Tensor
    stop_at: float
    weight: float

    def active(self, progress: float) -> bool:
        """spec §12.4: the prompt takes part while ``progress < stop_at``."""
        return progress < self.stop_at


def rows_by_cond_or_uncond(cond: torch.Tensor, uncond: torch.Tensor, cond_or_uncond: Sequence[int],
                           rows_per_entry: int = 1) -> torch.Tensor:
    """Stack ``cond`` or ``uncond`` (each ``[1, T, C]``) per entry of ``cond_or_uncond`` along the batch,
    each entry covering ``rows_per_entry`` rows (a UNet batch is chunks of equal size, one per branch)."""
    choices = (cond, uncond)
    for code in cond_or_uncond:
        if code not in (COND, UNCOND):
            raise ValueError(f"cond_or_uncond entries must be {COND} (cond) or {UNCOND} (uncond), got {code!r}")
    return torch.cat([choices[code].expand(rows_per_entry, -1, -1) for code in cond_or_uncond], dim=0)


def scale_image_tokens(ip_k: torch.Tensor, ip_v: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """spec §12.4: the channel-penalised weight on the keys and the mean-preserving V scaling.

    ``ip_k``/``ip_v``: ``[B, T, C]``; C (the last dim) is the layer width the penalty uses.
    """
    channels = ip_k.shape[-1]
    w = float(weight) * (float(channels) / CHANNEL_PENALTY_WIDTH)
    v_mean = torch.mean(ip_v, dim=1, keepdim=True)
    return ip_k * w, (ip_v - v_mean) + v_mean * w


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Multi-head scaled-dot-product attention on ``[B, N, C]`` tensors (no projections), ``[B, Nq, C]`` out."""
    batch, _, channels = q.shape
    if channels % n_heads:
        raise ValueError(f"{channels} channels do not split into {n_heads} heads")
    head_dim = channels // n_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, n_heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(batch, -1, channels)


def image_prompt_kv(prompts: Sequence[ImagePromptKV], cond_or_uncond: Sequence[int], progress: float,
                    *, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The scaled image keys and values of every active prompt, rows chosen per ``cond_or_uncond``
    (one entry per equal chunk of ``like``'s batch), cast to ``like``'s device and dtype (the layer's query); empty lists when none is active."""
    if not cond_or_uncond or like.shape[0] % len(cond_or_uncond):
        raise ValueError(f"cond_or_uncond has {len(cond_or_uncond)} entries for a batch of {like.shape[0]}: "
                         "each entry must cover the same number of rows")
    rows = like.shape[0] // len(cond_or_uncond)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for prompt in prompts:
        if not prompt.active(progress):
            continue
        ip_k = rows_by_cond_or_uncond(prompt.k_cond, prompt.k_uncond, cond_or_uncond, rows).to(like)
        ip_v = rows_by_cond_or_uncond(prompt.v_cond, prompt.v_uncond, cond_or_uncond, rows).to(like)
        k_ip, v_ip = scale_image_tokens(ip_k, ip_v, prompt.weight)
        keys.append(k_ip)
        values.append(v_ip)
    return keys, values


def fooocus_ip_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                         prompts: Sequence[ImagePromptKV], cond_or_uncond: Sequence[int], progress: float,
                         n_heads: int) -> torch.Tensor:
    """Fooocus's patched attn2 (spec §12.4): one softmax over the text tokens and the tokens of every
    image prompt active at ``progress``. ``q``: ``[B, Nq, C]``, ``k_text``/``v_text``: ``[B, Nt, C]``;
    ``cond_or_uncond`` has one entry per equal chunk of the batch (per row in Fooocus, whose latent
    batch is 1). With no active prompt this is plain attention.
    """
    keys, values = image_prompt_kv(prompts, cond_or_uncond, progress, like=q)
    k = torch.cat([k_text, *keys], dim=1)
    v = torch.cat([v_text, *values], dim=1)
    return attention(q, k, v, n_heads).to(q.dtype)
