"""Random SDXL LoRA files for tests: kohya-named q/k/v LoRAs on a UNet (what a real SDXL LoRA touches),
shaped by the UNet's own attention layers, so the real loader, matcher and merge run on them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def write_qkv_lora(unet: torch.nn.Module, path: Path, *, seed: int, scale: float, rank: int = 4) -> Path:
    """A kohya ``lora_unet_*`` file with random rank-``rank`` up/down pairs (times ``scale``) on every
    attention ``to_q``/``to_k``/``to_v`` of ``unet`` (an unfused diffusers UNet)."""
    from engine.sdxl.models.lora import unet_lora_key_map

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, (_component, module) in unet_lora_key_map(unet).items():
        if key.startswith("lora_unet_") and module.endswith((".to_q", ".to_k", ".to_v")):
            layer = unet.get_submodule(module)
            tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=gen) * scale
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=gen) * scale
    assert tensors, "the UNet has no attention q/k/v layers the LoRA key map names"
    save_file(tensors, str(path))
    return path
