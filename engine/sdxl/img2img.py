"""Where sampling starts for Vary, Upscale and Inpaint (spec §7.2, §7.4.2, §12.1–12.2; parity runs e–g).

- **Partial denoise** (Vary 0.5/0.85, Upscale 0.382, Improve Detail 0.5): the sigmas are the last
  ``steps+1`` of ``karras(int(steps/denoise))``, which :func:`engine.sdxl.sampling.schedules.plan_sigmas`
  already computes (golden "partial-denoise schedules"); :func:`partial_denoise_sigmas` is only the
  named entry point. The sampler starts from ``latent·scaling_factor + noise·σ₀`` (no ``√(1+σ₀²)``,
  because σ₀ < σ_max): :func:`initial_x`.
- **Inpaint** (denoise 1.0): σ₀ = σ_max, so the start is ``latent_fill·scaling_factor + noise·√(1+σ₀²)``;
  with "disable initial latent" (Modify Content) the start latent is zero, i.e. pure noise:
  :func:`inpaint_start_latent`. The denoiser wrapper still uses ``latent_fill`` as the known latent.

``noise`` is the task's initial noise, ``torch.manual_seed(task_seed); randn(latent.shape)``
(:func:`engine.sdxl.sampling.noise.prepare_noise`), exactly as for text-to-image.
"""

from __future__ import annotations

from torch import Tensor

from engine.sdxl.sampling.model_sampling import (
    DiscreteEPS,
    ModelSampling,
    is_max_denoise,
    model_sampling_for,
    start_latent,
)
from engine.sdxl.sampling.schedules import SigmaPlan, plan_sigmas

__all__ = ["initial_x", "inpaint_start_latent", "partial_denoise_sigmas"]


def partial_denoise_sigmas(sampler: str, scheduler: str, steps: int, denoise: float) -> SigmaPlan:
    """The sigma plan of an image task: ``steps`` steps ending at 0, starting lower when ``denoise < 1``."""
    return plan_sigmas(model_sampling_for(scheduler), sampler, scheduler, steps, denoise)


def initial_x(latent_vae: Tensor | None, noise: Tensor, sigma0: Tensor | float, *, scaling_factor: float,
              model_sampling: ModelSampling | None = None) -> Tensor:
    """The sampler's first ``x``: ``latent_vae·scaling_factor + noise·σ₀`` (img2img), or with
    ``√(1+σ₀²)`` in place of σ₀ when σ₀ is the model's σ_max (spec §7.4.2). ``latent_vae`` None is
    text-to-image (a zero latent). The same rule as the sampler entry point
    (:func:`engine.sdxl.sampling.samplers.sample` with ``latent=latent_vae·scaling_factor``), for callers
    that need ``x`` itself (a preview of the start, a separate refiner pass).
    """
    ms = model_sampling if model_sampling is not None else DiscreteEPS()
    latent = latent_vae * scaling_factor if latent_vae is not None else None
    return start_latent(noise, sigma0, latent, max_denoise=is_max_denoise(ms, float(sigma0)))


def inpaint_start_latent(latent_fill: Tensor, *, disable_initial_latent: bool) -> Tensor:
    """The VAE-space latent inpaint sampling starts from: ``latent_fill``, or zeros of its shape with
    "disable initial latent" (so the start is pure noise; the Brownian tree only takes its shape)."""
    return latent_fill.new_zeros(latent_fill.shape) if disable_initial_latent else latent_fill
