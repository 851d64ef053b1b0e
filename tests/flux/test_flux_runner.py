"""The Flux runner on the built-in demo-flux model through the engine (issue 17): events, previews,
determinism, cancel mid-job with the next job unaffected, refusals at submit, and metadata that
regenerates the same image."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from engine.core.errors import UnsupportedForModel
from engine.core.events import Cancelled, Done, ImageReady, Preview, Progress, Started
from engine.core.jobs import JobState
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings
from engine.core.testing import StepGate

PARAMS = {"prompt": "a lighthouse at dusk", "width": 96, "height": 64, "seed": 11}
WAIT_S = 120


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), device="cpu")
    rt = create_runtime(settings, model="demo-flux", record_history=False).start()
    yield rt
    rt.close()


def _run(runtime: Runtime, params: dict) -> tuple[list, ImageReady]:
    job = runtime.engine.submit(params)
    events = list(job.iter_events(timeout_s=WAIT_S, include_previews=True))
    assert isinstance(events[-1], Done), events[-1]
    return events, job.images[0]


def test_the_runtime_picks_the_flux_runner_and_options_name_the_family(runtime: Runtime) -> None:
    from engine.flux.runner import FluxRunner

    # one runner per device serves both families; demo-flux is its default (engine/core/families.py)
    assert runtime.engine.runner.default_family == "flux" and isinstance(runtime.engine.runner.flux, FluxRunner)
    options = runtime.engine.runner.options()
    assert options["models"][0] == "demo-flux" and options["model_families"]["demo-flux"] == "flux"
    assert options["defaults"]["steps"] == 4 and options["defaults"]["cfg"] is None


def test_a_job_emits_started_progress_previews_and_a_png(runtime: Runtime) -> None:
    events, image = _run(runtime, PARAMS)
    started = next(e for e in events if isinstance(e, Started))
    assert started.params["family"] == "flux" and started.params["steps"] == 4 and started.params["guidance"] is None
    assert started.seeds == (11,) and started.total_steps == 4
    steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "sample"]
    assert steps == [1, 2, 3, 4]
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and previews[-1].rgb.shape == (64 // 8, 96 // 8, 3)
    assert Image.open(io.BytesIO(image.data)).size == (96, 64) == (image.width, image.height)
    assert image.metadata["model_family"] == "flux" and "sharpness" not in image.metadata


def test_same_seed_same_bytes_other_seed_other_bytes(runtime: Runtime) -> None:
    first, second = (_run(runtime, PARAMS)[1] for _ in range(2))
    other = _run(runtime, {**PARAMS, "seed": 12})[1]
    assert first.data == second.data and other.data != first.data


def test_sdxl_only_fields_are_refused_at_submit_and_nothing_is_queued(runtime: Runtime) -> None:
    before = len(runtime.engine.jobs())
    for field, value in (("sharpness", 5.0), ("clip_skip", 1), ("refiner_model", "demo")):
        with pytest.raises(UnsupportedForModel) as info:
            runtime.engine.submit({**PARAMS, field: value})
        assert info.value.loc == (field,)
    assert len(runtime.engine.jobs()) == before


def test_cancel_mid_job_then_the_next_job_is_unaffected(runtime: Runtime) -> None:
    reference = _run(runtime, PARAMS)[1]
    gate = StepGate(2)
    runtime.engine.runner.on_step = gate
    try:
        victim = runtime.engine.submit({**PARAMS, "steps": 6})
        assert gate.reached.wait(WAIT_S)
        assert runtime.engine.cancel(victim.job_id)
        gate.release()
        assert victim.wait(WAIT_S) and victim.state is JobState.CANCELLED
    finally:
        runtime.engine.runner.on_step = None
    events = victim.events_after(0)
    assert isinstance(events[-1], Cancelled) and events[-1].images_done == 0
    assert max(e.step for e in events if isinstance(e, Progress) and e.stage == "sample") == 2
    assert _run(runtime, PARAMS)[1].data == reference.data


@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
def test_metadata_regenerates_the_same_image(runtime: Runtime, scheme: str) -> None:
    """--from-image for a Flux image: the stored parameters, read back, give the same bytes."""
    from engine.io.metadata import request_from_image

    image = _run(runtime, {**PARAMS, "styles": [], "metadata_scheme": scheme})[1]
    request, warnings = request_from_image(image.data, known_models=["demo-flux"])
    assert not [w for w in warnings if "demo" not in w]
    assert (request.prompt, request.seed, request.size, request.base_model) == (
        PARAMS["prompt"], 11, (96, 64), "demo-flux")
    fields = request.model_dump(exclude_unset=True)
    again = _run(runtime, {**fields, "styles": [], "metadata_scheme": scheme})[1]
    assert again.data == image.data


def test_dev_variant_uses_its_guidance_default(tmp_path: Path) -> None:
    """demo-flux-dev: guidance-distilled; cfg unset -> 3.5, set -> the caller's value (different image)."""
    rt = create_runtime(Settings(data_dir=tmp_path, device="cpu"), model="demo-flux-dev", record_history=False).start()
    try:
        events, default = _run(rt, {**PARAMS, "steps": 2})
        started = next(e for e in events if isinstance(e, Started))
        assert (started.params["variant"], started.params["guidance"]) == ("dev", 3.5)
        assert default.metadata["guidance_scale"] == 3.5
        _, explicit_same = _run(rt, {**PARAMS, "steps": 2, "cfg": 3.5})
        _, explicit_other = _run(rt, {**PARAMS, "steps": 2, "cfg": 1.5})
    finally:
        rt.close()
    assert explicit_same.data == default.data and explicit_other.data != default.data


def test_fooocus_text_features_apply_per_image(runtime: Runtime) -> None:
    """Arrays, styles and seeds per image as Fooocus assembles them (engine/prompts); each image's T5/CLIP
    text is its positive lines joined, so the two images differ by prompt and by seed."""
    job = runtime.engine.submit({**PARAMS, "prompt": "a [[red,blue]] cube", "image_number": 2,
                                 "styles": ["Hooocus Sharp"], "negative_prompt": "blurry"})
    events = list(job.iter_events(timeout_s=WAIT_S))
    assert isinstance(events[-1], Done), events[-1]
    prompts = job.resolved_params["prompts"]
    assert [p["seed"] for p in prompts] == ["11", "12"]
    (red,), (blue,) = (p["positive"] for p in prompts)  # the style's template around each image's prompt
    # Fooocus splits an array on ',' and keeps the space that follows it: the second item is " blue".
    assert red.startswith("a red cube, ") and blue == red.replace("a red cube", "a  blue cube", 1)
    assert [img.metadata["prompt"] for img in job.images] == ["a red cube", "a  blue cube"]
    assert job.images[0].data != job.images[1].data


def test_vae_out_of_memory_retries_with_the_tiled_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reliability matrix row 18 for Flux: an OOM in the decode frees memory and retries tiled once."""
    import torch

    from engine.flux.demo import build_demo_flux
    from engine.flux.runner import decode_latents

    comps = build_demo_flux("schnell")
    packed = torch.randn(1, (64 // 16) * (96 // 16), 64, generator=torch.Generator().manual_seed(0))
    calls: list[str] = []
    tiled = comps.vae.tiled_decode

    def exploding(*args, **kwargs):
        calls.append("decode")
        raise torch.OutOfMemoryError("CUDA out of memory")

    def counting_tiled(*args, **kwargs):
        calls.append("tiled")
        return tiled(*args, **kwargs)

    monkeypatch.setattr(comps.vae, "decode", exploding)
    monkeypatch.setattr(comps.vae, "tiled_decode", counting_tiled)
    with torch.inference_mode():
        rgb = decode_latents(comps, packed, 96, 64, on_oom=lambda: calls.append("freed"))
    assert calls == ["decode", "freed", "tiled"] and rgb.shape == (64, 96, 3)
