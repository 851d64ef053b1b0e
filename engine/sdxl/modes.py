"""Performance modes (spec §9) and aspect ratios (spec §10). Data plus two small pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.core.constants import DEFAULT_ASPECT_RATIO, PERFORMANCE_NAMES, SDXL_ASPECT_RATIOS
from engine.core.request import parse_aspect_ratio

__all__ = [
    "ASPECT_RATIOS", "DEFAULT_ASPECT_RATIO", "PERFORMANCE_MODES", "PerformanceMode", "SamplingSettings",
    "aspect_ratio_ui_label", "performance_for_steps", "performance_mode",
]

ASPECT_RATIOS = SDXL_ASPECT_RATIOS


@dataclass(frozen=True)
class SamplingSettings:
    """The task fields a performance mode may overwrite (Fooocus ``set_*_defaults``)."""

    sampler: str
    scheduler: str
    cfg: float
    sharpness: float
    adaptive_cfg: float
    adm_scaler_positive: float
    adm_scaler_negative: float
    adm_scaler_end: float
    refiner_model: str | None
    refiner_switch: float


@dataclass(frozen=True)
class PerformanceMode:
    """One row of spec §9. ``lora_file`` None = a plain mode that only sets the step count."""

    name: str
    steps: int
    #: Steps for Upscale (UOV); Vary keeps ``steps``.
    steps_uov: int
    lora_file: str | None = None
    lora_weight: float = 1.0
    sampler: str | None = None
    scheduler: str | None = None

    @property
    def restricted(self) -> bool:
        """The fast modes: CFG 1, so negative prompt, sharpness, ADM and refiner do nothing."""
        return self.lora_file is not None

    @property
    def lora(self) -> tuple[str, float] | None:
        return None if self.lora_file is None else (self.lora_file, self.lora_weight)

    def apply(self, settings: SamplingSettings) -> SamplingSettings:
        """spec §1 step 3: the fast modes force their sampler/scheduler, CFG 1, sharpness 0,
        adaptive CFG 1, ADM 1/1/0 and no refiner (switch 1.0); the others change nothing."""
        if not self.restricted:
            return settings
        return replace(settings, sampler=self.sampler or settings.sampler,
                       scheduler=self.scheduler or settings.scheduler, cfg=1.0, sharpness=0.0, adaptive_cfg=1.0,
                       adm_scaler_positive=1.0, adm_scaler_negative=1.0, adm_scaler_end=0.0,
                       refiner_model=None, refiner_switch=1.0)


# spec §9 table (Fooocus modules/flags.py Steps, StepsUOV, PerformanceLoRA; async_worker set_*_defaults).
PERFORMANCE_MODES: dict[str, PerformanceMode] = {mode.name: mode for mode in (
    PerformanceMode("Quality", steps=60, steps_uov=36),
    PerformanceMode("Speed", steps=30, steps_uov=18),
    PerformanceMode("Extreme Speed", steps=8, steps_uov=8, lora_file="sdxl_lcm_lora.safetensors",
                    lora_weight=1.0, sampler="lcm", scheduler="lcm"),
    PerformanceMode("Lightning", steps=4, steps_uov=4, lora_file="sdxl_lightning_4step_lora.safetensors",
                    lora_weight=1.0, sampler="euler", scheduler="sgm_uniform"),
    PerformanceMode("Hyper-SD", steps=4, steps_uov=4, lora_file="sdxl_hyper_sd_4step_lora.safetensors",
                    lora_weight=0.8, sampler="dpmpp_sde_gpu", scheduler="karras"),
)}
assert tuple(PERFORMANCE_MODES) == PERFORMANCE_NAMES


def performance_mode(name: str) -> PerformanceMode:
    return PERFORMANCE_MODES[name]


def performance_for_steps(steps: int) -> str | None:
    """spec §9: metadata without a performance field maps its step count back (first match, so
    4 steps reads as Lightning)."""
    for mode in PERFORMANCE_MODES.values():
        if mode.steps == steps:
            return mode.name
    return None


def aspect_ratio_ui_label(aspect_ratio: str) -> str:
    """Fooocus's dropdown label for 'W*H': 'W×H <span …> ∣ a:b</span>' (spec §10)."""
    width, height = parse_aspect_ratio(aspect_ratio)
    divisor = math.gcd(width, height)
    return (f"{width}\u00d7{height} <span style=\"color: grey;\"> \u2223 "
            f"{width // divisor}:{height // divisor}</span>")
