"""Noise schedules (spec §7.2) and Fooocus's step planning (partial denoise, quirks).

Every scheduler returns ``steps + 1`` float32 sigmas, descending, ending in 0 (``ddim_uniform`` can
return more; ``turbo`` at most 11). ``plan_sigmas`` adds what Fooocus does around the scheduler:
partial denoise, the penultimate-sigma drop of some samplers, the ``ddim_uniform`` cut, and the
turbo/align_your_steps → normal quirk, and it says which sigmas the Brownian tree's interval comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.sdxl.sampling.model_sampling import ModelSampling

#: Schedulers that ``calculate_sigmas`` implements directly.
BASE_SCHEDULERS: tuple[str, ...] = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "turbo", "align_your_steps",
)

#: UI scheduler names that only swap the model sampling (spec §1 step 12): the schedule they run.
SCHEDULER_ALIASES: dict[str, str] = {"lcm": "sgm_uniform", "tcd": "sgm_uniform", "edm_playground_v2.5": "karras"}

#: The schedulers KSampler knows; others silently become "normal" there (spec §7.2 [quirk]).
KSAMPLER_SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")

#: KSampler computes one extra sigma for these samplers and drops the penultimate one (spec §7.2).
KSAMPLER_DISCARD_PENULTIMATE: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
#: Fooocus's own calculate_sigmas (the Brownian interval) only knows the dpm_2 pair.
FOOOCUS_DISCARD_PENULTIMATE: frozenset[str] = frozenset({"dpm_2", "dpm_2_ancestral"})

#: Align Your Steps, SDXL noise levels (NVIDIA's published table; spec §7.2 lists them rounded).
AYS_SDXL_NOISE_LEVELS: tuple[float, ...] = (
    14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
    0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582,
)

#: Partial denoise only applies below this (Fooocus treats 0.99995 as a full denoise).
FULL_DENOISE_ABOVE = 0.9999


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) schedule, ρ = 7, float32 ramp. Adapted from k-diffusion (MIT) get_sigmas_karras."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Log-uniform sigmas. Adapted from k-diffusion (MIT) get_sigmas_exponential."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def normal_sigmas(ms: ModelSampling, n: int, *, sgm: bool = False) -> Tensor:
    """Timesteps uniform from t(σmax) to t(σmin), mapped to sigma; ``sgm`` drops the last point."""
    start = ms.timestep(torch.tensor(ms.sigma_max))
    end = ms.timestep(torch.tensor(ms.sigma_min))
    timesteps = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return _append_zero(ms.sigma(timesteps).to(torch.float32))


def simple_sigmas(ms: ModelSampling, n: int) -> Tensor:
    """Every (len/n)-th table sigma from the top: ``σ_table[−(1 + int(i·len/n))]``."""
    stride = len(ms.sigmas) / n
    return _append_zero(torch.stack([ms.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_uniform_sigmas(ms: ModelSampling, n: int) -> Tensor:
    """``σ_table[1 + k·(len//n)]`` for every index below len, descending. May exceed n + 1 values."""
    index = torch.arange(1, len(ms.sigmas), len(ms.sigmas) // n)
    return _append_zero(ms.sigmas[index].flip(0))


def turbo_sigmas(ms: ModelSampling, n: int) -> Tensor:
    """SD-Turbo: timesteps 999, 899, … 99, the first ``n`` of them (at most 10)."""
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[:n]
    return _append_zero(ms.sigma(timesteps).to(torch.float32))


def align_your_steps_sigmas(n: int) -> Tensor:
    """AYS SDXL levels, log-linearly interpolated to ``n + 1`` points in float64, last set to 0."""
    levels = np.array(AYS_SDXL_NOISE_LEVELS)
    if n + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        log_levels = np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, log_levels))[::-1].copy()
    levels[-1] = 0.0
    return torch.tensor(levels, dtype=torch.float32)


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> Tensor:
    """The schedule ``scheduler`` gives on ``ms`` for ``steps`` steps (spec §7.2).

    ``ms`` must match the scheduler: use ``model_sampling_for(scheduler)`` for ``lcm``, ``tcd`` and
    ``edm_playground_v2.5`` (they run ``sgm_uniform``/``karras`` on their own model sampling).
    """
    scheduler = SCHEDULER_ALIASES.get(scheduler, scheduler)
    if scheduler == "karras":
        return karras_sigmas(steps, ms.sigma_min, ms.sigma_max)
    if scheduler == "exponential":
        return exponential_sigmas(steps, ms.sigma_min, ms.sigma_max)
    if scheduler == "normal":
        return normal_sigmas(ms, steps)
    if scheduler == "sgm_uniform":
        return normal_sigmas(ms, steps, sgm=True)
    if scheduler == "simple":
        return simple_sigmas(ms, steps)
    if scheduler == "ddim_uniform":
        return ddim_uniform_sigmas(ms, steps)
    if scheduler == "turbo":
        return turbo_sigmas(ms, steps)
    if scheduler == "align_your_steps":
        return align_your_steps_sigmas(steps)
    raise ValueError(f"unknown scheduler {scheduler!r}")


@dataclass(frozen=True)
class SigmaPlan:
    """What one sampling run iterates, and where its Brownian tree's interval comes from."""

    sigmas: Tensor  # [steps + 1], float32, last is 0: what the sampler iterates
    brownian_sigmas: Tensor  # float32: Fooocus's calculate_sigmas, before any cut

    @property
    def brownian_sigma_min(self) -> float:
        """Smallest non-zero sigma of the Brownian schedule (spec §7.4.3)."""
        return float(self.brownian_sigmas[self.brownian_sigmas > 0].min())

    @property
    def brownian_sigma_max(self) -> float:
        return float(self.brownian_sigmas.max())


def _schedule(ms: ModelSampling, scheduler: str, steps: int, denoise: float, discard_penultimate: bool) -> Tensor:
    """calculate_sigmas with the penultimate drop and partial denoise (spec §7.2)."""

    def full(n: int) -> Tensor:
        if not discard_penultimate:
            return calculate_sigmas(ms, scheduler, n)
        sigmas = calculate_sigmas(ms, scheduler, n + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])

    if denoise > FULL_DENOISE_ABOVE:
        return full(steps)
    # Partial denoise keeps the step count: a longer schedule, of which the last steps+1 remain.
    return full(int(steps / denoise))[-(steps + 1):]


def plan_sigmas(
    ms: ModelSampling, sampler: str, scheduler: str, steps: int, denoise: float = 1.0, *, fooocus_quirks: bool = True
) -> SigmaPlan:
    """Fooocus's sigma plan for one image (spec §7.2, §7.4.3).

    - ``sigmas``: KSampler's list: penultimate drop for dpm_2/dpm_2_ancestral/uni_pc(_bh2), partial
      denoise, then cut to ``steps + 1`` with the last set to 0 (only ``ddim_uniform`` is longer).
    - ``brownian_sigmas``: ``default_pipeline.calculate_sigmas``: the intended scheduler, penultimate
      drop only for the dpm_2 pair, no cut.
    - ``fooocus_quirks``: ``turbo`` and ``align_your_steps`` sample with ``normal`` (KSampler does not
      know them), while the Brownian interval still uses the intended schedule.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    scheduler = SCHEDULER_ALIASES.get(scheduler, scheduler)
    sampler_scheduler = scheduler
    if fooocus_quirks and scheduler not in KSAMPLER_SCHEDULERS:
        sampler_scheduler = "normal"
    sigmas = _schedule(ms, sampler_scheduler, steps, denoise, sampler in KSAMPLER_DISCARD_PENULTIMATE)
    if len(sigmas) > steps + 1:
        # KSampler(last_step=steps, force_full_denoise=True): keep steps+1 and end at 0.
        sigmas = sigmas[: steps + 1].clone()
        sigmas[-1] = 0.0
    brownian = _schedule(ms, scheduler, steps, denoise, sampler in FOOOCUS_DISCARD_PENULTIMATE)
    return SigmaPlan(sigmas=sigmas, brownian_sigmas=brownian)
