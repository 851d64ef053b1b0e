"""Control-LoRA models (PyraCanny, CPDS) as diffusers ``ControlNetModel`` s (spec §12.3).

A Control-LoRA file (Stability's ``control-lora-*-rank128.safetensors``, Fooocus's
``fooocus_xl_cpds_128.safetensors``) stores a ControlNet as a difference from the SDXL UNet it runs
with: the ControlNet starts as a copy of the UNet's encoder (the current, LoRA-patched weights),
``<module>.up``/``<module>.down`` pairs add ``up·down`` to that module's weight (scale 1), every other
key (``input_hint_block``, ``zero_convs``, ``middle_block_out``, norms, biases, ...) replaces the
value outright, and the tensor ``lora_controlnet`` marks the format.

diffusers' ``ControlNetModel`` runs this architecture; ``ControlNetModel.from_unet`` makes the
encoder copy. diffusers' own Control-LoRA loader (``load_lora_adapter``) needs ``peft``, which this
project does not depend on, and keeps the LoRA unmerged; so the merge is done here, once per load,
with diffusers' single-file ControlNet converter giving the ldm → diffusers key names
(:func:`diffusers_key_map`). The result is a plain ControlNet: no per-step LoRA cost.

:func:`control_residuals` runs it for the positive rows only and applies softness and strength
(:mod:`engine.sdxl.control.softness`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.sdxl.control.softness import DEFAULT_SOFTNESS, scale_control_outputs

__all__ = [
    "CONTROL_LORA_MARKER",
    "build_control_lora",
    "control_hint",
    "control_residuals",
    "diffusers_key_map",
    "is_control_lora",
]

#: The key whose presence marks a Stability Control-LoRA state dict.
CONTROL_LORA_MARKER = "lora_controlnet"
_UP, _DOWN = ".up", ".down"
#: Parameters a ControlNet has and a UNet does not: a Control-LoRA must give each of them in full.
_CONTROL_ONLY_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
#: Fooocus's COND code for a positive-branch chunk of the batch.
_COND = 0


def is_control_lora(state_dict: Mapping[str, Any]) -> bool:
    return CONTROL_LORA_MARKER in state_dict


def _parameter_keys(keys: Iterable[str]) -> set[str]:
    """ldm parameter names a Control-LoRA touches: ``X.up``/``X.down`` stand for ``X.weight``."""
    out: set[str] = set()
    for key in keys:
        if key == CONTROL_LORA_MARKER:
            continue
        if key.endswith(_UP) or key.endswith(_DOWN):
            out.add(key.rsplit(".", 1)[0] + ".weight")
        else:
            out.add(key)
    return out


def diffusers_key_map(ldm_keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """ldm ControlNet parameter name → diffusers ``ControlNetModel`` parameter name.

    Runs diffusers' ``convert_controlnet_checkpoint`` on a dict whose values are the keys themselves,
    so the renaming is diffusers' and nothing is copied; a key it does not place raises ValueError.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    keys = sorted(set(ldm_keys))
    # The converter places some keys only beside their sibling (a downsampler's op.bias only when its
    # op.weight is present), and a Control-LoRA may store just one of them: tag both.
    tagged: dict[str, Any] = {}
    for key in keys:
        stem, _, leaf = key.rpartition(".")
        for name in (key, *((f"{stem}.weight", f"{stem}.bias") if leaf in ("weight", "bias") else ())):
            tagged[name] = name
    # The converter treats a dict with this key as a bare ControlNet (no "control_model." prefix).
    tagged.setdefault("time_embed.0.weight", "time_embed.0.weight")
    converted = convert_controlnet_checkpoint(tagged, dict(config))
    mapping = {ldm: new for new, ldm in converted.items() if isinstance(ldm, str)}
    # This diffusers release's converter leaves out SDXL's label_emb (the "text_time" add embedding);
    # its own mapping table has the names.
    if config.get("addition_embed_type"):
        extra = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        mapping.update({ldm: new for new, ldm in extra.items() if ldm in tagged})
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{len(missing)} Control-LoRA keys have no ControlNet parameter, e.g. {missing[:3]}")
    return {k: mapping[k] for k in keys}


@torch.no_grad()
def build_control_lora(unet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A diffusers ``ControlNetModel`` for ``unet`` with the Control-LoRA ``state_dict`` merged in.

    The hint channel count comes from the file's first hint conv. Raises ValueError for a file that
    is not a Control-LoRA, leaves a ControlNet-only parameter unset, or does not fit the UNet.
    """
    from diffusers import ControlNetModel

    if not is_control_lora(state_dict):
        raise ValueError(f"not a Control-LoRA: no {CONTROL_LORA_MARKER!r} key")
    hint = state_dict.get("input_hint_block.0.weight")
    if hint is None:
        raise ValueError("Control-LoRA has no input_hint_block.0.weight")
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=int(hint.shape[1]))
    params = dict(controlnet.named_parameters())
    names = diffusers_key_map(_parameter_keys(state_dict), controlnet.config)
    set_by_file: set[str] = set()
    for key, value in state_dict.items():
        if key == CONTROL_LORA_MARKER or key.endswith(_DOWN):
            continue
        if key.endswith(_UP):
            base = key[: -len(_UP)]
            target = params[names[base + ".weight"]]
            down = state_dict[base + _DOWN]
            delta = torch.mm(value.flatten(1).float(), down.flatten(1).float())
            if delta.numel() != target.numel():
                raise ValueError(f"{base}: LoRA delta {tuple(delta.shape)} does not fit {tuple(target.shape)}")
            target.add_(delta.reshape(target.shape).to(target.dtype))
        else:
            target = params[names[key]]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
        set_by_file.add(names[key if not key.endswith(_UP) else key[: -len(_UP)] + ".weight"])
    unset = [n for n in params if n.startswith(_CONTROL_ONLY_PREFIXES) and n not in set_by_file]
    if unset:
        raise ValueError(f"Control-LoRA leaves {len(unset)} ControlNet parameters unset, e.g. {unset[:3]}")
    return controlnet.eval().requires_grad_(False)


def control_hint(control_map: np.ndarray) -> torch.Tensor:
    """A preprocessor's ``uint8`` map (H×W or H×W×3, already at the generation size) → the ControlNet
    hint ``[1, 3, H, W]`` in 0..1 (grey maps repeated to 3 channels, as HWC3 does)."""
    if control_map.dtype != np.uint8 or control_map.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 H×W or H×W×3 map, got {control_map.shape} {control_map.dtype}")
    image = control_map if control_map.ndim == 3 else np.repeat(control_map[:, :, None], 3, axis=2)
    if image.shape[2] != 3:
        raise ValueError(f"expected 3 channels, got {image.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


@torch.no_grad()
def control_residuals(controlnet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, *,
                      encoder_hidden_states: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor],
                      hint: torch.Tensor, cond_or_uncond: Sequence[int], strength: float,
                      softness: float = DEFAULT_SOFTNESS) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The UNet's extra residuals from one control, for a batch of ``len(cond_or_uncond)`` equal chunks.

    The ControlNet runs on the positive chunks only (spec §12.3); the negative rows get zeros. Softness
    and strength are applied as Fooocus does. None when the batch has no positive chunk.
    """
    if not cond_or_uncond or sample.shape[0] % len(cond_or_uncond):
        raise ValueError(f"cond_or_uncond has {len(cond_or_uncond)} entries for a batch of {sample.shape[0]}")
    rows = sample.shape[0] // len(cond_or_uncond)
    keep = torch.tensor([code == _COND for code in cond_or_uncond]).repeat_interleave(rows)
    if not bool(keep.any()):
        return None
    index = keep.nonzero().flatten().to(sample.device)
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    timestep = timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep
    down, mid = controlnet(sample[index], timestep[index], encoder_hidden_states=encoder_hidden_states[index],
                           controlnet_cond=hint.to(sample).expand(len(index), -1, -1, -1), conditioning_scale=1.0,
                           added_cond_kwargs={k: v[index] for k, v in added_cond_kwargs.items()}, return_dict=False)
    down, mid = scale_control_outputs(list(down), mid, strength=strength, softness=softness)

    def scatter(t: torch.Tensor) -> torch.Tensor:
        full = t.new_zeros((sample.shape[0], *t.shape[1:]))
        full[index] = t
        return full

    return [scatter(t) for t in down], scatter(mid)
