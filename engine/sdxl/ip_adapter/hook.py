"""Installing Fooocus's IP-Adapter attention on a diffusers SDXL UNet (spec §12.4).

Every cross-attention (``attn2``) layer gets a :class:`FooocusIPAttnProcessor` through diffusers'
attention-processor hooks (``Attention.set_processor``); the processor computes q/k/v with the
layer's own projections and runs :func:`~engine.sdxl.ip_adapter.attention.fooocus_ip_attention`,
not diffusers' decoupled IP-Adapter math.

Layer order: Fooocus numbers the 70 SDXL attn2 layers (``ip_index``) as input blocks 4, 5, 7, 8,
output blocks 0–5, then the middle block (the order of the adapter's ``to_k_ip``/``to_v_ip`` weights).
diffusers registers ``down_blocks``, ``up_blocks`` and then ``mid_block``, so its
``attn_processors`` order of attn2 layers is the same; :func:`ldm_attn2_to_diffusers` maps Fooocus's
``(block, index, transformer)`` keys and ``tests/golden/test_ip_adapter_layers.py`` checks both
against the recorded order on the SDXL UNet config.

Per UNet call the caller updates :class:`IPAdapterState`: ``progress`` (Fooocus's
``1 − timestep/999``; :func:`install` also sets it from the UNet's ``timestep`` argument) and
``cond_or_uncond`` (one code per batch chunk: the denoiser's [negative, positive] batch is
``[1, 0]``). Prompts whose ``stop_at`` has passed add nothing, so the layer is then plain attention;
:meth:`IPAdapterHook.remove` puts the original processors back (at the refiner swap or job end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.sdxl.ip_adapter.attention import COND, UNCOND, ImagePromptKV, fooocus_ip_attention

__all__ = [
    "IPAdapterHook",
    "IPAdapterState",
    "FooocusIPAttnProcessor",
    "attn2_processor_names",
    "install",
    "ldm_attn2_to_diffusers",
    "progress_of_timestep",
]

#: spec §12.4 / Fooocus: progress (``current_step``) = 1 − timestep / 999.
_LAST_TIMESTEP = 999.0


def progress_of_timestep(timestep: float) -> float:
    """Fooocus's sampling progress at a UNet timestep (0 at t = 999, 1 at t = 0)."""
    return 1.0 - float(timestep) / _LAST_TIMESTEP


def ldm_attn2_to_diffusers(block: str, index: int, transformer: int, *, layers_per_block: int = 2) -> str:
    """The diffusers processor name of the ldm attn2 layer ``(block, index, transformer)``.

    ldm numbers input blocks 1.. as ``layers_per_block`` layers then a downsample per level (0 is
    conv_in), output blocks as ``layers_per_block + 1`` layers per level, and has one middle
    transformer (``middle`` index 0).
    """
    if block == "input":
        level, layer = divmod(index - 1, layers_per_block + 1)
        if index < 1 or layer >= layers_per_block:
            raise ValueError(f"input block {index} has no attention (conv_in or a downsample)")
        prefix = f"down_blocks.{level}.attentions.{layer}"
    elif block == "output":
        level, layer = divmod(index, layers_per_block + 1)
        prefix = f"up_blocks.{level}.attentions.{layer}"
    elif block == "middle":
        if index != 0:
            raise ValueError(f"the middle block has one transformer, not index {index}")
        prefix = "mid_block.attentions.0"
    else:
        raise ValueError(f"block must be input, output or middle, not {block!r}")
    return f"{prefix}.transformer_blocks.{transformer}.attn2.processor"


def attn2_processor_names(unet: nn.Module) -> list[str]:
    """The UNet's cross-attention processor names in diffusers' registration order (= Fooocus's)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@dataclass
class IPAdapterState:
    """What the processors read on each call; one per installed hook.

    ``prompts_per_layer[i]`` holds every image prompt's :class:`ImagePromptKV` at attn2 layer ``i``
    (Fooocus order), all layers listing the prompts in the same order.
    """

    prompts_per_layer: list[list[ImagePromptKV]]
    progress: float = 0.0
    cond_or_uncond: list[int] = field(default_factory=lambda: [UNCOND, COND])

    def any_active(self) -> bool:
        return any(p.active(self.progress) for layer in self.prompts_per_layer for p in layer)


class FooocusIPAttnProcessor:
    """A diffusers attention processor for one attn2 layer: Fooocus's one-softmax IP attention.

    Mirrors diffusers' ``AttnProcessor2_0`` for everything around the attention itself (the SDXL
    attn2 layers use none of its optional parts: no spatial/group norm, no mask, no residual), and
    refuses the parts it does not implement rather than ignore them.
    """

    def __init__(self, state: IPAdapterState, ip_index: int) -> None:
        self.state = state
        self.ip_index = ip_index

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attention_mask is not None:
            raise ValueError("the IP-Adapter processor serves SDXL cross-attention only "
                             "(3-D hidden states, a context, no attention mask)")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
                or attn.norm_k is not None:
            raise ValueError("the IP-Adapter processor does not implement this attention layer's norms")
        residual = hidden_states
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        state = self.state
        out = fooocus_ip_attention(q, k, v, state.prompts_per_layer[self.ip_index], state.cond_or_uncond,
                                   state.progress, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class IPAdapterHook:
    """The installed processors of one UNet; :meth:`remove` restores what was there before."""

    def __init__(self, unet: nn.Module, state: IPAdapterState, originals: dict[str, Any],
                 pre_hook: torch.utils.hooks.RemovableHandle) -> None:
        self.unet = unet
        self.state = state
        self._originals = originals
        self._pre_hook: torch.utils.hooks.RemovableHandle | None = pre_hook

    @property
    def installed(self) -> bool:
        return self._pre_hook is not None

    def remove(self) -> None:
        """Put the original attn2 processors back; safe to call twice."""
        if self._pre_hook is None:
            return
        self._pre_hook.remove()
        self._pre_hook = None
        modules = dict(self.unet.named_modules())
        for name, processor in self._originals.items():
            modules[name.removesuffix(".processor")].set_processor(processor)


def install(unet: nn.Module, prompts_per_layer: Sequence[Sequence[ImagePromptKV]], *,
            cond_or_uncond: Sequence[int] = (UNCOND, COND)) -> IPAdapterHook:
    """Put a :class:`FooocusIPAttnProcessor` on each of the UNet's attn2 layers (Fooocus order).

    ``prompts_per_layer`` has one list per attn2 layer (70 for SDXL). A forward pre-hook sets the
    state's ``progress`` from the UNet's ``timestep`` argument on every call (the first entry: the
    whole batch shares one timestep in Fooocus's sampler).
    """
    names = attn2_processor_names(unet)
    if len(prompts_per_layer) != len(names):
        raise ValueError(f"{len(prompts_per_layer)} layers of image-prompt tokens for a UNet with "
                         f"{len(names)} cross-attention layers")
    state = IPAdapterState([list(layer) for layer in prompts_per_layer], cond_or_uncond=list(cond_or_uncond))
    current = unet.attn_processors
    originals = {name: current[name] for name in names}
    modules = dict(unet.named_modules())
    for ip_index, name in enumerate(names):
        modules[name.removesuffix(".processor")].set_processor(FooocusIPAttnProcessor(state, ip_index))

    def set_progress(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None:
            state.progress = progress_of_timestep(float(torch.as_tensor(timestep).reshape(-1)[0]))

    handle = unet.register_forward_pre_hook(set_progress, with_kwargs=True)
    return IPAdapterHook(unet, state, originals, handle)
