"""FLUX.1 architecture configs bundled as package data, so loading a single-file checkpoint fetches nothing.

Written from the published ``config.json`` / ``scheduler_config.json`` files of the Hugging Face repos
black-forest-labs/FLUX.1-schnell and black-forest-labs/FLUX.1-dev (folders ``transformer/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``scheduler/``) and the ``FluxTransformer2DModel`` defaults of
diffusers; they are architecture hyper-parameters, not weights. The two variants differ only in
``guidance_embeds`` (dev is guidance-distilled) and in the scheduler's ``use_dynamic_shifting`` (dev
shifts the timesteps by image size; schnell uses shift 1.0). The VAE, CLIP-L and T5-XXL encoder are
shared. Tokenizer vocabularies are not bundled (a configured folder or the HF cache supplies them).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal

#: component -> file stem; the transformer and scheduler have one file per variant.
COMPONENTS: tuple[str, ...] = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
_PER_VARIANT = ("transformer", "scheduler")


def bundled_config(component: str, variant: Literal["schnell", "dev"] = "schnell") -> dict[str, Any]:
    """A fresh copy of the bundled config of ``component`` for ``variant`` ("schnell" or "dev")."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    if variant not in ("schnell", "dev"):
        raise ValueError(f"unknown FLUX.1 variant {variant!r}; known: schnell, dev")
    stem = f"{component}_{variant}" if component in _PER_VARIANT else component
    return json.loads(resources.files(__name__).joinpath(f"{stem}.json").read_text(encoding="utf-8"))
