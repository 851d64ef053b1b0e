"""The public request model: what a caller may ask the engine for (text-to-image and image tasks).

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
from engine.core.errors import HooocusError, InvalidRequest, pydantic_error_to_hooocus

_STRICT = ConfigDict(extra="forbid", frozen=True)

# Issue 14 image tasks: Fooocus's own option strings (modules/flags.py), what it logs and stores.
UovMethod = Literal["Disabled", "Vary (Subtle)", "Vary (Strong)", "Upscale (1.5x)", "Upscale (2x)",
                    "Upscale (Fast 2x)"]
OutpaintSide = Literal["Left", "Right", "Top", "Bottom"]
InpaintMode = Literal["Inpaint or Outpaint (default)", "Improve Detail (face, hand, eyes, etc.)",
                      "Modify Content (add objects, change background, etc.)"]
InpaintEngineName = Literal["None", "v1", "v2.5", "v2.6"]
UOV_DISABLED = "Disabled"
#: Issue 16: Fooocus's Image Prompt slot types (modules/flags.py ip_list).
ImagePromptType = Literal["ImagePrompt", "FaceSwap", "PyraCanny", "CPDS"]
#: spec §12.3 table: (stop_at, weight) a slot gets when the caller leaves them out (Fooocus's
#: per-type defaults, flags.default_parameters).
IMAGE_PROMPT_DEFAULTS: dict[str, tuple[float, float]] = {
    "ImagePrompt": (0.5, 0.6),
    "FaceSwap": (0.9, 0.75),
    "PyraCanny": (0.5, 1.0),
    "CPDS": (0.5, 1.0),
}
#: spec §12.3: Fooocus has 4 image-prompt slots (default_controlnet_image_count).
MAX_IMAGE_PROMPTS = 4
INPAINT_MODE_DEFAULT = "Inpaint or Outpaint (default)"
#: An image reference is 'sha256:<hex>' or a data URI; the data URI is the long one. The decoded
#: byte cap is the server's ``max_upload_bytes`` (checked by the resolver); this is only a hard upper
#: bound on the text so a request can never carry more than 48 MiB of base64 (= 36 MiB decoded,
#: above any sane upload cap) into the validator.
MAX_IMAGE_REF_CHARS = 48 * 1024 * 1024
ImageRefText = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_REF_CHARS)]
Strength = Annotated[float, Field(gt=0.0, le=1.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
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


class ImagePromptSlot(BaseModel):
    """One Image Prompt slot (spec §12.3): an image reference, its type, and optional stop/weight
    (``None`` = the type's default from :data:`IMAGE_PROMPT_DEFAULTS`; stop 0..1, weight 0..2 as
    Fooocus's sliders)."""

    model_config = _STRICT
    image: ImageRefText
    type: ImagePromptType = "ImagePrompt"
    stop_at: Fraction | None = None
    weight: Annotated[float, Field(ge=0.0, le=2.0)] | None = None

    @property
    def resolved_stop_at(self) -> float:
        return IMAGE_PROMPT_DEFAULTS[self.type][0] if self.stop_at is None else self.stop_at

    @property
    def resolved_weight(self) -> float:
        return IMAGE_PROMPT_DEFAULTS[self.type][1] if self.weight is None else self.weight


#: Issue 16 Enhance (spec §12.6): Fooocus's option strings (modules/flags.py), what it logs.
EnhanceMaskModel = Literal["sam", "u2net", "u2netp", "u2net_human_seg", "u2net_cloth_seg", "silueta",
                           "isnet-general-use", "isnet-anime"]
ClothCategory = Literal["full", "upper", "lower"]
SamModelName = Literal["vit_b", "vit_l", "vit_h"]
EnhanceUovOrder = Literal["Before First Enhancement", "After Last Enhancement"]
EnhanceUovPromptType = Literal["Original Prompts", "Last Filled Enhancement Prompts"]
#: Fooocus shows default_enhance_tabs = 3 tabs and allows up to 5 (spec §12.6).
MAX_ENHANCE_TABS = 5
#: The detection text is short (GroundingDINO reads at most 256 tokens); this bounds it well below.
MAX_DETECTION_PROMPT_CHARS = 1000


class EnhanceTab(BaseModel):
    """One enhancement pass (spec §12.6): a mask from a detection text (GroundingDINO + SAM) or a rembg
    model, erode/dilate and invert, then an inpaint with this tab's own prompt and inpaint settings.
    Defaults are Fooocus 2.5.5's (refdata/tables/config_defaults.json, webui_controls.json)."""

    model_config = _STRICT
    #: What GroundingDINO looks for ("face", "hand", ...); needed by the ``sam`` mask model only.
    detection_prompt: Annotated[str, Field(max_length=MAX_DETECTION_PROMPT_CHARS)] = ""
    #: Empty = the job's own prompt (Fooocus prepare_enhance_prompt falls back the same way).
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    mask_model: EnhanceMaskModel = "sam"
    #: u2net_cloth_seg only.
    cloth_category: ClothCategory = "full"
    sam_model: SamModelName = "vit_b"
    box_threshold: Fraction = 0.3
    text_threshold: Fraction = 0.25
    #: Keep at most this many SAM masks (0 = all; Fooocus's slider is 0..10).
    max_detections: Annotated[int, Field(ge=0, le=10)] = 0
    inpaint_engine: InpaintEngineName = "v2.6"
    strength: Fraction = 1.0
    respective_field: Fraction = 0.618
    erode_or_dilate: Annotated[int, Field(ge=-64, le=64)] = 0
    invert: bool = False
    disable_initial_latent: bool = False


class EnhanceOptions(BaseModel):
    """Fooocus's Enhance (spec §12.6): an optional Upscale/Vary before the first or after the last pass,
    then each tab in order, on every generated image (or on ``input_image`` alone: enhance-only)."""

    model_config = _STRICT
    uov_method: UovMethod = UOV_DISABLED
    uov_processing_order: EnhanceUovOrder = "Before First Enhancement"
    uov_prompt_type: EnhanceUovPromptType = "Original Prompts"
    #: Fooocus "Save only final enhanced image": the generated image and the passes before the last
    #: are not returned.
    save_only_final: bool = False
    #: Fooocus's developer option dino_erode_or_dilate: grows (or shrinks) every detection box in px.
    box_erode_or_dilate: Annotated[int, Field(ge=-64, le=64)] = 0
    tabs: Annotated[list[EnhanceTab], Field(max_length=MAX_ENHANCE_TABS)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_tabs(self) -> EnhanceOptions:
        if not self.tabs and self.uov_method == UOV_DISABLED:
            raise InvalidRequest("enhance.tabs: enhance has nothing to do: give at least one tab or an uov_method",
                                 loc=("enhance", "tabs"))
        for index, tab in enumerate(self.tabs):
            if tab.mask_model == "sam" and not tab.detection_prompt.strip():
                raise InvalidRequest(f"enhance.tabs.{index}.detection_prompt: mask_model 'sam' needs a detection_prompt "
                                     "(what to find: 'face', 'hand', ...)",
                                     loc=("enhance", "tabs", index, "detection_prompt"))
        return self


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
    # -- image tasks (issue 14; contract14.md). Fooocus runs Upscale/Vary (UOV) when uov_method is
    # not Disabled, and inpaint/outpaint only when it is (UOV takes precedence, as in Fooocus).
    uov_method: UovMethod = UOV_DISABLED
    #: An image reference: 'sha256:<hex>' (an upload or an image of the caller's) or a data URI.
    input_image: ImageRefText | None = None
    #: The drawn mask and an uploaded mask; max-merged (pixels > 127) as Fooocus does.
    inpaint_mask: ImageRefText | None = None
    inpaint_mask_upload: ImageRefText | None = None
    outpaint_selections: Annotated[list[OutpaintSide], Field(max_length=4)] = Field(default_factory=list)
    inpaint_mode: InpaintMode = INPAINT_MODE_DEFAULT
    #: ``None`` = the mode's engine (spec §12.2 table: v2.6, None for Improve Detail).
    inpaint_engine: InpaintEngineName | None = None
    #: ``None`` = the mode's denoise (1.0, 0.5 for Improve Detail); outpaint forces 1.0.
    inpaint_strength: Fraction | None = None
    #: ``None`` = the mode's respective field (0.618, 0.0 for Improve Detail / Modify Content).
    inpaint_respective_field: Fraction | None = None
    inpaint_erode_or_dilate: Annotated[int, Field(ge=-64, le=64)] = 0
    invert_mask: bool = False
    #: ``None`` = the mode's value (True only for Modify Content).
    inpaint_disable_initial_latent: bool | None = None
    #: Prepended to the prompt as its own first line (spec §12.2 "Inpaint prompt").
    inpaint_additional_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    #: Fooocus overwrite_vary_strength: replaces 0.5 (Subtle) / 0.85 (Strong).
    vary_strength: Strength | None = None
    #: Fooocus overwrite_upscale_strength: replaces 0.382.
    upscale_strength: Strength | None = None
    # -- Image Prompt (issue 16): up to 4 slots; they combine with text-to-image and the image tasks.
    image_prompts: Annotated[list[ImagePromptSlot], Field(max_length=MAX_IMAGE_PROMPTS)] = Field(default_factory=list)
    # -- Enhance (issue 16, spec §12.6): passes on each generated image; with input_image and no other
    # image task, on that image alone (Fooocus's Enhance tab with an uploaded image: no generation).
    enhance: EnhanceOptions | None = None

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
        self._check_image_task()
        return self

    def _check_image_task(self) -> None:
        """The image fields must describe a task; errors carry the field's own path (loc)."""
        masked = self.inpaint_mask is not None or self.inpaint_mask_upload is not None
        wants_image = self.uov_method != UOV_DISABLED or masked or bool(self.outpaint_selections)
        if wants_image and self.input_image is None:
            field_name = ("uov_method" if self.uov_method != UOV_DISABLED else
                          "outpaint_selections" if self.outpaint_selections and not masked else
                          "inpaint_mask" if self.inpaint_mask is not None else
                          "inpaint_mask_upload" if masked else "outpaint_selections")
            raise InvalidRequest(f"{field_name} needs input_image (an image reference: 'sha256:<hex>' or a "
                                 "data:image/...;base64 URI)", loc=("input_image",))
        if self.input_image is not None and not wants_image and self.enhance is None:
            raise InvalidRequest("nothing to do with the image: set uov_method (Vary/Upscale), or give a mask "
                                 "(inpaint_mask / inpaint_mask_upload) or outpaint_selections, or enhance",
                                 loc=("input_image",))
        if len(set(self.outpaint_selections)) != len(self.outpaint_selections):
            raise InvalidRequest("outpaint_selections lists a side twice", loc=("outpaint_selections",))

    @property
    def image_task(self) -> str | None:
        """'uov', 'inpaint' or None (text-to-image), as Fooocus picks: UOV wins over inpaint.

        Whether the inpaint mask has a pixel > 127 is known only after decoding; the runner
        skips an empty-mask inpaint with a warning (Fooocus generates from the prompt then).
        """
        if self.input_image is None:
            return None
        if self.enhance_only:
            return "enhance"
        return "uov" if self.uov_method != UOV_DISABLED else "inpaint"

    @property
    def enhance_only(self) -> bool:
        """Enhance on ``input_image`` with no generation (no UOV, mask or outpaint side asked for)."""
        return (self.enhance is not None and self.input_image is not None and self.uov_method == UOV_DISABLED
                and self.inpaint_mask is None and self.inpaint_mask_upload is None and not self.outpaint_selections)

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
        except HooocusError:  # a cross-field check that names its own field path
            raise
        except (TypeError, ValueError) as exc:  # non-dict input
            raise InvalidRequest(str(exc)) from None
