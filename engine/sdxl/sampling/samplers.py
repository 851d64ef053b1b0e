"""The 24 Fooocus samplers in k-diffusion calling style, and ``sample`` (spec §7.3, §7.4, §8).

Every sampler is ``fn(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
generator=None) -> x`` where ``model(x, sigma_batch, **extra_args)`` returns the denoised ``x0`` and
``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` runs right after the model call of step
``i`` (before ``x`` moves on), as in k-diffusion. A callback may raise to stop at once, or change
the model object in place (the joint refiner swap, spec §8).

Noise: ancestral-style samplers (and dpm_fast/dpm_adaptive/heunpp2, which draw and discard) take
their normals from ``generator`` (``prepare_noise``'s stream, spec §7.4.4); SDE samplers call
``noise_sampler(sigma, sigma_next)`` (a ``BrownianNoise``, spec §7.4.3).

Provenance: the Karras/DPM-Solver samplers are adapted from k-diffusion (MIT, crowsonkb/k-diffusion
``k_diffusion/sampling.py``), heunpp2 from sd-webui-samplers-scheduler (MIT, Carzit), UniPC from the
UniPC authors' code (MIT, wl-zhao/UniPC ``uni_pc.py``). ddpm, lcm, tcd and restart are written from
their papers' update rules; the constants and the draw/step structure follow what the Fooocus
golden data (refdata/samplers) shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor

from engine.sdxl.sampling.model_sampling import (
    DiscreteEPS,
    ModelSampling,
    is_max_denoise,
    start_latent,
)
from engine.sdxl.sampling.noise import BrownianNoise, randn_like
from engine.sdxl.sampling.schedules import karras_sigmas

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]

#: Samplers that draw from the Brownian tree (spec §7.4.3); "_gpu" only moves the tree in Fooocus.
SDE_SAMPLERS: frozenset[str] = frozenset(
    {"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"}
)

#: Samplers the batched loop (issue 15) does not take: dpm_adaptive picks one step size from the
#: whole batch's error, so rows are not independent; heunpp2 draws its discarded churn normal from
#: ``generator`` directly, which a batch (one stream per row, no shared generator) cannot give it
#: without touching the global RNG.
NOT_ROW_INDEPENDENT: frozenset[str] = frozenset({"heunpp2", "dpm_adaptive"})

#: UniPC's final sigma: it cannot step to exactly 0.
UNIPC_FINAL_SIGMA = 0.001
#: TCD's gamma ("eta"): the fraction of the way back from the next timestep it jumps (Fooocus default).
TCD_GAMMA = 0.3
#: Restart defaults for >= 20 steps: restart from σ ≈ 0.1 back up to σ ≈ 2.
RESTART_MIN_SIGMA = 0.1
RESTART_MAX_SIGMA = 2.0


# ----------------------------------------------------------------------------------------------
# helpers (adapted from k-diffusion (MIT) sampling.py)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative ``(x − x0)/σ``."""
    return (x - denoised) / _append_dims(sigma, x.ndim)


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    v = torch.as_tensor(v)
    return v[(...,) + (None,) * (ndim - v.ndim)]


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step. Adapted from k-diffusion (MIT) get_ancestral_step."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _generator_noise(x: Tensor, generator: torch.Generator | None) -> NoiseSampler:
    """k-diffusion's default noise sampler (``randn_like``) on our explicit generator."""
    return lambda sigma, sigma_next: randn_like(x, generator)


def _report(callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _sigma_fn(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t_fn(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


# ----------------------------------------------------------------------------------------------
# Karras et al. samplers


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                 callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Euler steps (Karras et al. 2022, Algorithm 2 without churn). Adapted from k-diffusion (MIT) sample_euler."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                           callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
    """Ancestral Euler, eta 1. Adapted from k-diffusion (MIT) sample_euler_ancestral."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Heun steps, Euler into σ = 0. Adapted from k-diffusion (MIT) sample_heun."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                   callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Heun++: a third evaluation with σ-weighted slopes. Adapted from sd-webui-samplers-scheduler (MIT, Carzit)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        # The original draws a churn normal every step and discards it (churn is 0); the draw is
        # kept so the generator stream stays where Fooocus's is.
        randn_like(x, generator)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            denoised_3 = model(x_3, sigmas[i + 2] * s_in, **extra_args)
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                 callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver-2 style midpoint steps (log-σ midpoint). Adapted from k-diffusion (MIT) sample_dpm_2."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                           callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
    """Ancestral DPM-Solver-2, eta 1. Adapted from k-diffusion (MIT) sample_dpm_2_ancestral."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def _lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """∫ from t_i to t_{i+1} of the j-th Lagrange basis polynomial on t_i, t_{i−1}, …

    ``t`` is the float32 schedule. k-diffusion integrates numerically (scipy quad, exact for this
    cubic); we integrate the polynomial exactly. Its node differences are float32, as there.
    """
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * Polynomial([-float(t[i - k]), 1.0]) / float(t[i - j] - t[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(t[i + 1]) - antiderivative(t[i]))


@torch.no_grad()
def sample_lms(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
               callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
               generator: torch.Generator | None = None, order: int = 4) -> Tensor:
    """Linear multistep in σ (order 4). Adapted from k-diffusion (MIT) sample_lms."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().numpy().astype(np.float32)
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        ds = ds[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver (fast / adaptive). Adapted from k-diffusion (MIT) DPMSolver, PIDStepSizeController.


class _PIDStepSizeController:
    """A PID controller for ODE adaptive step size control."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1,
                 accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: Tensor) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class _DPMSolver:
    """DPM-Solver (Lu et al. 2022) in t = −log σ, on eps = (x − x0)/σ. Eta 0 (deterministic)."""

    def __init__(self, model: Denoiser, extra_args: dict[str, Any], callback: Callback | None) -> None:
        self.model = model
        self.extra_args = extra_args
        self.callback = callback

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            sigma = _sigma_fn(t)
            cache[key] = (x - self.model(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)) / sigma
        return cache[key]

    def step_1(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor]) -> Tensor:
        h = t_next - t
        return x - _sigma_fn(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 1 / 2) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma_fn(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma_fn(t_next) * h.expm1() * eps - _sigma_fn(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 1 / 3,
               r2: float = 2 / 3) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma_fn(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma_fn(s2) * (r2 * h).expm1() * eps
              - _sigma_fn(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma_fn(t_next) * h.expm1() * eps - _sigma_fn(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def report(self, x: Tensor, i: int, t: Tensor, denoised: Tensor) -> None:
        _report(self.callback, x, i, _sigma_fn(t), _sigma_fn(t), denoised)

    def fast(self, x: Tensor, t_start: Tensor, t_end: Tensor, nfe: int, noise_sampler: NoiseSampler) -> Tensor:
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache: dict[str, Tensor] = {}
            t, t_next = ts[i], ts[i + 1]
            eps = self.eps(cache, "eps", x, t)
            self.report(x, i, t, x - _sigma_fn(t) * eps)
            step = {1: self.step_1, 2: self.step_2, 3: self.step_3}[order]
            x = step(x, t, t_next, cache)
            # Eta is 0, so the noise term vanishes; the draw still happens (generator stream).
            x = x + 0.0 * noise_sampler(_sigma_fn(t), _sigma_fn(t_next))
        return x

    def adaptive(self, x: Tensor, t_start: Tensor, t_end: Tensor, noise_sampler: NoiseSampler, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                 icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81) -> Tensor:
        forward = t_end > t_start
        h_init = abs(h_init) * (1 if forward else -1)
        atol_t, rtol_t = torch.tensor(atol, device=x.device), torch.tensor(rtol, device=x.device)
        s = t_start
        x_prev = x
        pid = _PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, order, accept_safety)
        steps = 0
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            cache: dict[str, Tensor] = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            eps = self.eps(cache, "eps", x, s)
            denoised = x - _sigma_fn(s) * eps
            if order == 2:
                x_low = self.step_1(x, s, t, cache)
                x_high = self.step_2(x, s, t, cache)
            else:
                x_low = self.step_2(x, s, t, cache, r1=1 / 3)
                x_high = self.step_3(x, s, t, cache)
            delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high + 0.0 * noise_sampler(_sigma_fn(s), _sigma_fn(t))
                s = t
            steps += 1
            self.report(x, steps - 1, s, denoised)
        return x


def _dpm_solver_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_max, σ_min) of a schedule; a final 0 is replaced by the last non-zero sigma."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return sigmas[0].clone(), sigma_min.clone()


@torch.no_grad()
def sample_dpm_fast(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                    callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver-fast with ``len(sigmas) − 1`` evaluations from σ_max to the last non-zero σ.

    Only the schedule's ends are used, and sampling stops at σ_min (no final denoise), as in Fooocus.
    """
    if len(sigmas) <= 1:
        return x
    sigma_max, sigma_min = _dpm_solver_range(sigmas)
    solver = _DPMSolver(model, extra_args or {}, callback)
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    return solver.fast(x, _t_fn(sigma_max), _t_fn(sigma_min), len(sigmas) - 1, noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                        callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver-23 with adaptive steps over [σ_min, σ_max] of the schedule (its length is ignored).

    The callback's ``i`` counts attempted steps, rejected ones included.
    """
    if len(sigmas) <= 1:
        return x
    sigma_max, sigma_min = _dpm_solver_range(sigmas)
    solver = _DPMSolver(model, extra_args or {}, callback)
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    return solver.adaptive(x, _t_fn(sigma_max), _t_fn(sigma_min), noise_sampler)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ family


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                              callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                              generator: torch.Generator | None = None) -> Tensor:
    """Ancestral DPM-Solver++(2S), eta 1. Adapted from k-diffusion (MIT) sample_dpmpp_2s_ancestral."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                     callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++ (stochastic, r = 1/2, eta 1); two Brownian queries per step.

    Adapted from k-diffusion (MIT) sample_dpmpp_sde.
    """
    if noise_sampler is None:
        raise ValueError("dpmpp_sde needs a noise_sampler (BrownianNoise)")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    r = 1 / 2
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Step 1: ancestral half step to the log-σ midpoint.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s))
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma_fn(t), _sigma_fn(s)) * su
        denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
        # Step 2: full step with the blended x0.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next))
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma_fn(t), _sigma_fn(t_next)) * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                    callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M). Adapted from k-diffusion (MIT) sample_dpmpp_2m."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                        callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint solver, eta 1 (spec §7.3 formula; Fooocus's default sampler).

    Adapted from k-diffusion (MIT) sample_dpmpp_2m_sde.
    """
    if noise_sampler is None:
        raise ValueError("dpmpp_2m_sde needs a noise_sampler (BrownianNoise)")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised  # the last step lands on x0
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = h  # eta = 1
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                        callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(3M) SDE, eta 1. Adapted from k-diffusion (MIT) sample_dpmpp_3m_sde."""
    if noise_sampler is None:
        raise ValueError("dpmpp_3m_sde needs a noise_sampler (BrownianNoise)")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h: Tensor | None = None
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * 2  # h · (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                assert denoised_1 is not None and denoised_2 is not None and h_1 is not None
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                assert denoised_1 is not None
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ----------------------------------------------------------------------------------------------
# DDPM, LCM, TCD, Restart (our own code from the papers' update rules)


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020) posterior steps, taken in VP space between the given sigmas.

    With ᾱ = 1/(σ²+1): ``x_prev = (x − (1−α)/√(1−ᾱ)·ε)/√α + √((1−α)(1−ᾱ_prev)/(1−ᾱ))·z``,
    α = ᾱ/ᾱ_prev; no noise into σ = 0.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, sigma, denoised)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        alpha_cumprod = 1 / (sigma * sigma + 1)
        alpha_cumprod_prev = 1 / (sigma_next * sigma_next + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
        if sigma_next > 0:
            std = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt()
            x = x + std * noise_sampler(sigma, sigma_next)
            x = x * torch.sqrt(1.0 + sigma_next**2.0)
    return x


@torch.no_grad()
def sample_lcm(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
               callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """LCM multistep sampling (Luo et al. 2023): jump to x0, re-noise to the next sigma."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_tcd(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
               callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
               generator: torch.Generator | None = None, model_sampling: ModelSampling | None = None,
               gamma: float = TCD_GAMMA) -> Tensor:
    """Trajectory Consistency Distillation sampling (Zheng et al. 2024), strategic stochastic steps.

    Each step predicts x0, moves deterministically to the intermediate timestep
    ``s = floor((1 − γ)·t_next)`` (ᾱ_s from the 1000-step table; the last s is 0), then re-noises
    forward to ``σ_next``. ``model_sampling`` supplies the discrete timesteps and ᾱ.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    ms = model_sampling if model_sampling is not None else DiscreteEPS()
    s_in = x.new_ones([x.shape[0]])
    timesteps_s = torch.floor((1 - gamma) * ms.timestep(sigmas.cpu())).to(dtype=torch.long)
    timesteps_s[-1] = 0
    alpha_prod_s = ms.alphas_cumprod[timesteps_s].to(x.device)
    beta_prod_s = 1 - alpha_prod_s
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        eps = (x - denoised) / sigmas[i]
        x_s = alpha_prod_s[i + 1].sqrt() * denoised + beta_prod_s[i + 1].sqrt() * eps  # VP sample at s
        # Fooocus hands the callback (previews) this VP sample at s, not the x0 prediction.
        _report(callback, x, i, sigmas[i], sigmas[i], x_s)
        x = x_s
        if gamma > 0 and sigmas[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            # The variance is ≥ 0 in exact math; in float32 it can round to −1e-7 when s = t_next = 0
            # (non-distilled schedules reach t = 0), where Fooocus gets NaN. Clamp it.
            variance = (sigmas[i + 1] ** 2 + 1 - 1 / alpha_prod_s[i + 1]).clamp(min=0)
            x = x / alpha_prod_s[i + 1].sqrt() + noise * variance.sqrt()
        else:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2)
    return x


def _restart_segments(sigmas: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The (σ_from, σ_to) list of restart sampling with Fooocus's defaults.

    With >= 20 steps: ``steps − 9`` Karras main steps between the schedule's ends, and once the
    main path reaches σ ≈ 0.1 it jumps back to σ ≈ 2 and re-descends in 9 Karras steps (>= 36 steps:
    steps//4 restart steps, twice). Fewer steps: plain Heun over the given schedule.
    """
    steps = len(sigmas) - 1
    restart: dict[int, tuple[int, int]] = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = karras_sigmas(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        sigmas = main.to(sigmas.device)
        min_idx = int(torch.argmin(abs(sigmas - RESTART_MIN_SIGMA), dim=0))
        restart[min_idx] = (restart_steps + 1, restart_times)
    max_idx = int(torch.argmin(abs(sigmas - RESTART_MAX_SIGMA), dim=0))
    segments: list[tuple[Tensor, Tensor]] = []
    for i in range(len(sigmas) - 1):
        segments.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart and max_idx < i + 1:
            n, times = restart[i + 1]
            restart_sigmas = karras_sigmas(n, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1].to(sigmas.device)
            for _ in range(times):
                segments.extend(pairwise(restart_sigmas))
    return segments


@torch.no_grad()
def sample_restart(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                   callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """Restart sampling (Xu et al. 2023): Heun steps, plus noise whenever a segment climbs back up."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or _generator_noise(x, generator)
    s_in = x.new_ones([x.shape[0]])
    last_sigma: Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(_restart_segments(sigmas)):
        if last_sigma is not None and last_sigma < sigma:
            # Restart: forward-diffuse from last_sigma up to sigma.
            x = x + noise_sampler(last_sigma, sigma) * (sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, sigma * s_in, **extra_args)
        d = to_d(x, sigma, denoised)
        _report(callback, x, i, sigma, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next * s_in, **extra_args)
            x = x + (d + to_d(x_2, sigma_next, denoised_2)) / 2 * dt
        last_sigma = sigma_next
    return x


# ----------------------------------------------------------------------------------------------
# UniPC. Adapted from UniPC (MIT, wl-zhao/UniPC uni_pc.py: multistep_uni_pc_bh_update, sample),
# data prediction, B(h) variants, driven in sigma: ᾱ = 1/(σ²+1) is the VP schedule of σ.


def _vp_log_alpha(sigma: Tensor) -> Tensor:
    return 0.5 * torch.log(1 / (sigma * sigma + 1))


def _vp_alpha(sigma: Tensor) -> Tensor:
    return torch.exp(_vp_log_alpha(sigma))


def _vp_std(sigma: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: Tensor) -> Tensor:
    log_alpha = _vp_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_update(model_x0: Callable[[Tensor, Tensor], Tensor], x: Tensor, model_prev: list[Tensor],
                  t_prev: list[Tensor], t: Tensor, order: int, variant: str,
                  use_corrector: bool) -> tuple[Tensor, Tensor | None]:
    """One UniPC step of ``order`` (predictor UniP + optional corrector UniC), VP space."""
    lambda_prev_0 = _vp_lambda(t_prev[-1])
    model_prev_0 = model_prev[-1]
    alpha_t = torch.exp(_vp_log_alpha(t))
    h = _vp_lambda(t) - lambda_prev_0

    rks: list[float] = []
    d1s: list[Tensor] = []
    for i in range(1, order):
        rk = (_vp_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h
        rks.append(float(rk))
        d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
    rks.append(1.0)
    rks_t = torch.tensor(rks, device=x.device)

    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    factorial_i = 1
    r_rows, b = [], []
    for i in range(1, order + 1):
        r_rows.append(torch.pow(rks_t, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    r_mat = torch.stack(r_rows)
    b_vec = torch.stack(b).reshape(-1).to(r_mat)

    d1s_t = torch.stack(d1s, dim=1) if d1s else None  # [B, K, C, H, W]
    x_t_ = _vp_std(t) / _vp_std(t_prev[-1]) * x - alpha_t * h_phi_1 * model_prev_0
    pred_res: Tensor | float = 0.0
    if d1s_t is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
        pred_res = torch.einsum("k,bkchw->bchw", rhos_p.to(x.dtype), d1s_t)
    x_t = x_t_ - alpha_t * b_h * pred_res
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b_vec)
    rhos_c = rhos_c.to(x.dtype)
    model_t = model_x0(x_t, t)
    corr_res: Tensor | float = 0.0
    if d1s_t is not None:
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s_t)
    x_t = x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
    return x_t, model_t


def _sample_unipc(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None,
                  callback: Callback | None, variant: str) -> Tensor:
    """UniPC multistep (order min(3, steps − 1), lower order at the end), as Fooocus drives it."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas = sigmas.clone()
    if sigmas[-1] == 0:
        sigmas[-1] = UNIPC_FINAL_SIGMA
    steps = len(sigmas) - 1
    order = max(1, min(3, steps - 1))

    def model_x0(x_vp: Tensor, sigma: Tensor) -> Tensor:
        # k-diffusion denoiser → eps (the noise model UniPC wraps) → data prediction in VP space.
        x_in = x_vp * ((sigma**2 + 1.0) ** 0.5)
        eps = (x_in - model(x_in, sigma * s_in, **extra_args)) / sigma
        return (x_vp - _vp_std(sigma) * eps) / _vp_alpha(sigma)

    def report(i: int, x_vp: Tensor, denoised: Tensor) -> None:
        _report(callback, x_vp * ((sigmas[i] ** 2 + 1.0) ** 0.5), i, sigmas[i], sigmas[i], denoised)

    x = x / torch.sqrt(1.0 + sigmas[0] ** 2.0)  # into VP space
    model_prev = [model_x0(x, sigmas[0])]
    t_prev = [sigmas[0]]
    report(0, x, model_prev[-1])
    for step in range(1, steps + 1):
        step_order = step if step < order else min(order, steps + 1 - step)
        use_corrector = step < steps
        x, model_x = _unipc_update(model_x0, x, model_prev, t_prev, sigmas[step], step_order, variant, use_corrector)
        if step == steps:
            break
        if model_x is None:
            model_x = model_x0(x, sigmas[step])
        model_prev = (model_prev + [model_x])[-order:]
        t_prev = (t_prev + [sigmas[step]])[-order:]
        report(step, x, model_x)
    return x / _vp_alpha(sigmas[-1])


@torch.no_grad()
def sample_uni_pc(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                  callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """UniPC, B(h) = h (bh1)."""
    return _sample_unipc(model, x, sigmas, extra_args=extra_args, callback=callback, variant="bh1")


@torch.no_grad()
def sample_uni_pc_bh2(model: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict[str, Any] | None = None,
                      callback: Callback | None = None, noise_sampler: NoiseSampler | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """UniPC, B(h) = e^h − 1 (bh2)."""
    return _sample_unipc(model, x, sigmas, extra_args=extra_args, callback=callback, variant="bh2")


# ----------------------------------------------------------------------------------------------
# registry and entry point

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
    "restart": sample_restart,
    "ddim": sample_euler,  # Fooocus's ddim is euler (+ a random-inpaint-noise option we do not need)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}


def sample(
    model: Denoiser, sampler_name: str, sigmas: Tensor, noise: Tensor, *, latent: Tensor | None = None,
    generator: torch.Generator | None = None, brownian: NoiseSampler | None = None, callback: Callback | None = None,
    max_denoise: bool | None = None, model_sampling: ModelSampling | None = None,
    extra_args: dict[str, Any] | None = None, noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Run one sampler over ``sigmas`` from ``noise`` (+ ``latent``), like Fooocus's KSAMPLER.sample.

    - Start latent (spec §7.4.2): ``noise·sqrt(1+σ0²)`` when σ0 ≈ σ_max (``max_denoise``; by default
      decided from ``model_sampling``, SDXL EPS if None), else ``noise·σ0``; ``latent`` (already
      ×0.13025) is added. The sigmas are used as given: no last-sigma forcing, so a run over
      ``sigmas[:switch+1]`` followed by one from that latent with zero noise is the separate
      refiner swap (spec §8).
    - ``generator``: the stream for ancestral-style noise (``prepare_noise``'s generator).
    - ``brownian``: the image's ``BrownianNoise`` for the SDE samplers; if None, one is built from
      ``sigmas`` and the generator's seed.
    - ``model_sampling``: also gives TCD its timesteps and ᾱ table.
    - ``noise_sampler``: replaces both streams for every sampler that takes its noise through
      ``noise_sampler`` (a batch's per-item streams concatenated, issue 15); see
      ``NOT_ROW_INDEPENDENT`` for the two samplers a batch must not use.
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}")
    ms = model_sampling if model_sampling is not None else DiscreteEPS()
    sigmas = sigmas.to(noise.device)
    if max_denoise is None:
        max_denoise = is_max_denoise(ms, float(sigmas[0]))
    x = start_latent(noise, sigmas[0], latent, max_denoise=max_denoise)
    kwargs: dict[str, Any] = {"extra_args": extra_args, "callback": callback, "generator": generator}
    if noise_sampler is not None:
        kwargs["noise_sampler"] = noise_sampler
    elif sampler_name in SDE_SAMPLERS:
        if brownian is None:
            if generator is None:
                raise ValueError(f"{sampler_name} needs a BrownianNoise or a seeded generator")
            nonzero = sigmas[sigmas > 0]
            brownian = BrownianNoise(noise.shape, float(nonzero.min()), float(sigmas.max()),
                                     seed=generator.initial_seed(), device=noise.device)
        tree = brownian  # may live on another device (a CPU tree reproduces CPU Fooocus on a GPU)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: tree(sigma, sigma_next).to(noise.device)
    if sampler_name == "tcd":
        kwargs["model_sampling"] = ms
    return SAMPLERS[sampler_name](model, x, sigmas, **kwargs)
