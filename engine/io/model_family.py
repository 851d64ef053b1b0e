"""Which model family a model *spec* is (a name, a path, a built-in demo): FLUX.1 or SDXL, never by
downloading (issue 17). The weights themselves are classified once, in :mod:`engine.io.family`
(tensor names from the safetensors header, or a diffusers folder's JSON); this module only adds
what a spec can be besides a path: the built-in ``demo-flux`` names. Anything else (an SDXL
checkpoint, a name in the model folders, an HF repo id) is not Flux here; the SDXL runner decides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from engine.core.constants import DEMO_FLUX_MODELS
from engine.core.errors import HooocusError
from engine.io.family import inspect_weights

ModelFamily = Literal["sdxl", "flux"]


def is_flux_spec(spec: str | os.PathLike[str] | None) -> bool:
    """True for the built-in demo-flux names, a diffusers FluxPipeline folder, or a FLUX.1 safetensors file."""
    if spec is None:
        return False
    if str(spec) in DEMO_FLUX_MODELS:
        return True
    path = Path(spec).expanduser()
    if not (path.is_dir() or (path.is_file() and path.suffix == ".safetensors")):
        return False
    try:
        return inspect_weights(path).family == "flux"
    except HooocusError:  # unreadable or unsafe: not Flux here; the SDXL runner's loader reports it
        return False


def model_family(spec: str | os.PathLike[str] | None) -> ModelFamily:
    """"flux" for a FLUX.1 model (see :func:`is_flux_spec`), else "sdxl"."""
    return "flux" if is_flux_spec(spec) else "sdxl"
