"""The IP-Adapter "plus" models and the image → per-layer tokens path (spec §12.3, §12.4).

- the CLIP ViT-H vision encoder (transformers ``CLIPVisionModel``): its penultimate hidden states
  (``hidden_states[-2]``) on the 224×224 image, normalised with the CLIP mean/std;
- the Resampler (diffusers' ``IPAdapterPlusImageProjection``: the IP-Adapter repository's perceiver
  resampler; for SDXL plus: 4 layers, 20 heads of 64, 1280 wide, 16 queries, 2048 out) → ``cond`` tokens;
- :class:`IPAdapterKV`: the adapter's ``to_k_ip``/``to_v_ip`` linears, one pair per attn2 layer in
  Fooocus order, turning tokens into that layer's keys and values;
- the learned negative-image tokens (``fooocus_ip_negative.safetensors['data']``, already in token
  space) go through the same ``to_k_ip``/``to_v_ip`` for the uncond rows.

:func:`build_tiny_ip_adapter` makes a random, seeded tiny version from config for tests and the demo
engine; loading the real converted weights is the set-up's job (later work).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.sdxl.ip_adapter.attention import ImagePromptKV
from engine.sdxl.ip_adapter.hook import attn2_processor_names

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IPAdapterKV",
    "IPAdapterModels",
    "build_tiny_ip_adapter",
    "clip_pixel_values",
    "image_prompt_layers",
    "unet_attn2_widths",
]

#: spec §12.4: CLIP's pixel normalisation. The spec prints them to 4 decimals; these are the full
#: OpenAI CLIP constants that CLIP image preprocessing (Fooocus's included) uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class IPAdapterKV(nn.Module):
    """``to_k_ip``/``to_v_ip`` for every attn2 layer: ``kv[2i]`` keys and ``kv[2i+1]`` values of layer i."""

    def __init__(self, token_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.kv = nn.ModuleList(nn.Linear(token_dim, width, bias=False) for width in widths for _ in range(2))

    @property
    def layer_count(self) -> int:
        return len(self.kv) // 2

    def forward(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv[2 * i](tokens), self.kv[2 * i + 1](tokens)) for i in range(self.layer_count)]


@dataclass
class IPAdapterModels:
    """One IP-Adapter with its vision encoder and negative tokens, ready to turn images into tokens."""

    vision: nn.Module  # transformers CLIPVisionModel
    resampler: nn.Module  # diffusers IPAdapterPlusImageProjection
    kv: IPAdapterKV
    negative_tokens: torch.Tensor  # [1, num_queries, token_dim]


def unet_attn2_widths(unet: nn.Module) -> list[int]:
    """The output width of each attn2 layer's key projection (its channel C), Fooocus order."""
    modules = dict(unet.named_modules())
    return [modules[name.removesuffix(".processor")].to_k.out_features for name in attn2_processor_names(unet)]


def clip_pixel_values(image: np.ndarray) -> torch.Tensor:
    """A 224×224 RGB ``uint8`` image (already stretched, spec §12.3) → ``[1, 3, 224, 224]`` float32
    normalised with the CLIP mean/std."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.shape} {image.dtype}")
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def image_prompt_layers(models: IPAdapterModels, image: np.ndarray, *, stop_at: float,
                        weight: float) -> list[ImagePromptKV]:
    """One image prompt's keys/values at every attn2 layer (Fooocus order), cond from the image and
    uncond from the negative tokens."""
    param = next(models.resampler.parameters())
    pixels = clip_pixel_values(image).to(device=param.device, dtype=param.dtype)
    hidden = models.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    cond = models.resampler(hidden)
    uncond = models.negative_tokens.to(cond)
    return [ImagePromptKV(k_c, v_c, k_u, v_u, stop_at=stop_at, weight=weight)
            for (k_c, v_c), (k_u, v_u) in zip(models.kv(cond), models.kv(uncond), strict=True)]


@torch.no_grad()
def _seeded_init(module: nn.Module, tag: str) -> None:
    """Fan-in scaled normal weights from one generator per tensor (same on every machine)."""
    for name, param in module.named_parameters():
        seed = int.from_bytes(hashlib.sha256(f"{tag}/{name}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        if param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=g) / param.shape[-1] ** 0.5)
        elif name.endswith("weight"):  # norm scales
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=g))
        else:
            param.copy_(0.02 * torch.randn(param.shape, generator=g))


def build_tiny_ip_adapter(unet: nn.Module, *, token_dim: int | None = None, seed_tag: str = "hooocus-tiny-ip") -> IPAdapterModels:
    """A tiny random IP-Adapter "plus" for ``unet`` (any UNet with attn2 layers), from config only.

    Same shapes of computation as the SDXL one, shrunk: a 2-layer CLIP vision model on 224² with
    32-pixel patches, a 1-layer resampler with 4 queries, and one k/v pair per attn2 layer of ``unet``.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModel

    token_dim = token_dim or unet.config.cross_attention_dim
    vision_width = 32
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=224, patch_size=32,
                                              projection_dim=vision_width))
    resampler = IPAdapterPlusImageProjection(embed_dims=vision_width, output_dims=token_dim, hidden_dims=32, depth=1,
                                             dim_head=8, heads=4, num_queries=4, ffn_ratio=2)
    kv = IPAdapterKV(token_dim, unet_attn2_widths(unet))
    for part, module in (("vision", vision), ("resampler", resampler), ("kv", kv)):
        _seeded_init(module, f"{seed_tag}/{part}")
        module.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed_tag}/negative".encode()).digest()[:8],
                                                     "little"))
    negative = torch.randn(1, 4, token_dim, generator=g)
    return IPAdapterModels(vision=vision, resampler=resampler, kv=kv, negative_tokens=negative)
