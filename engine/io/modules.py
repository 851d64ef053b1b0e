"""Filling a module built on the meta device with a file's tensors: shared by the SDXL and Flux
loaders and their demo models (family-neutral; torch is imported by the callers' packages anyway)."""

from __future__ import annotations

import logging

import torch

from engine.core.errors import ModelInvalid

log = logging.getLogger("hooocus.loading")


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], component: str, *,
                 source: str = "file") -> None:
    """Assign ``state`` to ``model`` (``assign=True``: no copy), then rebuild its position ids and put it in
    eval mode with gradients off. ``model_invalid`` for a shape mismatch or missing tensors (naming
    ``source``: "file", "checkpoint"); extra tensors are logged and ignored."""
    state = {k: v.contiguous() for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise ModelInvalid(f"the {component} tensors do not match the architecture: {detail[:300]}") from None
    if result.missing_keys:
        raise ModelInvalid(f"the {source} lacks {len(result.missing_keys)} {component} tensors "
                           f"(e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        log.info("%s: ignoring %d extra tensors (e.g. %s)", component, len(result.unexpected_keys),
                 ", ".join(result.unexpected_keys[:3]))
    rebuild_position_ids(model)
    model.eval().requires_grad_(False)


def rebuild_position_ids(model: torch.nn.Module) -> None:
    """Give CLIP's non-persistent ``position_ids`` buffer (left on meta by a meta-device build, or
    uninitialised by ``to_empty``) its value ``arange(n)``, on the device of the parameters."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    for module in model.modules():
        buffer = module._buffers.get("position_ids")
        if buffer is not None:
            module._buffers["position_ids"] = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
    leftover = [name for name, b in model.named_buffers() if b.is_meta and device.type != "meta"]
    if leftover:
        raise ModelInvalid(f"internal: buffers {leftover[:3]} were not initialised")
