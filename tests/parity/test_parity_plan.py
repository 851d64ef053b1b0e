"""Fast half of the end-to-end parity check: every recorded run's parameters through the public API.

The model-independent part of each run in ``$HOOOCUS_PARITY/runs/*`` and ``runs-extra/*`` (the slow
``test_parity.py`` needs the 7 GB checkpoint for the rest) is checked on the built-in demo model: the
request (image inputs from the run folder as data URIs, LoRAs, FreeU, inpaint options) is accepted,
resolves to Fooocus's derived values (steps, switch, denoise, size from the input image, sampler,
seed), the styled texts are Fooocus's, the sigma schedule (partial denoise included), the initial
noise and the start rule are Fooocus's (``noise·sqrt(1+σ0²)`` at full denoise, ``latent + noise·σ0``
below it), and the UNet is evaluated at Fooocus's timesteps for each branch with the ADM sizes
switched at Fooocus's step. A run whose task the runner does not support fails here. Catches integration mistakes in resolve, prompt assembly, the
schedule, noise, timestep rounding and the timed ADM switch without the full-size model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine import Engine
from engine.core.events import Started
from engine.core.jobs import JobState
from engine.core.runtime import create_runtime
from engine.core.settings import load_settings
from engine.sdxl.pipeline import SDXLRunner
from tests.parity.recorded import (
    Recorder,
    build_extra_weights,
    generation_side_px,
    lora_names,
    max_side_px_budget,
    parity_runs,
    rel,
    request_for,
    unet_rows,
)
from tests.paths import fooocus_data_dir, parity_dir, parity_skip_reason

#: The runner's trace names of the VAE-space latent an image task starts from (Vary/Upscale; inpaint's fill).
START_LATENT_TRACES = ("uov.latent", "inpaint.latent_fill")

if parity_skip_reason() is not None:  # the runs live outside the repository: one reason, this module
    pytest.skip(parity_skip_reason(), allow_module_level=True)
RUNS = parity_runs()
#: Plans of runs sampling above this side go to the slow step: on the demo model a 1024² image task's plan
#: takes 56–130 s on 2 cores (session 5, `--durations`: f 130 s, g 65 s, e 56 s), the 256² runs < 6 s each,
#: so the three large ones were a quarter of the fast suite's time.
FAST_PLAN_MAX_SIDE_PX = 512
PLAN_RUNS = [pytest.param(run, id=run.name,
                          marks=[pytest.mark.slow] if generation_side_px(run) > FAST_PLAN_MAX_SIDE_PX else [])
             for run in RUNS]


def test_parity_runs_present() -> None:
    assert RUNS, f"no parity runs under {parity_dir()}/{{runs,runs-extra}}; set HOOOCUS_PARITY"


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_generation_side_is_the_recorded_latents_side(run: Path) -> None:
    """The size the CI budget (HOOOCUS_PARITY_MAX_SIDE_PX) is checked against is the sampled image's,
    read from params.json: it must agree with the recorded final latent (8 px per cell)."""
    with safe_open(str(run / "latent.safetensors"), "pt") as handle:
        *_, height, width = handle.get_slice("latent_model_space").get_shape()
    assert generation_side_px(run) == 8 * max(height, width)


def test_max_side_budget_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOOOCUS_PARITY_MAX_SIDE_PX", raising=False)
    assert max_side_px_budget() is None
    monkeypatch.setenv("HOOOCUS_PARITY_MAX_SIDE_PX", "")
    assert max_side_px_budget() is None
    monkeypatch.setenv("HOOOCUS_PARITY_MAX_SIDE_PX", "512")
    assert max_side_px_budget() == 512
    for bad in ("0", "-1", "1024px", "1e3"):
        monkeypatch.setenv("HOOOCUS_PARITY_MAX_SIDE_PX", bad)
        with pytest.raises(ValueError, match="HOOOCUS_PARITY_MAX_SIDE_PX"):
            max_side_px_budget()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Recorder, SDXLRunner]]:
    data = fooocus_data_dir()
    data_dir = tmp_path_factory.mktemp("data")
    # A LoRA a run names must exist for the request to be accepted (unknown_lora otherwise); the
    # demo model's UNet has none of its SDXL keys, so it changes nothing model-independent here.
    loras = sorted({name for run in RUNS for name in lora_names(_params(run))})
    build_extra_weights(data_dir / "models", loras, upscaler=False, inpaint=False)
    settings, _ = load_settings(cli={
        "data_dir": data_dir, "device": "cpu", "dtype": "float32",
        "style_dirs": (data / "sdxl_styles",), "fooocus_quirks": True}, env={})
    recorder = Recorder()
    runner = SDXLRunner(settings, model="demo", trace=recorder)
    # The product's composition (image references resolved at submit), nothing written to disk.
    runtime = create_runtime(settings, runner=runner, record_history=False)
    runtime.start()
    try:
        yield runtime.engine, recorder, runner
    finally:
        runtime.close()


def _params(run: Path) -> dict:
    return json.loads((run / "params.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("run", PLAN_RUNS)
def test_recorded_parameters_plan_fooocus_run(demo: tuple[Engine, Recorder, SDXLRunner], run: Path) -> None:
    engine, recorder, runner = demo
    params = _params(run)
    derived = params["derived"]
    recorder.values.clear()
    job = engine.submit(request_for(params, "demo", run))
    assert job.wait(600)
    assert job.state is JobState.DONE, job.info()["error"]
    started = next(e for e in job.events_after(0) if isinstance(e, Started)).params

    # resolve: Fooocus's derived values
    assert (started["width"], started["height"]) == (derived["width"], derived["height"])
    # Fooocus computes the switch from the performance's 30 steps even when the steps are
    # overwritten (15 here, spec §1 step 7 quirk); we copy that under fooocus_quirks.
    assert started["steps"] == derived["steps"] and started["switch_step"] == derived["switch"]
    assert (started["sampler"], started["scheduler"]) == (derived["sampler"], derived["scheduler"])
    assert started["seeds"] == [str(derived["task_seed"])]
    assert math.isclose(started["cfg"], derived["cfg_scale"]) and started["denoise"] == derived["denoise"]
    assert started["refiner_swap_method"] == derived["refiner_swap_method"]
    # prompt assembly: the styled texts that were encoded, in order (spec §2.2, §3.5)
    prompt = started["prompts"][0]
    assert prompt["positive"] == derived["positive_texts"]
    assert prompt["negative"] == derived["negative_texts"]

    ours = {k.removeprefix("image0."): v for k, v in recorder.values.items()}
    traj = load_file(run / "trajectory.safetensors")
    latent = load_file(run / "latent.safetensors")
    # schedule, initial noise, start latent noise·sqrt(1 + σ0²) (spec §7)
    torch.testing.assert_close(ours["sigmas"], traj["sigmas"], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours["sigmas"].tolist(), derived["sigmas"], rtol=1e-6, atol=0)
    assert rel(ours["noise"], latent["initial_noise"]) <= 1e-6
    if "initial_latent_model_space" in latent:
        # Image runs start from an encoded image (README "Extra files of image runs"): the encoded
        # latent is the demo VAE's, so compare what the start adds to it, noise·σ0 (partial denoise,
        # README quirk 3) or noise·sqrt(1+σmax²) (inpaint, quirk 4), with Fooocus's.
        start = next((ours[k] for k in START_LATENT_TRACES if k in ours), None)
        assert start is not None, f"{run.name}: the runner recorded none of {START_LATENT_TRACES}"
        sf = runner.base_components.vae_scaling_factor
        assert rel(ours["step00.x"] - start * sf, traj["step00.x"] - latent["initial_latent_model_space"]) <= 1e-6
    else:
        assert rel(ours["step00.x"], traj["step00.x"]) <= 1e-6
    assert sorted(k for k in ours if k.startswith("step") and k.endswith(".x")) == [
        f"step{i:02d}.x" for i in range(derived["steps"])]
    # the UNet runs for each branch at Fooocus's integer timesteps (spec §7.1, §3.4)
    calls = [ours[k] for k in sorted(ours) if k.startswith("unet")]
    # one branch per call, or one batch with the uncond row first as in Fooocus (spec §3.4)
    assert all(c["cond_or_uncond"] in ([0], [1], [1, 0]) for c in calls), [c["cond_or_uncond"] for c in calls]
    evaluated = sorted((float(t), label) for c in calls for t, label in zip(c["timestep"], c["cond_or_uncond"]))
    assert evaluated == unet_rows(derived["unet_calls"])


def test_timed_adm_switch_matches_fooocus_time_ids() -> None:
    """The ADM sizes Fooocus used (params.json adm_time_ids) are ours for every run (spec §4)."""
    from engine.sdxl.conditioning.adm import adm_time_ids, use_emphasized_adm

    checked = 0
    for run in RUNS:
        params = json.loads((run / "params.json").read_text(encoding="utf-8"))
        if "adm_time_ids" not in params["derived"]:  # runs e–h do not record them
            continue
        checked += 1
        u, ids = params["user_parameters"], params["derived"]["adm_time_ids"]
        scales = {"positive_scale": u["adm_scaler_positive"], "negative_scale": u["adm_scaler_negative"]}
        width, height = params["derived"]["width"], params["derived"]["height"]
        for side in ("positive", "negative"):
            emphasized, consistent = adm_time_ids(width, height, side, **scales)
            assert list(emphasized) == ids[f"{side}_emphasized"], (run.name, side)
            assert list(consistent) == ids["consistent"], (run.name, side)
        switch_t = ids["emphasized_while_timestep_gt"]
        for call in params["derived"]["unet_calls"]:
            t = call["timestep"][0]
            assert use_emphasized_adm(t, u["adm_scaler_end"]) == (t > switch_t), (run.name, t)
    assert checked, "no parity run records derived.adm_time_ids"
