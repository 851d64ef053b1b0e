"""Which model family a model spec is: FLUX.1 or SDXL, decided from the weights' layout, never by
downloading (issue 17). Family-neutral (engine/io), so the runtime, both runners and the CLI use it.

Cheap enough for start-up: a diffusers folder's ``model_index.json`` names its pipeline class; a
safetensors file's header (the tensor names, no tensor data) has FLUX.1's transformer blocks in the
Black Forest Labs / ComfyUI layout (``double_blocks.N`` / ``single_blocks.N``, maybe under
``model.diffusion_model.``) or diffusers' (``single_transformer_blocks.N``). Anything else (an SDXL
checkpoint, a name in the model folders, an HF repo id) is not Flux here; the SDXL runner decides.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Literal

from engine.core.constants import DEMO_FLUX_MODELS

ModelFamily = Literal["sdxl", "flux"]

#: Tensor-name prefixes only a FLUX.1 transformer has (after stripping an all-in-one file's prefix).
_FLUX_KEY_PREFIXES = ("double_blocks.", "single_blocks.", "single_transformer_blocks.")
_WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
#: A safetensors header is JSON of a few MB at most even for an all-in-one checkpoint.
MAX_HEADER_BYTES = 64 * 1024 * 1024


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only ([] if it is not one)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return []
            (size,) = struct.unpack("<Q", head)
            if size <= 0 or size > MAX_HEADER_BYTES:
                return []
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return []
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else []


def is_flux_state_dict_keys(keys: list[str]) -> bool:
    for key in keys:
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(_FLUX_KEY_PREFIXES):
            return True
    return False


def is_flux_spec(spec: str | os.PathLike[str] | None) -> bool:
    """True for the built-in demo-flux names, a diffusers FluxPipeline folder, or a FLUX.1 safetensors file."""
    if spec is None:
        return False
    if str(spec) in DEMO_FLUX_MODELS:
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        try:
            return "Flux" in str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
        except (OSError, ValueError, AttributeError):
            return False
    if path.is_file() and path.suffix == ".safetensors":
        return is_flux_state_dict_keys(safetensors_keys(path))
    return False


def model_family(spec: str | os.PathLike[str] | None) -> ModelFamily:
    """"flux" for a FLUX.1 model (see :func:`is_flux_spec`), else "sdxl"."""
    return "flux" if is_flux_spec(spec) else "sdxl"
