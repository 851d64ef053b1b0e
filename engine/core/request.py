"""The public request model: what a caller may ask the engine for (text-to-image).

Validated once, here, at the boundary (house style A9.3 #4): ``extra="forbid"``, frozen, ranges
from Fooocus's UI (refdata/tables/webui_controls.json). Defaults are Fooocus's ``presets/default.json``
values (spec §14) except where noted; fields left ``None`` are resolved by the engine from its
settings (default model, default styles) or from the performance mode (steps).

Checks that need runtime knowledge (does this style / model / LoRA exist?) happen in
``Engine.submit`` through the runner's ``check``; still before anything is queued.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.core.constants import (
    DEFAULT_ASPECT_RATIO,
    LORA_MAX_WEIGHT,
    LORA_MIN_WEIGHT,
    MAX_IMAGE_NUMBER,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE_PX,
    MAX_STEPS,
    MIN_SIDE_PX,
    PERFORMANCE_NAMES,
    MetadataScheme,
    OutputFormat,
    PerformanceName,
    RefinerSwapMethod,
    SamplerName,
    SchedulerName,
)
from engine.core.errors import InvalidRequest, pydantic_error_to_hooocus

_STRICT = ConfigDict(extra="forbid", frozen=True)
SidePx = Annotated[int, Field(ge=MIN_SIDE_PX, le=MAX_SIDE_PX, multiple_of=8)]
_ASPECT_RE = re.compile(r"^\s*(\d+)\s*[*x×X]\s*(\d+)\s*$")


def parse_aspect_ratio(text: str) -> tuple[int, int]:
    """'1152*896', '1152x896' or '1152×896' (Fooocus UI label start) -> (width, height)."""
    # Fooocus UI labels look like "1152×896 <span ...> ∣ 9:7</span>": keep the first token.
    head = text.split("<", 1)[0].split("∣", 1)[0]
    match = _ASPECT_RE.match(head)
    if not match:
        raise ValueError(f"aspect_ratio must look like '1152*896', got {text!r}")
    return int(match.group(1)), int(match.group(2))


class LoraSpec(BaseModel):
    """One LoRA slot: a file name (stem or file name inside the LoRA folders) and a weight."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=255)]
    weight: Annotated[float, Field(ge=LORA_MIN_WEIGHT, le=LORA_MAX_WEIGHT)] = 1.0
    enabled: bool = True


class FreeUSettings(BaseModel):
    """FreeU V2 (spec §11.4); Fooocus UI defaults."""

    model_config = _STRICT
    enabled: bool = True
    b1: Annotated[float, Field(ge=0.0, le=2.0)] = 1.01
    b2: Annotated[float, Field(ge=0.0, le=2.0)] = 1.02
    s1: Annotated[float, Field(ge=0.0, le=4.0)] = 0.99
    s2: Annotated[float, Field(ge=0.0, le=4.0)] = 0.95


class GenerationRequest(BaseModel):
    """A text-to-image job. Field names follow Fooocus's metadata keys where one exists."""

    model_config = _STRICT

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    #: Style names in the caller's order, including the pseudo-styles "Fooocus V2" and
    #: "Random Style". ``None`` = the server's default styles (Fooocus: V2, Enhance, Sharp).
    styles: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=64)] | None = None
    performance: PerformanceName = "Speed"
    #: 'W*H'. Ignored when width and height are given (Fooocus overwrite_width/height).
    aspect_ratio: str = DEFAULT_ASPECT_RATIO
    width: SidePx | None = None
    height: SidePx | None = None
    #: Fooocus's UI default is 2; an API call usually wants one image.
    image_number: Annotated[int, Field(ge=1, le=MAX_IMAGE_NUMBER)] = 1
    #: ``None`` = a random seed in [0, 2^63). Image i uses (seed + i) mod 2^63.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    disable_seed_increment: bool = False
    #: Fooocus overwrite_step; ``None`` = the performance mode's steps.
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    cfg: Annotated[float, Field(ge=1.0, le=30.0)] = 4.0
    sharpness: Annotated[float, Field(ge=0.0, le=30.0)] = 2.0
    sampler: SamplerName = "dpmpp_2m_sde_gpu"
    scheduler: SchedulerName = "karras"
    adaptive_cfg: Annotated[float, Field(ge=1.0, le=30.0)] = 7.0
    adm_scaler_positive: Annotated[float, Field(ge=0.1, le=3.0)] = 1.5
    adm_scaler_negative: Annotated[float, Field(ge=0.1, le=3.0)] = 0.8
    adm_scaler_end: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    clip_skip: Annotated[int, Field(ge=1, le=12)] = 2
    #: Model names as listed by the server (file name or stem); ``None`` = server default.
    base_model: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    refiner_model: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    refiner_switch: Annotated[float, Field(ge=0.1, le=1.0)] = 0.5
    #: Fooocus overwrite_switch: the refiner swap step; ``None`` = round(steps * refiner_switch).
    refiner_switch_step: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    refiner_swap_method: RefinerSwapMethod = "joint"
    loras: Annotated[list[LoraSpec], Field(max_length=MAX_LORAS)] = Field(default_factory=list)
    #: ``None`` = the checkpoint's own VAE (Fooocus "Default (model)").
    vae: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    freeu: FreeUSettings | None = None
    read_wildcards_in_order: bool = False
    output_format: OutputFormat = "png"
    metadata_scheme: MetadataScheme = "fooocus"
    #: A Fooocus preset (``presets/<name>.json`` in the server's preset folders): its values are
    #: defaults that this request's own explicit fields override; ``None`` = the server's
    #: ``settings.preset``, if any. Applied by the engine at submit (engine/io/presets.py).
    preset: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\w.+ -]+$")] | None = None
    # -- issue 14 image inputs: a STAND-IN for helper pipewire's fields (same names as the contract),
    # so the doors can be tested on this branch; on merge, pipewire's version of this file wins.
    uov_method: Literal["Disabled", "Vary (Subtle)", "Vary (Strong)", "Upscale (1.5x)", "Upscale (2x)",
                        "Upscale (Fast 2x)"] = "Disabled"
    #: Image references (engine/core/inputs.py): 'sha256:<hex>' or a data URI.
    input_image: Annotated[str, Field(min_length=1)] | None = None
    inpaint_mask: Annotated[str, Field(min_length=1)] | None = None
    inpaint_mask_upload: Annotated[str, Field(min_length=1)] | None = None
    outpaint_selections: list[Literal["Left", "Right", "Top", "Bottom"]] = Field(default_factory=list, max_length=4)

    @field_validator("performance", mode="before")
    @classmethod
    def _normalise_performance(cls, value: Any) -> Any:
        # Accept 'speed', 'extreme_speed', 'hyper_sd', 'HYPER-SD' ... as the Fooocus names.
        if isinstance(value, str):
            key = re.sub(r"[\s_\-]+", "", value).lower()
            for name in PERFORMANCE_NAMES:
                if re.sub(r"[\s_\-]+", "", name).lower() == key:
                    return name
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _check_aspect_ratio(cls, value: str) -> str:
        width, height = parse_aspect_ratio(value)
        for side in (width, height):
            if not (MIN_SIDE_PX <= side <= MAX_SIDE_PX) or side % 8:
                raise ValueError(
                    f"aspect_ratio sides must be multiples of 8 in [{MIN_SIDE_PX}, {MAX_SIDE_PX}], got {value!r}")
        return f"{width}*{height}"

    @model_validator(mode="after")
    def _check_size_pair(self) -> GenerationRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither (then aspect_ratio is used)")
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if self.width is not None and self.height is not None:
            return self.width, self.height
        return parse_aspect_ratio(self.aspect_ratio)

    @classmethod
    def parse(cls, data: Any) -> GenerationRequest:
        """Validate untrusted input; raise ``InvalidRequest`` (code invalid_request) with a field path."""
        if isinstance(data, GenerationRequest):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise pydantic_error_to_hooocus(exc) from None
        except (TypeError, ValueError) as exc:  # non-dict input
            raise InvalidRequest(str(exc)) from None
