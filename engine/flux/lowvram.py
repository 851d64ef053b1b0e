"""The FLUX.1 low-VRAM path (issue 17; ``settings.low_vram``, ``--low-vram``): every weight lives in
CPU memory and visits the device only for its own forward pass, so FLUX.1 [dev] (a 12B transformer,
23.8 GB in bf16, and a 4.7B T5-XXL, 9.5 GB) runs on a 24 GB card.

Done with diffusers' group offloading (``diffusers.hooks.apply_group_offloading``), the library's
hook for exactly this, rather than hand-written streaming:

- the transformer, block level, one block per group: its 19 double and 38 single blocks (≈ 0.3–0.7 GB
  each in bf16) are streamed one at a time; the embedders and the output head form one small group;
- T5-XXL, block level on its encoder stack (``T5EncoderModel.encoder``): one of its 24 blocks on the
  device at a time while a prompt is encoded, nothing after (the T5 weights are off the device once
  the prompt is encoded);
- CLIP-L (0.25 GB) as one group, on the device only while it encodes;
- the VAE at leaf level: its decode path (``decode``/``tiled_decode``) does not go through
  ``forward``, so the hooks sit on each leaf layer.

Why no CUDA side streams (``use_stream``): with streams diffusers keeps a separate pinned copy of each
weight and onloads from it, so a LoRA merged in place into a weight that has not been onloaded yet
would be lost (engine/flux/lora.py merges in place, between jobs). Without streams a weight's one
CPU tensor is what is onloaded, and in-place merges and restores stay exact; the transfers are not
overlapped with compute (slower, the price of this mode).

The hooks move their inputs to the onload device and change no arithmetic, so the latents are those
of the normal path bit for bit (tests/flux/test_flux_lowvram.py, on the CPU with onload = offload =
cpu, which is what diffusers allows there).
"""

from __future__ import annotations

import torch

from engine.flux.components import FluxComponents

#: Blocks per transformer / T5 group: one, the least memory (a group is the unit that is on the device).
BLOCKS_PER_GROUP = 1
#: The hook name diffusers registers group offloading under (``diffusers.hooks.group_offloading``).
GROUP_OFFLOADING_HOOK = "group_offloading"


def apply_flux_low_vram(components: FluxComponents, device: torch.device | str) -> None:
    """Install the offloading hooks on ``components`` (whose weights must be on the CPU) so each part
    runs on ``device``; see the module docstring. Idempotent: modules already hooked are left alone."""
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(device)
    offload = torch.device("cpu")
    t5 = components.text_encoder_2
    parts = (
        (components.transformer, "block_level"),
        (getattr(t5, "encoder", t5), "block_level"),  # T5EncoderModel's block list sits in its encoder stack
        (components.text_encoder, "block_level"),  # no block list at its top: one group, the whole CLIP-L
        (components.vae, "leaf_level"),
    )
    for module, offload_type in parts:
        if has_group_offloading(module):
            continue
        apply_group_offloading(module, onload_device=onload, offload_device=offload, offload_type=offload_type,
                               num_blocks_per_group=BLOCKS_PER_GROUP if offload_type == "block_level" else None,
                               use_stream=False)


def remove_flux_low_vram(components: FluxComponents) -> None:
    """Take the hooks off again (the weights stay on the CPU, where the hooks leave them after each
    forward); the GPU benchmark runs diffusers' own offload on the same modules afterwards."""

    for module in (components.transformer, components.text_encoder_2, components.text_encoder, components.vae):
        if has_group_offloading(module):
            for sub in module.modules():
                registry = getattr(sub, "_diffusers_hook", None)
                if registry is not None:
                    registry.remove_hook(GROUP_OFFLOADING_HOOK, recurse=False)


def has_group_offloading(module: torch.nn.Module) -> bool:
    """True when diffusers' group-offloading hook is installed on ``module`` or one of its submodules."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(GROUP_OFFLOADING_HOOK) is not None:
            return True
    return False
