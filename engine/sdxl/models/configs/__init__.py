"""SDXL architecture configs bundled as package data, so loading a single-file checkpoint fetches nothing.

The JSON files are copies of ``shared/sdxl-configs`` (the Hugging Face configs of
stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, and madebyollin/sdxl-vae-fp16-fix; see
that folder's README for provenance). They are architecture hyper-parameters, not weights. The
refiner ships the same VAE, bigG text encoder, scheduler and tokenizer as the base, so only its UNet
config and model index are stored; :func:`component_config` falls back to the base for the rest.
Tokenizer vocabularies are not bundled (they come from a configured folder or the HF cache).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

ConfigName = Literal["base", "refiner", "vae-fp16-fix"]
CONFIG_NAMES: tuple[str, ...] = ("base", "refiner", "vae-fp16-fix")
#: Components whose config lives in ``<component>/config.json``.
COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")


def config_dir(name: ConfigName) -> Path:
    """The folder of one bundled config set: ``base``, ``refiner`` or ``vae-fp16-fix``."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown bundled config {name!r}; known: {', '.join(CONFIG_NAMES)}")
    return Path(str(resources.files(__name__).joinpath(name)))


def component_config(name: Literal["base", "refiner"], component: str) -> dict[str, Any]:
    """The config dict of ``component`` (unet, vae, text_encoder, text_encoder_2) of SDXL base/refiner."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    path = config_dir(name) / component / "config.json"
    if not path.is_file():  # the refiner shares everything but its UNet with the base
        path = config_dir("base") / component / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def scheduler_config() -> dict[str, Any]:
    """SDXL's EulerDiscreteScheduler config (the same for base and refiner)."""
    return json.loads((config_dir("base") / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
