"""What a GenerationRequest means for a FLUX.1 model (issue 17): defaults per variant, and the
fields FLUX.1 does not have. Torch-free and pure, so ``FluxRunner.check`` runs it at submit.

* steps: the request's, else schnell 4 / dev 28 (the models' published defaults);
* guidance (dev only, the distilled guidance embedding): the request's ``cfg`` when the caller set
  it, else 3.5; schnell has no guidance input, a set ``cfg`` is ignored with a warning;
* size: width and height are rounded down to multiples of 16 (VAE 8× and 2×2 patches), as
  FluxPipeline does, with a warning when that changes them;
* the SDXL-only fields (Fooocus's sampling tricks, the refiner, CLIP skip, FreeU, the performance
  LoRAs, SDXL samplers and schedulers, a separate VAE) and the image tasks, set to anything but their
  default, are refused with ``unsupported_for_model`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.core.errors import UnsupportedForModel
from engine.core.request import GenerationRequest

#: (steps, guidance) when the request leaves them unset.
VARIANT_DEFAULTS: dict[str, tuple[int, float | None]] = {"schnell": (4, None), "dev": (28, 3.5)}
SIZE_MULTIPLE_PX = 16
#: Request fields only the SDXL family uses: a non-default value is refused on a FLUX.1 model.
SDXL_ONLY_FIELDS = ("sharpness", "adaptive_cfg", "adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end",
                    "clip_skip", "refiner_model", "refiner_switch", "refiner_switch_step", "refiner_swap_method",
                    "freeu", "vae", "performance", "sampler", "scheduler")
#: Image-task fields (issue 14): the Flux runner is text-to-image only.
IMAGE_TASK_FIELDS = ("input_image", "inpaint_mask", "inpaint_mask_upload", "uov_method", "outpaint_selections",
                     "inpaint_mode", "inpaint_engine", "inpaint_strength", "inpaint_respective_field",
                     "inpaint_erode_or_dilate", "invert_mask", "inpaint_disable_initial_latent",
                     "inpaint_additional_prompt", "vary_strength", "upscale_strength", "enhance")
#: Values that mean "not used" besides the field default (the UI's 'None' refiner).
_ALSO_UNSET: dict[str, tuple[Any, ...]] = {"refiner_model": ("None",)}


def _is_default(request: GenerationRequest, name: str) -> bool:
    value = getattr(request, name)
    default = GenerationRequest.model_fields[name].get_default(call_default_factory=True)
    return value == default or value in _ALSO_UNSET.get(name, ())


def check_flux_request(request: GenerationRequest, *, variant: str, model_name: str) -> None:
    """Raise UnsupportedForModel for the first field FLUX.1 cannot honour (image fields first)."""
    for name in (*IMAGE_TASK_FIELDS, *SDXL_ONLY_FIELDS):
        if not _is_default(request, name):
            what = "image tasks (input images, inpaint, vary, upscale, enhance)" if name in IMAGE_TASK_FIELDS else name
            raise UnsupportedForModel(
                f"{name}: {model_name} is a FLUX.1 [{variant}] model, which has no {what}; "
                f"leave {name} unset (its default) or pick an SDXL model", loc=(name,))


@dataclass(frozen=True)
class FluxSettings:
    """The sampling values a FLUX.1 job runs with, after the variant's defaults."""

    width: int
    height: int
    steps: int
    #: The distilled guidance (dev); None when the transformer has no guidance input (schnell).
    guidance: float | None
    warnings: tuple[tuple[str, str], ...] = ()


def flux_settings(request: GenerationRequest, *, variant: str, guidance_embeds: bool) -> FluxSettings:
    """Steps, guidance and size for ``request`` on a FLUX.1 ``variant`` model (see the module doc)."""
    default_steps, default_guidance = VARIANT_DEFAULTS[variant]
    warnings: list[tuple[str, str]] = []
    steps = request.steps if request.steps is not None else default_steps
    cfg_set = "cfg" in request.model_fields_set
    if guidance_embeds:
        guidance = float(request.cfg) if cfg_set else (default_guidance if default_guidance is not None else 3.5)
    else:
        guidance = None
        if cfg_set:
            warnings.append(("ignored_field", f"cfg is ignored: FLUX.1 [{variant}] has no guidance input"))
    width, height = request.size
    fixed_w, fixed_h = width - width % SIZE_MULTIPLE_PX, height - height % SIZE_MULTIPLE_PX
    if (fixed_w, fixed_h) != (width, height):
        warnings.append(("size_rounded", f"FLUX.1 needs sizes in multiples of {SIZE_MULTIPLE_PX} px: "
                                         f"{width}x{height} runs as {fixed_w}x{fixed_h}"))
    return FluxSettings(width=fixed_w, height=fixed_h, steps=steps, guidance=guidance, warnings=tuple(warnings))
