"""Model sampling: the sigma tables and the denoiser parametrisation (spec §7.1, §7.2, §7.4.2).

A ``ModelSampling`` object is the bridge between k-diffusion's continuous ``sigma`` and what a UNet
expects: the input scaling, the (discrete) UNet timestep, and how the UNet output becomes the
denoised ``x0``. Four variants exist in Fooocus 2.5.5:

- ``DiscreteEPS``: SDXL, 1000 linear-beta sigmas (the default).
- ``DistilledEPS`` / ``DistilledLCM``: the 50-sigma LCM/TCD table (scheduler ``tcd`` / ``lcm``).
- ``ContinuousEDM``: Playground v2.5 (scheduler ``edm_playground_v2.5``).

All tables are float32, as in Fooocus; the sigma table of the discrete model is computed in float64
and cast once (Fooocus's "Kohya consistent" schedule, spec §7.1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: spec §7.1: SDXL's linear beta schedule.
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TIMESTEPS = 1000

#: spec §7.2: the LCM/TCD distilled table keeps every 20th sigma (50 of 1000).
DISTILLED_TIMESTEPS = 50

#: spec §7.2: Playground v2.5 EDM parameters.
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 120.0
EDM_SIGMA_DATA = 0.5

#: spec §7.2: LCM boundary condition constants (sigma_data 0.5, timestep scaling 10).
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0

#: Fooocus returns this for percent_to_sigma(p <= 0): "infinitely noisy".
PERCENT_ZERO_SIGMA = 999999999.9


def _view_batch(sigma: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-item sigma ``[B]`` (or a scalar) so it broadcasts over ``x`` ``[B, C, H, W]``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))


def sdxl_alphas_cumprod() -> Tensor:
    """ᾱ_t of SDXL in float64 (spec §7.1): betas = linspace(√0.00085, √0.012, 1000)²."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class ModelSampling:
    """EPS model sampling over an ascending float32 sigma table (spec §7.1).

    ``timestep(sigma)`` is the index of the nearest table entry in log space (an integer, not
    diffusers' interpolated value); ``sigma(t)`` interpolates log-sigma linearly between entries.
    """

    name = "eps"
    sigma_data = 1.0

    def __init__(self, sigmas: Tensor, alphas_cumprod: Tensor) -> None:
        self.sigmas = sigmas.to(torch.float32)  # [N], ascending
        self.log_sigmas = self.sigmas.log()
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)  # [1000], the full SDXL table

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        """Nearest table index in log space, same shape as ``sigma`` (int64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().to(self.log_sigmas.device).reshape(1, -1) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a (possibly fractional) table index: log-linear interpolation."""
        timestep = torch.as_tensor(timestep)
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at ``percent`` of the way through the timestep range (0 → noisiest, 1 → clean)."""
        if percent <= 0.0:
            return PERCENT_ZERO_SIGMA
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """UNet input scaling: ``x / sqrt(σ² + σ_data²)``."""
        sigma = _view_batch(sigma, x)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """EPS parametrisation: ``x0 = x − σ·ε``."""
        sigma = _view_batch(sigma, model_output)
        return x - model_output * sigma


class DiscreteEPS(ModelSampling):
    """SDXL base/refiner model sampling: 1000 discrete sigmas, σ 0.0291675 … 14.614642 (spec §7.1)."""

    def __init__(self) -> None:
        alphas_cumprod = sdxl_alphas_cumprod()
        # float64 math, then one cast to float32: Fooocus's "Kohya consistent" table.
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        super().__init__(sigmas.to(torch.float32), alphas_cumprod.to(torch.float32))


class DistilledEPS(ModelSampling):
    """The 50-sigma LCM/TCD table ``σ_table[999 − 20k]``; timesteps stay on the 1000 grid (spec §7.2)."""

    name = "tcd"

    def __init__(self) -> None:
        full = DiscreteEPS()
        self.skip_steps = NUM_TIMESTEPS // DISTILLED_TIMESTEPS
        # Ascending: entry k is the original sigma at timestep 20k + 19.
        index = torch.arange(DISTILLED_TIMESTEPS) * self.skip_steps + (self.skip_steps - 1)
        super().__init__(full.sigmas[index].clone(), full.alphas_cumprod)

    def timestep(self, sigma: Tensor) -> Tensor:
        return super().timestep(sigma) * self.skip_steps + (self.skip_steps - 1)

    def sigma(self, timestep: Tensor) -> Tensor:
        timestep = torch.as_tensor(timestep)
        index = (timestep.float() - (self.skip_steps - 1)) / self.skip_steps
        return super().sigma(index).to(timestep.device)


class DistilledLCM(DistilledEPS):
    """LCM: the distilled table plus the consistency boundary condition (spec §7.2).

    ``x0' = c_out·x0 + c_skip·x`` with ``c_skip = 0.25/((10t)² + 0.25)`` and
    ``c_out = 10t/sqrt((10t)² + 0.25)``, t the distilled discrete timestep.
    """

    name = "lcm"

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        x0 = super().calculate_denoised(sigma, model_output, x)
        scaled_t = _view_batch(self.timestep(sigma).to(x.dtype), x) * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (scaled_t**2 + LCM_SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + LCM_SIGMA_DATA**2) ** 0.5
        return c_out * x0 + c_skip * x


class ContinuousEDM(ModelSampling):
    """Playground v2.5: EDM with σ ∈ [0.002, 120], σ_data 0.5, ``t = ln(σ)/4`` (spec §7.2).

    The sigma table (1000 log-spaced values) only serves the schedulers' σ_min/σ_max.
    """

    name = "edm_playground_v2.5"
    sigma_data = EDM_SIGMA_DATA

    def __init__(self) -> None:
        sigmas = torch.linspace(math.log(EDM_SIGMA_MIN), math.log(EDM_SIGMA_MAX), NUM_TIMESTEPS).exp()
        super().__init__(sigmas, sdxl_alphas_cumprod())

    def timestep(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma).log() * 0.25

    def sigma(self, timestep: Tensor) -> Tensor:
        return (torch.as_tensor(timestep) * 4.0).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return PERCENT_ZERO_SIGMA
        if percent >= 1.0:
            return 0.0
        log_min = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - log_min) * (1.0 - percent) + log_min)

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        """EDM preconditioning: ``c_skip·x + c_out·F``."""
        sigma = _view_batch(sigma, model_output)
        sd2 = self.sigma_data**2
        return x * sd2 / (sigma**2 + sd2) + model_output * sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5


def model_sampling_for(scheduler: str) -> ModelSampling:
    """The model sampling Fooocus patches in for a UI scheduler name (spec §1 step 12, §7.2)."""
    if scheduler == "lcm":
        return DistilledLCM()
    if scheduler == "tcd":
        return DistilledEPS()
    if scheduler == "edm_playground_v2.5":
        return ContinuousEDM()
    return DiscreteEPS()


def is_max_denoise(model_sampling: ModelSampling, sigma0: float) -> bool:
    """True when sampling starts from pure noise: σ0 ≈ σ_max (rel. 1e-5) or above (spec §7.4.2)."""
    sigma_max = model_sampling.sigma_max
    return math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max


def start_latent(noise: Tensor, sigma0: Tensor, latent: Tensor | None = None, *, max_denoise: bool) -> Tensor:
    """The sampler's first ``x`` (spec §7.4.2).

    From pure noise, Fooocus scales by ``sqrt(1 + σ0²)`` (not ``σ0``); img2img uses ``σ0``. The
    (already ×0.13025) latent is added in both cases.
    """
    sigma0 = torch.as_tensor(sigma0, dtype=noise.dtype, device=noise.device)
    x = noise * torch.sqrt(1.0 + sigma0**2.0) if max_denoise else noise * sigma0
    if latent is not None:
        x = x + latent.to(x)
    return x
