"""A validated request -> every value the pipeline uses, in Fooocus's order (spec §1 steps 1–7).

Torch-free and pure apart from the seed draw, which uses the ``rng`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.core.constants import FOOOCUS_V2_STYLE, MAX_SEED, SEED_MODULUS
from engine.core.request import INPAINT_MODE_DEFAULT, UOV_DISABLED, FreeUSettings, GenerationRequest
from engine.imaging.sizes import upscale_plan, vary_target_hw
from engine.prompts.inline_loras import canonical_lora_name
from engine.prompts.styles import StyleLibrary
from engine.sdxl.modes import PERFORMANCE_MODES, SamplingSettings

LoraEntry = tuple[str, float]

#: spec §12.1: Vary's denoise by method (Fooocus overwrite_vary_strength replaces it).
VARY_DENOISE = {"Vary (Subtle)": 0.5, "Vary (Strong)": 0.85}
#: spec §12.1: Upscale's denoise (overwrite_upscale_strength replaces it) and factors.
UPSCALE_DENOISE = 0.382
UPSCALE_FACTORS = {"Upscale (1.5x)": 1.5, "Upscale (2x)": 2.0}
FAST_UPSCALE = "Upscale (Fast 2x)"
FAST_UPSCALE_FACTOR = 2


@dataclass(frozen=True)
class InpaintModeDefaults:
    """One row of spec §12.2's method table: what a ``None`` request field becomes."""

    engine: str
    denoise: float
    respective_field: float
    disable_initial_latent: bool


INPAINT_MODES: dict[str, InpaintModeDefaults] = {
    INPAINT_MODE_DEFAULT: InpaintModeDefaults("v2.6", 1.0, 0.618, False),
    "Improve Detail (face, hand, eyes, etc.)": InpaintModeDefaults("None", 0.5, 0.0, False),
    "Modify Content (add objects, change background, etc.)": InpaintModeDefaults("v2.6", 1.0, 0.0, True),
}
#: spec §8: the synthetic refiner (inpaint engine, no user refiner) swaps at 80 % of the steps.
SYNTHETIC_REFINER_SWITCH = 0.8


@dataclass(frozen=True)
class InpaintParams:
    """The inpaint/outpaint values after the mode table and the outpaint rule (spec §12.2)."""

    mode: str
    engine: str
    denoise: float
    respective_field: float
    disable_initial_latent: bool
    erode_or_dilate: int
    invert_mask: bool
    outpaint_selections: tuple[str, ...]
    additional_prompt: str

    def to_public_dict(self) -> dict[str, Any]:
        return {"inpaint_mode": self.mode, "inpaint_engine": self.engine, "inpaint_strength": self.denoise,
                "inpaint_respective_field": self.respective_field,
                "inpaint_disable_initial_latent": self.disable_initial_latent,
                "inpaint_erode_or_dilate": self.erode_or_dilate, "invert_mask": self.invert_mask,
                "outpaint_selections": list(self.outpaint_selections),
                "inpaint_additional_prompt": self.additional_prompt}


def inpaint_params(request: GenerationRequest, *, fooocus_quirks: bool = True) -> InpaintParams:
    """spec §12.2: ``None`` fields take the mode's value; outpaint forces denoise 1.0.

    [quirk] Outpaint also sets the respective field to 1.0 in Fooocus, but after the crop already
    got the method's value, so the crop uses the method's value (spec §12.2, measured on 2.5.5).
    Copied under ``fooocus_quirks``; off = the whole padded image (1.0) as Fooocus meant.
    """
    mode = INPAINT_MODES[request.inpaint_mode]
    outpaint = tuple(request.outpaint_selections)
    denoise = request.inpaint_strength if request.inpaint_strength is not None else mode.denoise
    respective = (request.inpaint_respective_field if request.inpaint_respective_field is not None
                  else mode.respective_field)
    if outpaint:
        denoise = 1.0
        if not fooocus_quirks:
            respective = 1.0
    return InpaintParams(
        mode=request.inpaint_mode, engine=request.inpaint_engine or mode.engine, denoise=float(denoise),
        respective_field=float(respective),
        disable_initial_latent=(request.inpaint_disable_initial_latent
                                if request.inpaint_disable_initial_latent is not None else mode.disable_initial_latent),
        erode_or_dilate=request.inpaint_erode_or_dilate, invert_mask=request.invert_mask,
        outpaint_selections=outpaint, additional_prompt=request.inpaint_additional_prompt)


def with_inpaint_prompt(prompt: str, additional: str) -> str:
    """spec §12.2: the additional prompt is prepended as its own first line (alone if the prompt is empty)."""
    if not additional:
        return prompt
    return f"{additional}\n{prompt}" if prompt else additional


@dataclass(frozen=True)
class ResolvedRequest:
    prompt: str
    negative_prompt: str
    #: Canonical style names in the caller's order, 'Fooocus V2' and 'Random Style' included.
    styles: tuple[str, ...]
    #: 'Fooocus V2' was asked for and may run (assets present).
    use_expansion: bool
    performance: str
    width: int
    height: int
    steps: int
    #: Refiner swap step (spec §1 step 7); equals ``steps`` when there is no refiner switch.
    switch_step: int
    sampler: str
    scheduler: str
    cfg: float
    sharpness: float
    adaptive_cfg: float
    adm_scaler_positive: float
    adm_scaler_negative: float
    adm_scaler_end: float
    clip_skip: int
    base_model: str
    refiner_model: str | None
    refiner_switch: float
    refiner_swap_method: str
    #: The LoRAs to load before inline ``<lora:...>`` parsing: the caller's, then the performance LoRA.
    loras: tuple[LoraEntry, ...]
    #: The caller's enabled LoRAs only (inline references are parsed against these).
    user_loras: tuple[LoraEntry, ...]
    performance_lora: LoraEntry | None
    seed: int
    seeds: tuple[int, ...]
    image_number: int
    disable_seed_increment: bool
    read_wildcards_in_order: bool
    vae: str | None
    freeu: FreeUSettings | None
    output_format: str
    metadata_scheme: str
    denoise: float = 1.0
    #: (code, message) pairs the pipeline should emit as JobWarning events.
    warnings: tuple[tuple[str, str], ...] = ()
    #: 'txt2img', 'vary', 'upscale', 'upscale_fast' or 'inpaint' (Fooocus: UOV wins over inpaint).
    task: str = "txt2img"
    uov_method: str = UOV_DISABLED
    #: Upscale's factor (1.5, 2 or 2 for Fast 2x); None for other tasks.
    upscale_factor: float | None = None
    #: Upscale 1.5x/2x whose target shape ceil is > 2800 px: the upscaled pixels are the answer.
    upscale_direct_return: bool = False
    #: Inpaint: the resolved method values; None for other tasks.
    inpaint: InpaintParams | None = None
    #: Inpaint with an engine and no user refiner: the base drops head and patch at ``switch_step``.
    synthetic_refiner: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def to_public_dict(self) -> dict[str, Any]:
        """JSON-safe echo of every resolved value (the job's ``started`` params); seeds as strings."""
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "styles": list(self.styles),
            "use_expansion": self.use_expansion, "performance": self.performance,
            "width": self.width, "height": self.height, "aspect_ratio": f"{self.width}*{self.height}",
            "steps": self.steps, "switch_step": self.switch_step, "sampler": self.sampler,
            "scheduler": self.scheduler, "cfg": self.cfg, "sharpness": self.sharpness,
            "adaptive_cfg": self.adaptive_cfg, "adm_scaler_positive": self.adm_scaler_positive,
            "adm_scaler_negative": self.adm_scaler_negative, "adm_scaler_end": self.adm_scaler_end,
            "clip_skip": self.clip_skip, "base_model": self.base_model, "refiner_model": self.refiner_model,
            "refiner_switch": self.refiner_switch, "refiner_swap_method": self.refiner_swap_method,
            "loras": [[name, weight] for name, weight in self.loras],
            "performance_lora": list(self.performance_lora) if self.performance_lora else None,
            "seed": str(self.seed), "seeds": [str(s) for s in self.seeds], "image_number": self.image_number,
            "disable_seed_increment": self.disable_seed_increment,
            "read_wildcards_in_order": self.read_wildcards_in_order, "denoise": self.denoise, "vae": self.vae,
            "freeu": self.freeu.model_dump() if self.freeu else None, "output_format": self.output_format,
            "metadata_scheme": self.metadata_scheme, "task": self.task, "uov_method": self.uov_method,
            "upscale_factor": self.upscale_factor, "upscale_direct_return": self.upscale_direct_return,
            "synthetic_refiner": self.synthetic_refiner,
            **(self.inpaint.to_public_dict() if self.inpaint is not None else {}),
            "warnings": [{"code": code, "message": message} for code, message in self.warnings],
        }


def task_seeds(seed: int, image_number: int, *, disable_seed_increment: bool = False) -> tuple[int, ...]:
    """spec §2.2.1 / §15: image i uses (seed + i) mod 2^63, or seed mod 2^63 for every image."""
    return tuple((seed if disable_seed_increment else seed + i) % SEED_MODULUS for i in range(image_number))


def resolve_request(request: GenerationRequest, *, default_model: str, default_styles: Sequence[str],
                    style_library: StyleLibrary, rng: random.Random | None = None,
                    available_loras: Sequence[str] | None = None,
                    expansion_available: bool = True, fooocus_quirks: bool = True,
                    input_size: tuple[int, int] | None = None) -> ResolvedRequest:
    """Fooocus's handler order (spec §1):

    1. styles (request's or ``default_styles``), canonical; 'Fooocus V2' sets ``use_expansion``;
    2. a refiner equal to the base model becomes None;
    3. performance overrides (fast modes: sampler, scheduler, CFG 1, sharpness 0, adaptive CFG 1,
       ADM 1/1/0, no refiner, switch 1.0, plus their LoRA);
    5. size from width/height, else the aspect ratio;
    7. steps = request.steps or the mode's; switch = int(round(steps * refiner_switch)), or
       ``refiner_switch_step`` when given.

    The seed is drawn with ``rng.randint(0, 2^63 - 1)`` when the request has none (spec §15).
    ``available_loras`` (file names), when given, turns LoRA names into file names or raises
    UnknownLora. ``expansion_available`` False turns 'Fooocus V2' off with a warning.

    Image tasks (spec §1 step 6, §12): ``input_size`` is the input image's (width, height). Vary
    samples at the image's size with its shape ceil clamped to [1024, 2048]; Upscale at the planned
    upscale size with the mode's UOV steps; inpaint starts from the image's size (the pipeline sets
    the crop's generation size) and prepends ``inpaint_additional_prompt``. Denoise: Vary 0.5/0.85,
    Upscale 0.382, inpaint the method's, each replaced by the request's strength when given.
    """
    warnings: list[tuple[str, str]] = []
    styles = tuple(style_library.check(request.styles if request.styles is not None else list(default_styles)))
    use_expansion = FOOOCUS_V2_STYLE in styles
    if use_expansion and not expansion_available:
        use_expansion = False
        warnings.append(("assets_missing", "'Fooocus V2' expansion assets are not installed; running without it"))

    base_model = request.base_model or default_model
    refiner_model = request.refiner_model if request.refiner_model not in (None, "None") else None
    if refiner_model == base_model:
        refiner_model = None

    mode = PERFORMANCE_MODES[request.performance]
    settings = mode.apply(SamplingSettings(
        sampler=request.sampler, scheduler=request.scheduler, cfg=request.cfg, sharpness=request.sharpness,
        adaptive_cfg=request.adaptive_cfg, adm_scaler_positive=request.adm_scaler_positive,
        adm_scaler_negative=request.adm_scaler_negative, adm_scaler_end=request.adm_scaler_end,
        refiner_model=refiner_model, refiner_switch=request.refiner_switch))

    width, height = request.size
    task, denoise, factor, direct, inpaint = "txt2img", 1.0, None, False, None
    mode_steps = mode.steps
    prompt = request.prompt
    image_task = request.image_task
    if image_task is not None and input_size is None:
        raise ValueError("an image task needs input_size (the decoded input image's width and height)")
    if image_task == "uov":
        in_w, in_h = input_size  # type: ignore[misc]
        if request.uov_method in VARY_DENOISE:
            task = "vary"
            denoise = request.vary_strength if request.vary_strength is not None else VARY_DENOISE[request.uov_method]
            height, width = vary_target_hw(in_h, in_w)
        elif request.uov_method == FAST_UPSCALE:
            task, factor = "upscale_fast", float(FAST_UPSCALE_FACTOR)
            height, width = upscale_plan(in_h, in_w, factor).result_hw  # 2x, or shape ceil 1024 when smaller
        else:
            task, factor = "upscale", UPSCALE_FACTORS[request.uov_method]
            denoise = request.upscale_strength if request.upscale_strength is not None else UPSCALE_DENOISE
            plan = upscale_plan(in_h, in_w, factor)
            height, width = plan.result_hw
            direct = plan.direct_return
            mode_steps = mode.steps_uov  # spec §9: Upscale uses the mode's UOV steps, Vary the normal ones
    elif image_task == "inpaint":
        task = "inpaint"
        width, height = input_size  # type: ignore[misc]
        inpaint = inpaint_params(request, fooocus_quirks=fooocus_quirks)
        denoise = inpaint.denoise
        prompt = with_inpaint_prompt(prompt, inpaint.additional_prompt)
    refiner_switch = settings.refiner_switch
    synthetic = inpaint is not None and inpaint.engine != "None" and settings.refiner_model is None
    if synthetic:
        refiner_switch = SYNTHETIC_REFINER_SWITCH
    steps = request.steps if request.steps is not None else mode_steps
    # [quirk] Fooocus computes the switch from the performance's own steps even when the steps are
    # overridden (async_worker apply_overrides reads async_task.steps; the parity runs record
    # switch 15 for 6 overridden steps of Speed, 9 = round(18 · 0.5) for Upscale). Copied under
    # fooocus_quirks; off = from `steps`.
    switch_base_steps = mode_steps if fooocus_quirks else steps
    switch_step = int(round(switch_base_steps * refiner_switch))
    if request.refiner_switch_step is not None:
        switch_step = request.refiner_switch_step

    user_loras = []
    for index, lora in enumerate(request.loras):
        if not lora.enabled or lora.name == "None":
            continue
        name = lora.name if available_loras is None else canonical_lora_name(lora.name, available_loras, index)
        user_loras.append((name, float(lora.weight)))
    performance_lora = mode.lora

    if request.seed is None:
        seed = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    else:
        seed = request.seed

    return ResolvedRequest(
        prompt=prompt, negative_prompt=request.negative_prompt, styles=styles,
        use_expansion=use_expansion, performance=mode.name, width=width, height=height, steps=steps,
        switch_step=switch_step, sampler=settings.sampler, scheduler=settings.scheduler, cfg=settings.cfg,
        sharpness=settings.sharpness, adaptive_cfg=settings.adaptive_cfg,
        adm_scaler_positive=settings.adm_scaler_positive, adm_scaler_negative=settings.adm_scaler_negative,
        adm_scaler_end=settings.adm_scaler_end, clip_skip=request.clip_skip, base_model=base_model,
        refiner_model=settings.refiner_model, refiner_switch=refiner_switch,
        refiner_swap_method=request.refiner_swap_method,
        loras=tuple(user_loras) + ((performance_lora,) if performance_lora else ()),
        user_loras=tuple(user_loras), performance_lora=performance_lora, seed=seed,
        seeds=task_seeds(seed, request.image_number, disable_seed_increment=request.disable_seed_increment),
        image_number=request.image_number, disable_seed_increment=request.disable_seed_increment,
        read_wildcards_in_order=request.read_wildcards_in_order, vae=request.vae, freeu=request.freeu,
        output_format=request.output_format, metadata_scheme=request.metadata_scheme, warnings=tuple(warnings),
        denoise=float(denoise), task=task, uov_method=request.uov_method, upscale_factor=factor,
        upscale_direct_return=direct, inpaint=inpaint, synthetic_refiner=synthetic)
