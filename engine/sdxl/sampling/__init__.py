"""Sampling math: model sampling, schedules, seeded noise, samplers and Fooocus guidance (spec §5–§8).

Pure tensor code; nothing here holds global state or touches a model file.
"""

from __future__ import annotations

from engine.sdxl.sampling.anisotropic import adaptive_anisotropic_filter
from engine.sdxl.sampling.guidance import (
    compute_cfg,
    progress_from_timestep,
    sharpness_sampling_function,
)
from engine.sdxl.sampling.model_sampling import ModelSampling, model_sampling_for
from engine.sdxl.sampling.noise import BrownianNoise, prepare_noise
from engine.sdxl.sampling.samplers import SAMPLERS, sample
from engine.sdxl.sampling.schedules import SigmaPlan, calculate_sigmas, plan_sigmas

__all__ = [
    "SAMPLERS", "BrownianNoise", "ModelSampling", "SigmaPlan", "adaptive_anisotropic_filter", "calculate_sigmas",
    "compute_cfg", "model_sampling_for", "plan_sigmas", "prepare_noise", "progress_from_timestep", "sample",
    "sharpness_sampling_function",
]
