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
engine. :func:`load_ip_adapter` builds the resampler, the k/v layers and the negative tokens from the
IP-Adapter file's layout (``image_proj.*``, ``ip_adapter.<n>.to_{k,v}_ip.weight``) once the set-up has
converted the released pickle to safetensors; :func:`load_clip_vision` builds the vision encoder
from a transformers-layout CLIP vision state dict.
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
    "load_clip_vision",
    "load_ip_adapter",
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
    32-pixel patches, a 4-layer one-head resampler with 4 queries, and one k/v pair per attn2 layer of ``unet``.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModel

    token_dim = token_dim or unet.config.cross_attention_dim
    vision_width = 32
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=224, patch_size=32,
                                              projection_dim=vision_width, hidden_act="gelu"))
    # Depth 4, 64-wide heads and ffn ratio 4 as in the SDXL plus resampler (diffusers' converter of the
    # IP-Adapter layout assumes them), only one head and 64 channels wide.
    resampler = IPAdapterPlusImageProjection(embed_dims=vision_width, output_dims=token_dim, hidden_dims=64, depth=4,
                                             dim_head=64, heads=1, num_queries=4, ffn_ratio=4)
    kv = IPAdapterKV(token_dim, unet_attn2_widths(unet))
    for part, module in (("vision", vision), ("resampler", resampler), ("kv", kv)):
        _seeded_init(module, f"{seed_tag}/{part}")
        module.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed_tag}/negative".encode()).digest()[:8],
                                                     "little"))
    negative = torch.randn(1, 4, token_dim, generator=g)
    return IPAdapterModels(vision=vision, resampler=resampler, kv=kv, negative_tokens=negative)


_IMAGE_PROJ, _IP_ADAPTER = "image_proj.", "ip_adapter."


def _ip_layer_indices(state_dict: dict[str, torch.Tensor]) -> list[int]:
    """The adapter's attention indices with a ``to_k_ip`` weight, ascending (the IP-Adapter numbers all
    attention processors, attn1 included, so SDXL's 70 attn2 layers are 1, 3, …, 139)."""
    indices = []
    for key in state_dict:
        if key.startswith(_IP_ADAPTER) and key.endswith(".to_k_ip.weight"):
            indices.append(int(key[len(_IP_ADAPTER):].split(".")[0]))
    return sorted(indices)


@torch.no_grad()
def load_ip_adapter(unet: nn.Module, state_dict: dict[str, torch.Tensor], negative_tokens: torch.Tensor, *,
                    vision: nn.Module) -> IPAdapterModels:
    """An :class:`IPAdapterModels` from a "plus" IP-Adapter state dict (flat ``image_proj.*`` /
    ``ip_adapter.*`` keys) and Fooocus's negative tokens (``fooocus_ip_negative``'s ``data``).

    The resampler goes through diffusers' own IP-Adapter-plus converter (exact key renaming, strict
    load). The k/v pairs are taken in ascending attention index, which is Fooocus's layer order; their
    count and widths must match the UNet's attn2 layers. Raises ValueError when they do not.
    """
    proj = {k[len(_IMAGE_PROJ):]: v for k, v in state_dict.items() if k.startswith(_IMAGE_PROJ)}
    if "latents" not in proj:
        raise ValueError("not an IP-Adapter plus state dict: no image_proj.latents")
    resampler = unet._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False)
    widths = unet_attn2_widths(unet)
    indices = _ip_layer_indices(state_dict)
    if len(indices) != len(widths):
        raise ValueError(f"the IP-Adapter has {len(indices)} k/v layers, the UNet {len(widths)} attn2 layers")
    token_dim = int(proj["proj_out.weight"].shape[0])
    kv = IPAdapterKV(token_dim, widths)
    for layer, index in enumerate(indices):
        for slot, name in ((2 * layer, "k"), (2 * layer + 1, "v")):
            weight = state_dict[f"{_IP_ADAPTER}{index}.to_{name}_ip.weight"]
            if tuple(weight.shape) != tuple(kv.kv[slot].weight.shape):
                raise ValueError(f"ip_adapter.{index}.to_{name}_ip.weight is {tuple(weight.shape)}, layer {layer} "
                                 f"needs {tuple(kv.kv[slot].weight.shape)}")
            kv.kv[slot].weight.copy_(weight)
    negative = negative_tokens.reshape(1, -1, token_dim).float()
    for module in (resampler, kv):
        module.eval().requires_grad_(False)
    return IPAdapterModels(vision=vision, resampler=resampler, kv=kv, negative_tokens=negative)


def load_clip_vision(state_dict: dict[str, torch.Tensor], *, num_attention_heads: int = 16) -> nn.Module:
    """A transformers ``CLIPVisionModel`` sized from a CLIP vision state dict in transformers' layout,
    with or without the ``vision_model.`` prefix (released files have it; transformers 5's
    ``CLIPVisionModel`` does not).

    Sizes come from the tensors; the head count does not show in any shape, so it is an argument
    (16 for OpenCLIP ViT-H/14, the encoder of the SDXL plus adapters). Keys outside the vision tower
    (``visual_projection``, unused by the plus adapters) are ignored; missing ones raise ValueError.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    prefix = "vision_model."
    tower = {k.removeprefix(prefix): v for k, v in state_dict.items()
             if (k.startswith(prefix) or not k.startswith("visual_projection")) and not k.endswith("position_ids")}
    try:
        patch = tower["embeddings.patch_embedding.weight"]
        positions = tower["embeddings.position_embedding.weight"].shape[0]
        intermediate = tower["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a CLIP vision state dict: no {exc.args[0]}") from None
    layers = 1 + max(int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers."))
    grid = round((positions - 1) ** 0.5)
    config = CLIPVisionConfig(hidden_size=int(patch.shape[0]), patch_size=int(patch.shape[2]),
                              image_size=grid * int(patch.shape[2]), num_hidden_layers=layers,
                              intermediate_size=int(intermediate), num_attention_heads=num_attention_heads,
                              hidden_act="gelu")
    model = CLIPVisionModel(config)
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in tower and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"CLIP vision state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: v for k, v in tower.items() if k in expected}, strict=False)
    return model.eval().requires_grad_(False)
