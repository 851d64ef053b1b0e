"""Which model family a weights file or diffusers folder holds, from names alone (issue 17).

The runtime picks the SDXL or the Flux runner from this, so it reads only the safetensors header
(:func:`engine.io.safety.check_weight_file`) or ``model_index.json`` / ``transformer/config.json``
of a diffusers folder; no tensor data, no torch. Tensor names that identify each layout:

- FLUX.1, Black Forest Labs layout (``flux1-schnell.safetensors``): ``double_blocks.0.img_attn.qkv.weight``
  and ``single_blocks.*``; the ComfyUI all-in-one file puts the same names under
  ``model.diffusion_model.`` (next to ``text_encoders.clip_l.*``, ``text_encoders.t5xxl.*``, ``vae.*``);
- FLUX.1, diffusers layout (a transformer saved alone): ``transformer_blocks.0.attn.to_q.weight`` plus
  ``single_transformer_blocks.*`` plus ``x_embedder.*`` (SD3's MMDiT has no single blocks);
- dev vs schnell: FLUX.1 [dev] is guidance-distilled and has a guidance embedder
  (``guidance_in.*`` in BFL naming, ``time_text_embed.guidance_embedder.*`` in diffusers naming);
- SDXL (Stability layout): ``model.diffusion_model.input_blocks.*`` with ``conditioner.embedders.*``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.core.errors import ModelInvalid
from engine.io.safety import check_weight_file

Family = Literal["flux", "sdxl", "unknown"]
FluxLayout = Literal["bfl", "comfy_all_in_one", "diffusers_transformer", "diffusers_folder"]

#: Prefixes under which a transformer's own names may sit in a single file.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_BFL_MARK = "double_blocks.0.img_attn.qkv.weight"
_BFL_SINGLE = "single_blocks."
_DIFFUSERS_MARK = "transformer_blocks.0.attn.to_q.weight"
_DIFFUSERS_SINGLE = "single_transformer_blocks."
_DIFFUSERS_EMBEDDER = "x_embedder."
_GUIDANCE = ("guidance_in.", "time_text_embed.guidance_embedder.")
_SDXL_UNET = "model.diffusion_model.input_blocks."
_SDXL_CONDITIONER = "conditioner.embedders."
#: ComfyUI all-in-one files carry the text encoders and VAE next to the transformer.
COMFY_TEXT_PREFIXES = ("text_encoders.clip_l.", "text_encoders.t5xxl.")


@dataclass(frozen=True)
class WeightsFamily:
    """What :func:`inspect_weights` found. ``variant``/``layout``/``prefix`` are None unless Flux."""

    family: Family
    variant: Literal["schnell", "dev"] | None = None
    layout: FluxLayout | None = None
    #: The key prefix of the transformer's tensors in a single file ("" for a bare BFL file).
    prefix: str | None = None


def classify_keys(keys: Iterable[str]) -> WeightsFamily:
    """The family of a single file from its tensor names (pure; see the module docstring)."""
    names = list(keys)
    for prefix in ("", *TRANSFORMER_PREFIXES):
        inner = {k[len(prefix):] for k in names if k.startswith(prefix)} if prefix else set(names)
        if not inner:
            continue
        bfl = _BFL_MARK in inner and any(k.startswith(_BFL_SINGLE) for k in inner)
        diffusers = (_DIFFUSERS_MARK in inner and any(k.startswith(_DIFFUSERS_SINGLE) for k in inner)
                     and any(k.startswith(_DIFFUSERS_EMBEDDER) for k in inner))
        if not (bfl or diffusers):
            continue
        variant: Literal["schnell", "dev"] = "dev" if any(k.startswith(_GUIDANCE) for k in inner) else "schnell"
        layout: FluxLayout
        if diffusers:
            layout = "diffusers_transformer"
        elif prefix and any(k.startswith(COMFY_TEXT_PREFIXES) for k in names):
            layout = "comfy_all_in_one"
        else:
            layout = "bfl"
        return WeightsFamily("flux", variant, layout, prefix)
    if any(k.startswith(_SDXL_UNET) for k in names) and any(k.startswith(_SDXL_CONDITIONER) for k in names):
        return WeightsFamily("sdxl")
    return WeightsFamily("unknown")


def inspect_weights(path: str | os.PathLike[str]) -> WeightsFamily:
    """The family of a ``.safetensors`` file (header only) or a diffusers folder (its JSON files).

    Raises :class:`engine.core.errors.UnsafeFile` / :class:`ModelInvalid` for a pickle or a corrupt
    file (the checks of :func:`check_weight_file`).
    """
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path)
    return classify_keys(check_weight_file(path).tensors)


def detect_family(path: str | os.PathLike[str]) -> Family:
    """"flux", "sdxl" or "unknown" for a weights file or diffusers folder (see :func:`inspect_weights`)."""
    return inspect_weights(path).family


def _inspect_folder(folder: Path) -> WeightsFamily:
    index = read_json_object(folder / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    if pipeline.startswith("Flux") and "transformer" in index:
        config = read_json_object(folder / "transformer" / "config.json")
        variant: Literal["schnell", "dev"] = "dev" if config.get("guidance_embeds") else "schnell"
        return WeightsFamily("flux", variant, "diffusers_folder", None)
    if pipeline.startswith("StableDiffusionXL"):
        return WeightsFamily("sdxl")
    return WeightsFamily("unknown")


def read_json_object(path: Path, label: str | None = None) -> dict[str, Any]:
    """A model folder's JSON file as a dict; ``model_invalid`` naming ``label`` (default: the folder's
    name) when it is missing, unreadable or not an object. Shared by the SDXL and Flux loaders."""
    label = path.parent.name if label is None else label
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelInvalid(f"{label}: {path.name} is missing") from None
    except (OSError, ValueError):
        raise ModelInvalid(f"{label}: {path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ModelInvalid(f"{label}: {path.name} is not a JSON object")
    return data
