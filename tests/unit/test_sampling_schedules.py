"""Model sampling and schedule planning behaviour not pinned by the golden files."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.constants import SCHEDULER_NAMES
from engine.sdxl.sampling.model_sampling import (
    ContinuousEDM,
    DiscreteEPS,
    DistilledEPS,
    DistilledLCM,
    is_max_denoise,
    model_sampling_for,
    start_latent,
)
from engine.sdxl.sampling.schedules import calculate_sigmas, plan_sigmas


@pytest.mark.parametrize(("scheduler", "kind"), [
    ("karras", DiscreteEPS), ("lcm", DistilledLCM), ("tcd", DistilledEPS), ("edm_playground_v2.5", ContinuousEDM),
])
def test_model_sampling_for(scheduler: str, kind: type) -> None:
    assert type(model_sampling_for(scheduler)) is kind


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_every_ui_scheduler_gives_a_descending_schedule_ending_in_zero(scheduler: str, steps: int) -> None:
    sigmas = calculate_sigmas(model_sampling_for(scheduler), scheduler, steps)
    assert sigmas.dtype == torch.float32 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[:-1] > 0).all()) and bool((sigmas[1:] <= sigmas[:-1]).all())
    if scheduler == "turbo":
        assert len(sigmas) == min(steps, 10) + 1
    elif scheduler == "ddim_uniform":
        assert len(sigmas) >= steps + 1
    else:
        assert len(sigmas) == steps + 1


def test_unknown_scheduler_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown scheduler"):
        calculate_sigmas(DiscreteEPS(), "cosine", 10)


@pytest.mark.parametrize("scheduler", ["turbo", "align_your_steps"])
def test_quirk_samples_normal_but_keeps_the_intended_brownian_interval(scheduler: str) -> None:
    ms = DiscreteEPS()
    quirky = plan_sigmas(ms, "dpmpp_2m_sde_gpu", scheduler, 8)
    assert torch.equal(quirky.sigmas, calculate_sigmas(ms, "normal", 8))
    assert torch.equal(quirky.brownian_sigmas, calculate_sigmas(ms, scheduler, 8))
    fixed = plan_sigmas(ms, "dpmpp_2m_sde_gpu", scheduler, 8, fooocus_quirks=False)
    assert torch.equal(fixed.sigmas, calculate_sigmas(ms, scheduler, 8))


def test_uni_pc_drops_the_penultimate_sigma_but_the_brownian_schedule_does_not() -> None:
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, "uni_pc", "karras", 10)
    longer = calculate_sigmas(ms, "karras", 11)
    assert torch.equal(plan.sigmas, torch.cat([longer[:-2], longer[-1:]]))
    assert torch.equal(plan.brownian_sigmas, calculate_sigmas(ms, "karras", 10))


def test_ddim_uniform_is_cut_to_steps_plus_one_ending_in_zero() -> None:
    plan = plan_sigmas(DiscreteEPS(), "euler", "ddim_uniform", 30)
    assert len(plan.brownian_sigmas) == 32
    assert len(plan.sigmas) == 31 and float(plan.sigmas[-1]) == 0.0
    assert torch.equal(plan.sigmas[:30], plan.brownian_sigmas[:30])


def test_partial_denoise_keeps_the_step_count_and_starts_lower() -> None:
    ms = DiscreteEPS()
    plan = plan_sigmas(ms, "euler", "karras", 10, denoise=0.5)
    assert len(plan.sigmas) == 11
    assert torch.equal(plan.sigmas, calculate_sigmas(ms, "karras", 20)[-11:])
    assert not is_max_denoise(ms, float(plan.sigmas[0]))


@pytest.mark.parametrize(("steps", "denoise"), [(0, 1.0), (10, 0.0), (10, 1.5)])
def test_plan_rejects_bad_arguments(steps: int, denoise: float) -> None:
    with pytest.raises(ValueError):
        plan_sigmas(DiscreteEPS(), "euler", "karras", steps, denoise)


def test_discrete_timestep_and_sigma_round_trip() -> None:
    ms = DiscreteEPS()
    t = torch.tensor([0, 1, 250, 998, 999])
    assert torch.equal(ms.timestep(ms.sigma(t)), t)
    # Fractional timesteps interpolate log-sigma linearly.
    mid = ms.sigma(torch.tensor(10.5))
    assert float(mid) == pytest.approx(math.sqrt(float(ms.sigmas[10]) * float(ms.sigmas[11])), rel=1e-6)
    assert ms.percent_to_sigma(0.0) > 1e8 and ms.percent_to_sigma(1.0) == 0.0


def test_distilled_timesteps_live_on_the_1000_grid() -> None:
    ms = DistilledEPS()
    assert int(ms.timestep(torch.tensor(ms.sigma_max))) == 999
    assert int(ms.timestep(torch.tensor(ms.sigma_min))) == 19
    assert float(ms.sigma(torch.tensor(999))) == pytest.approx(ms.sigma_max)


def test_lcm_boundary_condition() -> None:
    ms = DistilledLCM()
    x, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigma = torch.tensor([ms.sigma_max])
    x0 = x - eps * sigma.view(-1, 1, 1, 1)
    t = 9990.0  # 10·999: c_out ≈ 1, c_skip ≈ 0 at the top of the range
    c_skip, c_out = 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5
    torch.testing.assert_close(ms.calculate_denoised(sigma, eps, x), c_out * x0 + c_skip * x)


def test_edm_preconditioning() -> None:
    ms = ContinuousEDM()
    assert ms.sigma_min == pytest.approx(0.002, rel=1e-5) and ms.sigma_max == pytest.approx(120.0, rel=1e-5)
    sigma, x, out = torch.tensor([2.0]), torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    denominator = 4.0 + 0.25
    torch.testing.assert_close(ms.calculate_denoised(sigma, out, x), x * 0.25 / denominator + out * 2.0 * 0.5 / denominator**0.5)
    torch.testing.assert_close(ms.calculate_input(sigma, x), x / denominator**0.5)
    assert float(ms.sigma(ms.timestep(torch.tensor(3.0)))) == pytest.approx(3.0)


def test_start_latent_rule() -> None:
    ms = DiscreteEPS()
    noise, latent = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigma_max = torch.tensor(ms.sigma_max)
    assert is_max_denoise(ms, ms.sigma_max * (1 + 5e-6)) and is_max_denoise(ms, 20.0)
    torch.testing.assert_close(start_latent(noise, sigma_max, max_denoise=True), noise * (1 + sigma_max**2) ** 0.5)
    torch.testing.assert_close(start_latent(noise, torch.tensor(2.0), latent, max_denoise=False), noise * 2.0 + latent)
