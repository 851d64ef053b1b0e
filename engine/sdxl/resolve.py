"""A validated request -> every value the pipeline uses, in Fooocus's order (spec §1 steps 1–7).

Torch-free and pure apart from the seed draw, which uses the ``rng`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from engine.core.constants import FOOOCUS_V2_STYLE, MAX_SEED, SEED_MODULUS
from engine.core.errors import UnknownLora
from engine.core.request import FreeUSettings, GenerationRequest
from engine.prompts.styles import StyleLibrary
from engine.sdxl.modes import PERFORMANCE_MODES, SamplingSettings

LoraEntry = tuple[str, float]


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
            "metadata_scheme": self.metadata_scheme,
            "warnings": [{"code": code, "message": message} for code, message in self.warnings],
        }


def _canonical_lora(name: str, available: Sequence[str], index: int) -> str:
    """The file name a caller meant (exact, or by stem); UnknownLora when none matches."""
    if name in available:
        return name
    for candidate in available:
        if name == PurePath(candidate).stem:
            return candidate
    raise UnknownLora(f"unknown LoRA {name!r}; the options list (GET /v1/options, MCP list_options) shows the "
                      "installed LoRAs", loc=("loras", index, "name"))


def task_seeds(seed: int, image_number: int, *, disable_seed_increment: bool = False) -> tuple[int, ...]:
    """spec §2.2.1 / §15: image i uses (seed + i) mod 2^63, or seed mod 2^63 for every image."""
    return tuple((seed if disable_seed_increment else seed + i) % SEED_MODULUS for i in range(image_number))


def resolve_request(request: GenerationRequest, *, default_model: str, default_styles: Sequence[str],
                    style_library: StyleLibrary, rng: random.Random | None = None,
                    available_loras: Sequence[str] | None = None,
                    expansion_available: bool = True, fooocus_quirks: bool = True) -> ResolvedRequest:
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
    steps = request.steps if request.steps is not None else mode.steps
    # [quirk] Fooocus computes the switch from the performance's own steps even when the steps are
    # overridden (async_worker apply_overrides reads async_task.steps; the parity runs record
    # switch 15 for 6 overridden steps of Speed). Copied under fooocus_quirks; off = from `steps`.
    switch_base_steps = mode.steps if fooocus_quirks else steps
    switch_step = int(round(switch_base_steps * settings.refiner_switch))
    if request.refiner_switch_step is not None:
        switch_step = request.refiner_switch_step

    user_loras = []
    for index, lora in enumerate(request.loras):
        if not lora.enabled or lora.name == "None":
            continue
        name = lora.name if available_loras is None else _canonical_lora(lora.name, available_loras, index)
        user_loras.append((name, float(lora.weight)))
    performance_lora = mode.lora

    if request.seed is None:
        seed = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    else:
        seed = request.seed

    return ResolvedRequest(
        prompt=request.prompt, negative_prompt=request.negative_prompt, styles=styles,
        use_expansion=use_expansion, performance=mode.name, width=width, height=height, steps=steps,
        switch_step=switch_step, sampler=settings.sampler, scheduler=settings.scheduler, cfg=settings.cfg,
        sharpness=settings.sharpness, adaptive_cfg=settings.adaptive_cfg,
        adm_scaler_positive=settings.adm_scaler_positive, adm_scaler_negative=settings.adm_scaler_negative,
        adm_scaler_end=settings.adm_scaler_end, clip_skip=request.clip_skip, base_model=base_model,
        refiner_model=settings.refiner_model, refiner_switch=settings.refiner_switch,
        refiner_swap_method=request.refiner_swap_method,
        loras=tuple(user_loras) + ((performance_lora,) if performance_lora else ()),
        user_loras=tuple(user_loras), performance_lora=performance_lora, seed=seed,
        seeds=task_seeds(seed, request.image_number, disable_seed_increment=request.disable_seed_increment),
        image_number=request.image_number, disable_seed_increment=request.disable_seed_increment,
        read_wildcards_in_order=request.read_wildcards_in_order, vae=request.vae, freeu=request.freeu,
        output_format=request.output_format, metadata_scheme=request.metadata_scheme, warnings=tuple(warnings))
