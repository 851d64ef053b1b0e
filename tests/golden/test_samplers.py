"""Golden tests for refdata/samplers: model sampling tables, every schedule, and every trajectory.

The trajectories were made by Fooocus's full sampling path with the UNet replaced by the exact eps
of Gaussian data (``harness`` in trajectories.json). We rebuild that stand-in here, run our own
``plan_sigmas`` → ``prepare_noise`` → ``BrownianNoise`` → ``sample`` and compare everything the
file recorded. All cases are read from $HOOOCUS_REFDATA at collection time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import engine.sampling.samplers as samplers_module
from engine.sampling.guidance import sharpness_sampling_function
from engine.sampling.model_sampling import (
    ContinuousEDM,
    DiscreteEPS,
    DistilledEPS,
    DistilledLCM,
    ModelSampling,
    model_sampling_for,
)
from engine.sampling.noise import BrownianNoise, prepare_noise
from engine.sampling.samplers import sample
from engine.sampling.schedules import calculate_sigmas, plan_sigmas
from tests.paths import refdata_dir

ATOL = 1e-5  # refdata/README.md: CPU float32, op order may change the last bits
RTOL = 1e-5
SIGMA_RTOL = 1e-6  # schedules are elementwise float32 math: equal up to an ulp
SDXL_LATENT_SCALE = 0.13025  # process_latent_in / process_latent_out (refdata/README.md)

SAMPLERS_DIR = refdata_dir() / "samplers"


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


TRAJECTORIES = _load_json(SAMPLERS_DIR / "trajectories.json")
TABLES = _load_json(SAMPLERS_DIR / "model_sampling_tables.json")
CASES: list[dict[str, Any]] = TRAJECTORIES.get("cases", [])
SCHEDULES = sorted(TRAJECTORIES.get("schedules", {}).get("values", {}).items())
DENOISE_SCHEDULES = sorted(TRAJECTORIES.get("fooocus_calculate_sigmas_with_denoise", {}).get("values", {}).items())
TIMESTEP_EXAMPLES = TABLES.get("discrete_timestep_examples", [])
PERCENT_EXAMPLES = TABLES.get("discrete_percent_to_sigma", [])

#: The ``model_sampling`` names of the trajectory/schedule data.
MODEL_SAMPLING = {"eps": DiscreteEPS, "lcm": DistilledLCM, "tcd": DistilledEPS}


@pytest.fixture(scope="module")
def trajectory_tensors(refdata: Path) -> dict[str, torch.Tensor]:
    return load_file(str(refdata / "samplers" / "trajectories.safetensors"))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------
# model sampling tables


@pytest.mark.skipif(not TABLES, reason="no model_sampling_tables.json")
def test_discrete_tables() -> None:
    ms = DiscreteEPS()
    table = TABLES["discrete"]
    torch.testing.assert_close(ms.sigmas, torch.tensor(table["sigmas_float32"]), atol=0, rtol=SIGMA_RTOL)
    torch.testing.assert_close(ms.alphas_cumprod, torch.tensor(table["alphas_cumprod_float32"]), atol=0, rtol=SIGMA_RTOL)
    assert ms.sigma_min == pytest.approx(table["sigma_min"], rel=SIGMA_RTOL)
    assert ms.sigma_max == pytest.approx(table["sigma_max"], rel=SIGMA_RTOL)


@pytest.mark.parametrize("example", TIMESTEP_EXAMPLES, ids=lambda e: f"sigma{e['sigma']}")
def test_discrete_timestep(example: dict[str, float]) -> None:
    assert int(DiscreteEPS().timestep(torch.tensor(example["sigma"]))) == example["timestep"]


@pytest.mark.parametrize("example", PERCENT_EXAMPLES, ids=lambda e: f"p{e['percent']}")
def test_percent_to_sigma(example: dict[str, float]) -> None:
    assert DiscreteEPS().percent_to_sigma(example["percent"]) == pytest.approx(example["sigma"], rel=SIGMA_RTOL)


@pytest.mark.skipif("lcm_distilled" not in TABLES, reason="no distilled table")
def test_distilled_table() -> None:
    table = TABLES["lcm_distilled"]
    for ms in (DistilledLCM(), DistilledEPS()):
        torch.testing.assert_close(ms.sigmas, torch.tensor(table["sigmas_float32"]), atol=0, rtol=SIGMA_RTOL)
        assert len(ms.sigmas) == table["original_timesteps"]
        assert ms.skip_steps == table["skip_steps"]


# ------------------------------------------------------------------------------------------------
# schedules


def _schedule_setup(key: str) -> tuple[ModelSampling, str, int]:
    """``eps/karras/30`` → (model sampling, scheduler, steps); ``edm_playground_v2.5(...)/30`` → EDM karras."""
    parts = key.split("/")
    steps = int(parts[-1])
    if len(parts) == 3:
        return MODEL_SAMPLING[parts[0]](), parts[1], steps
    scheduler = parts[0].split("(")[0]
    return model_sampling_for(scheduler), scheduler, steps


@pytest.mark.parametrize(("key", "expected"), SCHEDULES, ids=[k for k, _ in SCHEDULES])
def test_schedule(key: str, expected: list[float]) -> None:
    ms, scheduler, steps = _schedule_setup(key)
    if scheduler == "edm_playground_v2.5":
        assert isinstance(ms, ContinuousEDM)
    sigmas = calculate_sigmas(ms, scheduler, steps)
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, torch.tensor(expected), atol=0, rtol=SIGMA_RTOL)


@pytest.mark.parametrize(("key", "expected"), DENOISE_SCHEDULES, ids=[k for k, _ in DENOISE_SCHEDULES])
def test_calculate_sigmas_with_denoise(key: str, expected: list[float]) -> None:
    """Fooocus's default_pipeline.calculate_sigmas is our plan's Brownian schedule."""
    sampler, scheduler, steps, denoise = key.split("/")
    plan = plan_sigmas(model_sampling_for(scheduler), sampler, scheduler, int(steps), float(denoise))
    torch.testing.assert_close(plan.brownian_sigmas, torch.tensor(expected), atol=0, rtol=SIGMA_RTOL)
    assert len(plan.sigmas) == int(steps) + 1


# ------------------------------------------------------------------------------------------------
# trajectories

HARNESS = TRAJECTORIES.get("harness", {})
POSITIVE_SHIFT = 0.3
NEGATIVE_SHIFT = -0.2
DATA_VARIANCE = 0.25  # data ~ N(mu_c, 0.5²)


@pytest.mark.skipif(not HARNESS, reason="no trajectories.json")
def test_harness_is_the_one_rebuilt_here() -> None:
    """Guard: the stand-in below hard-codes the harness described in the data file."""
    assert "0.25/(sigma^2+0.25)" in HARNESS["analytic_unet"]
    assert "calculate_denoised" in HARNESS["analytic_unet"]
    assert "0.5*sin(0.3*h + 0.7*w + c) + shift" in HARNESS["mu"]
    assert "+0.3 for the positive cond, -0.2 for the negative cond" in HARNESS["mu"]
    assert "1 - t/999" in HARNESS["analytic_unet"]


class AnalyticDenoiser:
    """The harness's UNet stand-in plus Fooocus's guidance: our k-diffusion ``model(x, sigma)``.

    The UNet returns the exact eps of Gaussian data N(mu_c, 0.5²):
    ``x_est = calculate_input(σ, x)·sqrt(σ²+1)``, ``x0 = mu + (x_est − mu)·0.25/(σ²+0.25)``,
    ``eps = (x_est − x0)/σ``, then the model sampling's ``calculate_denoised``. ``mu_scale`` is 1 for
    the base and the case's ``refiner_mu_scale`` after a swap.
    """

    def __init__(self, ms: ModelSampling, shape: tuple[int, ...], case: dict[str, Any]) -> None:
        self.ms = ms
        self.cfg, self.sharpness, self.adaptive_cfg = case["cfg"], case["sharpness"], case["adaptive_cfg"]
        self.mu_scale = 1.0
        self.calls = 0
        c = torch.arange(shape[1], dtype=torch.float32).view(1, -1, 1, 1)
        h = torch.arange(shape[2], dtype=torch.float32).view(1, 1, -1, 1)
        w = torch.arange(shape[3], dtype=torch.float32).view(1, 1, 1, -1)
        self.pattern = 0.5 * torch.sin(0.3 * h + 0.7 * w + c)

    def _x0(self, x: torch.Tensor, sigma: torch.Tensor, shift: float) -> torch.Tensor:
        mu = self.mu_scale * self.pattern + shift
        s = sigma.view(-1, 1, 1, 1)
        x_est = self.ms.calculate_input(sigma, x) * (s**2 + 1) ** 0.5
        x0_hat = mu + (x_est - mu) * DATA_VARIANCE / (s**2 + DATA_VARIANCE)
        return self.ms.calculate_denoised(sigma, (x_est - x0_hat) / s, x)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x0_neg = None if math.isclose(self.cfg, 1.0) else self._x0(x, sigma, NEGATIVE_SHIFT)
        return sharpness_sampling_function(
            x, self._x0(x, sigma, POSITIVE_SHIFT), x0_neg, cfg=self.cfg, sharpness=self.sharpness,
            adaptive_cfg=self.adaptive_cfg, timestep=self.ms.timestep(sigma),
        )


class RecordingBrownian:
    """Our BrownianNoise, recording each query and its raw increment W."""

    def __init__(self, inner: BrownianNoise) -> None:
        self.inner = inner
        self.queries: list[tuple[float, float]] = []
        self.increments: list[torch.Tensor] = []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        w = self.inner.increment(sigma, sigma_next)
        self.queries.append((float(sigma), float(sigma_next)))
        self.increments.append(w)
        return self.inner(sigma, sigma_next)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trajectory(case: dict[str, Any], trajectory_tensors: dict[str, torch.Tensor],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    name, steps = case["name"], case["steps"]
    shape = tuple(HARNESS["latent_shape"])
    ms = MODEL_SAMPLING[case["model_sampling"]]()

    # Schedule: the sampler's sigmas and the Brownian interval.
    plan = plan_sigmas(ms, case["sampler"], case["scheduler"], steps, case["denoise"])
    recorded = torch.tensor(case["sigmas"])
    # The recorded list is KSampler's tensor after sampling; samplers may write into it in place
    # (uni_pc sets the final 0 to 0.001; ddim_uniform's extra entries follow a zeroed index `steps`).
    torch.testing.assert_close(plan.sigmas[:steps], recorded[:steps], atol=0, rtol=SIGMA_RTOL)
    assert len(plan.sigmas) == steps + 1 and float(plan.sigmas[-1]) == 0.0
    assert plan.brownian_sigma_min == pytest.approx(case["brownian_sigma_min"], rel=SIGMA_RTOL)
    assert plan.brownian_sigma_max == pytest.approx(case["brownian_sigma_max"], rel=SIGMA_RTOL)

    # Noise: the initial latent noise and the generator / Brownian streams.
    noise, generator = prepare_noise(case["seed"], shape)
    _assert_close(noise, trajectory_tensors[f"noise_seed{case['seed']}"], "initial noise")
    brownian = RecordingBrownian(BrownianNoise(shape, plan.brownian_sigma_min, plan.brownian_sigma_max, case["seed"]))
    draws: list[torch.Tensor] = []
    real_randn_like = samplers_module.randn_like

    def counting_randn_like(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        draws.append(real_randn_like(x, gen))
        return draws[-1]

    monkeypatch.setattr(samplers_module, "randn_like", counting_randn_like)

    img2img = case.get("img2img", case["denoise"] < 1.0)
    latent = trajectory_tensors["img2img_input_latent_vae_space"] * SDXL_LATENT_SCALE if img2img else None
    model = AnalyticDenoiser(ms, shape, case)
    refiner = case.get("refiner")
    step_offset = 0
    steps_seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def callback(info: dict[str, Any]) -> None:
        steps_seen[step_offset + info["i"]] = (info["x"].clone(), info["denoised"].clone())
        if refiner and refiner["method"] == "joint" and info["i"] == refiner["switch"]:
            model.mu_scale = refiner["refiner_mu_scale"]  # the native swap: same sampler state and tree

    run = {"generator": generator, "brownian": brownian, "callback": callback, "model_sampling": ms}
    if refiner and refiner["method"] == "separate":
        switch = refiner["switch"]
        base = sample(model, case["sampler"], plan.sigmas[: switch + 1], noise, latent=latent, **run)
        base = base / SDXL_LATENT_SCALE * SDXL_LATENT_SCALE  # Fooocus's latent out/in round trip
        model.mu_scale = refiner["refiner_mu_scale"]
        step_offset = switch
        out = sample(model, case["sampler"], plan.sigmas[switch:], torch.zeros_like(noise), latent=base, **run)
    else:
        out = sample(model, case["sampler"], plan.sigmas, noise, latent=latent, **run)

    assert model.calls == case["model_calls"]
    assert len(draws) == case["randn_like_draws"]
    assert len(brownian.queries) == len(case["brownian_queries"])
    for got, want in zip(brownian.queries, case["brownian_queries"]):
        assert got == pytest.approx(tuple(want), rel=SIGMA_RTOL)
    for i, (x, denoised) in sorted(steps_seen.items()):
        if f"{name}__step{i:02d}_x" in trajectory_tensors:
            _assert_close(x, trajectory_tensors[f"{name}__step{i:02d}_x"], f"step {i} x")
            _assert_close(denoised, trajectory_tensors[f"{name}__step{i:02d}_denoised"], f"step {i} denoised")
    for i, w in enumerate(brownian.increments):
        if f"{name}__brownian{i:02d}" in trajectory_tensors:
            _assert_close(w, trajectory_tensors[f"{name}__brownian{i:02d}"], f"Brownian increment {i}")
    for i, r in enumerate(draws):
        if f"{name}__randn{i:02d}" in trajectory_tensors:
            _assert_close(r, trajectory_tensors[f"{name}__randn{i:02d}"], f"randn draw {i}")
    _assert_close(out / SDXL_LATENT_SCALE, trajectory_tensors[f"{name}__final"], "final latent")
