"""Sampler behaviour the golden trajectories do not pin: callbacks, swaps, noise streams, edge cases."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from engine.core.constants import SAMPLER_NAMES
from engine.sdxl.sampling.model_sampling import DiscreteEPS
from engine.sdxl.sampling.noise import BrownianNoise, prepare_noise
from engine.sdxl.sampling.samplers import SAMPLERS, SDE_SAMPLERS, _lms_coefficient, sample
from engine.sdxl.sampling.schedules import plan_sigmas

SHAPE = (1, 4, 6, 8)


class TargetDenoiser:
    """A perfect denoiser for data concentrated at ``target``: x0 = target whatever x and sigma."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.calls = 0
        self.tag = "base"
        self.tags: list[str] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.tags.append(self.tag)
        self.inputs.append(x)
        assert sigma.shape == (x.shape[0],)
        return self.target.expand_as(x).clone()


def _run(name: str, steps: int = 8, seed: int = 5, model: TargetDenoiser | None = None,
         **kwargs: Any) -> tuple[torch.Tensor, TargetDenoiser]:
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, name, "karras", steps)
    noise, generator = prepare_noise(seed, SHAPE)
    model = model or TargetDenoiser(torch.full(SHAPE, 0.25))
    brownian = BrownianNoise(SHAPE, plan.brownian_sigma_min, plan.brownian_sigma_max, seed)
    return sample(model, name, plan.sigmas, noise, generator=generator, brownian=brownian, **kwargs), model


def test_registry_covers_the_ui_list() -> None:
    assert set(SAMPLERS) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_reaches_the_data(name: str) -> None:
    out, model = _run(name)
    assert out.shape == SHAPE and bool(torch.isfinite(out).all())
    expected = torch.full(SHAPE, 0.25)
    if name in ("dpm_fast", "dpm_adaptive"):
        # They stop at the last non-zero sigma. With a perfect denoiser the ODE is linear in sigma:
        # x(σ) = x0 + σ/σ0·(x(σ0) − x0), which DPM-Solver integrates exactly.
        sigmas = plan_sigmas(DiscreteEPS(), name, "karras", 8).sigmas
        noise, _ = prepare_noise(5, SHAPE)
        expected = 0.25 + sigmas[-2] / sigmas[0] * (noise * (1 + sigmas[0] ** 2) ** 0.5 - 0.25)
    # TCD ends on the VP sample at t = 0, which keeps noise of scale sqrt(1 − ᾱ_0) ≈ 0.03.
    torch.testing.assert_close(out, expected, atol=0.2 if name == "tcd" else 5e-3, rtol=0)
    assert model.calls >= 1


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_raising_callback_stops_at_once(name: str) -> None:
    model = TargetDenoiser(torch.full(SHAPE, 0.25))
    calls_when_stopped: list[int] = []

    def callback(info: dict[str, Any]) -> None:
        assert set(info) >= {"x", "i", "sigma", "sigma_hat", "denoised"}
        calls_when_stopped.append(model.calls)
        raise Stop

    with pytest.raises(Stop):
        _run(name, model=model, callback=callback)
    assert len(calls_when_stopped) == 1
    assert model.calls == calls_when_stopped[0]  # no model call after the callback raised


@pytest.mark.parametrize(("name", "calls_per_step"), [("euler", 1), ("dpmpp_2m_sde_gpu", 1), ("dpmpp_sde", 2)])
def test_joint_swap_in_the_callback_takes_effect_after_step_switch(name: str, calls_per_step: int) -> None:
    """Spec §8: the swap fires after step `switch` was evaluated; dpmpp_sde's 2nd call already swaps."""
    switch = 3
    model = TargetDenoiser(torch.full(SHAPE, 0.25))

    def callback(info: dict[str, Any]) -> None:
        if info["i"] == switch:
            model.tag = "refiner"

    _run(name, model=model, callback=callback)
    base_calls = switch * calls_per_step + 1
    assert model.tags[:base_calls] == ["base"] * base_calls
    assert set(model.tags[base_calls:]) == {"refiner"}


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm", "lcm", "dpmpp_2s_ancestral"])
def test_ancestral_noise_comes_from_the_generator_only(name: str) -> None:
    state = torch.random.get_rng_state()
    a, _ = _run(name, seed=5)
    b, _ = _run(name, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    # Same initial noise, different ancestral stream: the result changes.
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, name, "karras", 8)
    noise, _ = prepare_noise(5, SHAPE)
    c = sample(TargetDenoiser(torch.full(SHAPE, 0.25)), name, plan.sigmas[:4], noise,
               generator=torch.Generator().manual_seed(6))
    d = sample(TargetDenoiser(torch.full(SHAPE, 0.25)), name, plan.sigmas[:4], noise,
               generator=torch.Generator().manual_seed(5))
    assert not torch.equal(c, d)


def test_start_latent_and_max_denoise() -> None:
    ms = DiscreteEPS()
    noise = torch.randn(SHAPE)
    latent = torch.randn(SHAPE)
    sigmas = plan_sigmas(ms, "euler", "karras", 4).sigmas
    model = TargetDenoiser(torch.zeros(SHAPE))
    sample(model, "euler", sigmas, noise, latent=latent)
    torch.testing.assert_close(model.inputs[0], noise * (1 + sigmas[0] ** 2) ** 0.5 + latent)
    model = TargetDenoiser(torch.zeros(SHAPE))
    sample(model, "euler", sigmas[2:], noise, latent=latent)
    torch.testing.assert_close(model.inputs[0], noise * sigmas[2] + latent)
    model = TargetDenoiser(torch.zeros(SHAPE))
    sample(model, "euler", sigmas[2:], noise, max_denoise=True)
    torch.testing.assert_close(model.inputs[0], noise * (1 + sigmas[2] ** 2) ** 0.5)


def test_separate_swap_continues_without_forcing_the_last_sigma() -> None:
    """Spec §8 separate: base over sigmas[:switch+1] stops at σ_switch (not 0), the refiner goes on."""
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, "euler", "karras", 8)
    noise, generator = prepare_noise(1, SHAPE)
    base_model = TargetDenoiser(torch.full(SHAPE, 0.25))
    half = sample(base_model, "euler", plan.sigmas[:5], noise, generator=generator)
    # The ODE with a perfect denoiser is linear in sigma: x(σ) = x0 + σ/σ0·(x(σ0) − x0).
    expected = 0.25 + plan.sigmas[4] / plan.sigmas[0] * (noise * (1 + plan.sigmas[0] ** 2) ** 0.5 - 0.25)
    torch.testing.assert_close(half, expected, atol=1e-5, rtol=1e-5)
    refiner_model = TargetDenoiser(torch.full(SHAPE, 0.25))
    out = sample(refiner_model, "euler", plan.sigmas[4:], torch.zeros_like(noise), latent=half, generator=generator)
    torch.testing.assert_close(refiner_model.inputs[0], half)
    torch.testing.assert_close(out, torch.full(SHAPE, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SDE_SAMPLERS))
def test_sde_samplers_build_a_tree_from_the_generator_seed(name: str) -> None:
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, name, "karras", 6)
    noise, generator = prepare_noise(9, SHAPE)
    implicit = sample(TargetDenoiser(torch.zeros(SHAPE)), name, plan.sigmas, noise, generator=generator)
    tree = BrownianNoise(SHAPE, plan.brownian_sigma_min, plan.brownian_sigma_max, 9)
    explicit = sample(TargetDenoiser(torch.zeros(SHAPE)), name, plan.sigmas, noise, brownian=tree)
    torch.testing.assert_close(implicit, explicit)
    with pytest.raises(ValueError, match="BrownianNoise"):
        sample(TargetDenoiser(torch.zeros(SHAPE)), name, plan.sigmas, noise)


def test_unknown_sampler_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(TargetDenoiser(torch.zeros(SHAPE)), "plms", torch.tensor([1.0, 0.0]), torch.zeros(SHAPE))


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2", "dpm_fast", "restart", "lms"])
def test_one_step_schedules_do_not_crash(name: str) -> None:
    out, _ = _run(name, steps=1)
    assert bool(torch.isfinite(out).all())


def test_lms_coefficients_integrate_the_interpolant_exactly() -> None:
    t = np.array([14.6, 9.0, 5.0, 2.5, 1.0, 0.0], dtype=np.float32)
    for i in range(len(t) - 1):
        order = min(i + 1, 4)
        coeffs = [_lms_coefficient(order, t, i, j) for j in range(order)]
        # The Lagrange basis sums to 1, so the weights sum to the step length.
        assert sum(coeffs) == pytest.approx(float(t[i + 1] - t[i]), rel=1e-6)


def test_tcd_callback_gets_the_vp_sample_at_s() -> None:
    """Fooocus passes TCD's callback sqrt(a_s)·x0 + sqrt(1 − a_s)·eps (issue 12), not x0.

    Expected values from the TCD paper's step, written out here: s = floor(0.7·t_next), a_s the
    SDXL ᾱ at s (0 for the last step), eps = (x − x0)/σ.
    """
    from engine.sdxl.sampling.model_sampling import DistilledEPS
    from engine.sdxl.sampling.samplers import TCD_GAMMA

    ms = DistilledEPS()
    sigmas = plan_sigmas(ms, "tcd", "sgm_uniform", 4, 1.0).sigmas
    target = torch.full((1, *SHAPE[1:]), 0.25)
    noise, generator = prepare_noise(3, SHAPE)
    seen: list[dict[str, Any]] = []
    sample(TargetDenoiser(target), "tcd", sigmas, noise, generator=generator, model_sampling=ms,
           callback=lambda info: seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in info.items()}))
    assert len(seen) == len(sigmas) - 1
    for i, info in enumerate(seen):
        s = 0 if i + 1 == len(sigmas) - 1 else int(math.floor((1 - TCD_GAMMA) * int(ms.timestep(sigmas[i + 1]))))
        a_s = ms.alphas_cumprod[s]
        eps = (info["x"] - target) / sigmas[i]
        torch.testing.assert_close(info["denoised"], a_s.sqrt() * target + (1 - a_s).sqrt() * eps)
        assert not torch.allclose(info["denoised"], target.expand_as(info["x"]))  # not x0
