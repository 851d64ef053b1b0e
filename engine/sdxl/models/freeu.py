"""FreeU V2 on the UNet decoder (spec §11.4).

For every decoder step that concatenates the backbone feature ``h`` with a skip feature ``hsp``:
if ``h`` has 4× the first block's channels use (b1, s1), if 2× use (b2, s2), else leave both alone.
The first half of ``h``'s channels is scaled by ``(b − 1)·m + 1``, with ``m`` the channel mean of
``h`` min-max normalised per image; ``hsp`` gets its lowest 2×2 FFT frequencies scaled by ``s``.

diffusers' own ``unet.enable_freeu`` is FreeU *V1* (a constant ``b`` on the half channels) and picks
the factors by up-block index rather than by ``h``'s channels (the first resnet of up block 1 sees
a 1280-channel ``h`` and Fooocus uses b1 there), so we hook the up-block resnets ourselves:
diffusers calls each of them with ``cat([h, hsp])``, exactly the point where Fooocus patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def fourier_filter(x: Tensor, *, threshold: int, scale: float) -> Tensor:
    """Scale the centred ``2·threshold`` square of low frequencies of ``x`` [B, C, H, W] by ``scale``.

    Computed in float32 (FFTs of half precision are unsupported or unstable), returned in x's dtype.
    """
    # Adapted from diffusers (Apache-2.0) utils/torch_utils.py fourier_filter.
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = freq.shape[-2:]
    mask = torch.ones(freq.shape[-2:], device=x.device)
    row, col = height // 2, width // 2
    mask[row - threshold:row + threshold, col - threshold:col + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def freeu_v2_backbone(h: Tensor, b: float) -> Tensor:
    """Scale the first half of ``h``'s channels by ``(b − 1)·m + 1``, m = min-max normalised channel mean."""
    mean = h.mean(dim=1, keepdim=True)  # [B, 1, H, W]
    flat = mean.flatten(1)
    low = flat.min(dim=1).values[:, None, None, None]
    high = flat.max(dim=1).values[:, None, None, None]
    mean = (mean - low) / (high - low)
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * ((b - 1.0) * mean + 1.0), h[:, half:]], dim=1)


def freeu_v2_output_block(h: Tensor, hsp: Tensor, *, model_channels: int, b1: float, b2: float,
                          s1: float, s2: float) -> tuple[Tensor, Tensor]:
    """Fooocus/ComfyUI ``FreeU_V2`` output-block patch on one (h, skip) pair (spec §11.4)."""
    channels = h.shape[1]
    if channels == model_channels * 4:
        b, s = b1, s1
    elif channels == model_channels * 2:
        b, s = b2, s2
    else:
        return h, hsp
    return freeu_v2_backbone(h, b), fourier_filter(hsp, threshold=1, scale=s)


@dataclass
class FreeUHooks:
    """The hooks FreeU V2 installed on a UNet; :meth:`remove` takes them all off again."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def apply_freeu_v2(unet: nn.Module, *, b1: float, b2: float, s1: float, s2: float) -> FreeUHooks:
    """Install FreeU V2 on a diffusers ``UNet2DConditionModel``'s decoder; returns removable hooks.

    Each up-block resnet receives ``cat([h, hsp])``; a forward pre-hook splits that input at ``h``'s
    channel count (known from the block layout), applies :func:`freeu_v2_output_block` and
    concatenates again.
    """
    model_channels = int(unet.config.block_out_channels[0])
    hooks = FreeUHooks()
    h_channels = int(unet.config.block_out_channels[-1])  # the mid block's output feeds up block 0
    for block in unet.up_blocks:
        for index, resnet in enumerate(block.resnets):
            if index > 0:
                h_channels = int(resnet.out_channels)
            if h_channels in (model_channels * 4, model_channels * 2):
                hooks.handles.append(resnet.register_forward_pre_hook(
                    _make_split_hook(h_channels, model_channels, b1=b1, b2=b2, s1=s1, s2=s2)))
        h_channels = int(block.resnets[-1].out_channels)
    return hooks


def _make_split_hook(h_channels: int, model_channels: int, **factors: float) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        joined = args[0]
        h, hsp = joined[:, :h_channels], joined[:, h_channels:]
        h, hsp = freeu_v2_output_block(h, hsp, model_channels=model_channels, **factors)
        return (torch.cat([h, hsp], dim=1), *args[1:])
    return hook
