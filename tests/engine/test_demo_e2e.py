"""End to end on the built-in demo model: determinism, cancel, faults, refiner swaps, previews."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine
from engine.core.events import Cancelled, Failed, ImageReady, Preview, Progress, Started
from engine.core.jobs import JobState
from engine.core.settings import load_settings
from engine.io.imageio import read_image_metadata
from engine.sdxl.pipeline import SDXLRunner

SMALL = {"width": 64, "height": 64, "steps": 4}


class Recorder:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def record(self, name: str, value: Any) -> None:
        self.values[name] = value


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder) -> Iterator[Engine]:
    settings, _ = load_settings(cli={"data_dir": tmp_path_factory.mktemp("data"), "device": "cpu"}, env={})
    runner = SDXLRunner(settings, model="demo", trace=recorder)
    with Engine(runner, max_queue=8) as eng:
        yield eng


def run(engine: Engine, **fields: Any):
    job = engine.submit({"prompt": "a (red:1.3) fox in the snow", **SMALL, **fields})
    assert job.wait(120)
    return job


def images(job) -> list[ImageReady]:
    return [e for e in job.events_after(0) if isinstance(e, ImageReady)]


def test_same_request_and_seed_give_byte_identical_png(engine: Engine) -> None:
    first = run(engine, seed=42, image_number=2)
    second = run(engine, seed=42, image_number=2)
    assert first.state is JobState.DONE, first.info()["error"]
    a, b = images(first), images(second)
    assert [i.data for i in a] == [i.data for i in b]
    assert [i.seed for i in a] == [42, 43]
    assert a[0].data != a[1].data  # image i uses seed + i
    different = images(run(engine, seed=7))
    assert different[0].data != a[0].data


def test_png_carries_parameters_and_is_labelled_demo(engine: Engine) -> None:
    job = run(engine, seed=5, negative_prompt="blurry")
    image = images(job)[0]
    assert image.mime == "image/png" and (image.width, image.height) == (64, 64)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.size == (64, 64) and decoded.mode == "RGB"
    parameters, scheme = read_image_metadata(image.data)
    assert scheme == "fooocus"
    assert '"seed": "5"' in parameters and "a (red:1.3) fox in the snow" in parameters
    assert image.metadata["base_model"] == "demo" and "demo" in image.metadata["demo"]
    started = next(e for e in job.events_after(0) if isinstance(e, Started))
    assert started.params["is_demo"] is True and started.params["seeds"] == ["5"]


def test_output_formats(engine: Engine) -> None:
    for fmt, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP")):
        image = images(run(engine, seed=1, output_format=fmt))[0]
        assert Image.open(io.BytesIO(image.data)).format == pil_format
        assert read_image_metadata(image.data)[1] == "fooocus"
    plain = images(run(engine, seed=1, metadata_scheme="none"))[0]
    assert read_image_metadata(plain.data) == (None, None)


def test_cancel_at_step_k_skips_decode_and_next_job_runs(engine: Engine, recorder: Recorder) -> None:
    cancel_at = 2
    job = engine.submit({"prompt": "cancel me", "width": 64, "height": 64, "steps": 6, "seed": 3})

    def on_event(event) -> None:
        if isinstance(event, Progress) and event.stage == "sample" and event.step == cancel_at:
            engine.cancel(job.job_id)

    job.subscribe(on_event, after_seq=None)
    recorder.values.clear()
    assert job.wait(60)
    assert job.state is JobState.CANCELLED
    events = job.events_after(0)
    assert isinstance(events[-1], Cancelled) and events[-1].images_done == 0
    sample_steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "sample"]
    assert max(sample_steps) == cancel_at  # stopped within one step
    assert not any(isinstance(e, ImageReady) for e in events)
    assert "image0.latent" not in recorder.values and "image0.decoded" not in recorder.values  # no VAE decode
    after = run(engine, seed=3)
    assert after.state is JobState.DONE and len(images(after)) == 1


def test_queue_with_a_cancelled_job_in_the_middle(engine: Engine) -> None:
    jobs = [engine.submit({"prompt": f"job {i}", **SMALL, "seed": i}) for i in range(3)]
    assert engine.cancel(jobs[1].job_id)
    for job in jobs:
        assert job.wait(120)
    assert [j.state for j in jobs] == [JobState.DONE, JobState.CANCELLED, JobState.DONE]
    # the job after the cancelled one is unaffected: same bytes as the same request run alone
    alone = run(engine, prompt="job 2", seed=2)
    assert images(jobs[2])[0].data == images(alone)[0].data


def test_out_of_memory_in_the_unet_fails_cleanly_and_next_job_runs(engine: Engine, monkeypatch) -> None:
    runner: SDXLRunner = engine.runner  # type: ignore[assignment]
    unet = runner._load_base("demo", vae=None).components.unet
    calls = {"n": 0}
    original = unet.forward

    def exploding(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", exploding)
    failed = run(engine, seed=9)
    monkeypatch.setattr(unet, "forward", original)
    last = failed.events_after(0)[-1]
    assert isinstance(last, Failed) and last.code == "out_of_memory" and "GiB" not in last.message
    assert run(engine, seed=9).state is JobState.DONE


def test_vae_out_of_memory_retries_with_tiled_decode(engine: Engine, monkeypatch) -> None:
    runner: SDXLRunner = engine.runner  # type: ignore[assignment]
    vae = runner._load_base("demo", vae=None).components.vae
    reference = images(run(engine, seed=11))[0]
    calls = {"tiled": 0}
    original_tiled = vae.tiled_decode

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def tiled(*args, **kwargs):
        calls["tiled"] += 1
        return original_tiled(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", oom)
    monkeypatch.setattr(vae, "tiled_decode", tiled)
    job = run(engine, seed=11)
    assert job.state is JobState.DONE and calls["tiled"] == 1
    # the tiled decoder blends overlapping tiles, so pixels differ near seams but the image is the same picture
    got = np.asarray(Image.open(io.BytesIO(images(job)[0].data))).astype(int)
    want = np.asarray(Image.open(io.BytesIO(reference.data))).astype(int)
    assert got.shape == want.shape
    assert np.array_equal(got[:8, :8], want[:8, :8])  # the first tile's corner is untouched by blending


@pytest.mark.parametrize("method", ["joint", "separate"])
def test_refiner_swap_changes_the_model_at_the_switch_step(engine: Engine, method: str) -> None:
    # an explicit swap step (Fooocus overwrite_switch): with overridden steps Fooocus would take the
    # switch from the performance's 30 steps (spec §1 step 7 quirk) and never swap within 6 steps
    job = run(engine, seed=4, steps=6, refiner_model="demo-refiner", refiner_switch_step=3, refiner_swap_method=method)
    assert job.state is JobState.DONE, job.info()["error"]
    stages = [(e.stage, e.step) for e in job.events_after(0) if isinstance(e, Progress) and e.stage != "encode"]
    refine_from = 5 if method == "joint" else 4  # spec §8: joint runs switch+1 base steps
    assert all(stage == "refine" for stage, step in stages if refine_from <= step and stage != "decode")
    assert all(stage == "sample" for stage, step in stages if step < refine_from)
    without = images(run(engine, seed=4, steps=6))[0]
    assert images(job)[0].data != without.data


def test_previews_are_small_rgb_arrays_per_step(engine: Engine) -> None:
    job = engine.submit({"prompt": "preview", **SMALL, "seed": 2})
    previews = [e for e in job.iter_events(timeout_s=60, include_previews=True) if isinstance(e, Preview)]
    assert previews, "no preview"
    assert previews[-1].rgb.shape == (8, 8, 3) and previews[-1].rgb.dtype == np.uint8


def test_unknown_model_and_style_rejected_at_submit(engine: Engine) -> None:
    from engine.core.errors import UnknownModel, UnknownStyle

    with pytest.raises(UnknownModel):
        engine.submit({"prompt": "x", "base_model": "../../etc/passwd"})
    with pytest.raises(UnknownStyle):
        engine.submit({"prompt": "x", "styles": ["No Such Style"]})


def test_fast_mode_on_demo_runs_without_its_lora_with_a_warning(engine: Engine) -> None:
    job = run(engine, seed=1, performance="Lightning", steps=None)
    assert job.state is JobState.DONE
    started = next(e for e in job.events_after(0) if isinstance(e, Started))
    assert started.params["steps"] == 4 and started.params["sampler"] == "euler" and started.params["cfg"] == 1.0
    assert any(e.kind == "warning" for e in job.events_after(0))


def test_runner_check_refuses_fast_mode_without_lora_on_a_real_model(tmp_path: Path) -> None:
    from engine.core.errors import AssetsMissing
    from engine.sdxl.models.demo import build_demo_sdxl, save_single_file

    folder = tmp_path / "data" / "models" / "checkpoints"
    folder.mkdir(parents=True)
    save_single_file(build_demo_sdxl("base"), folder / "tiny.safetensors")
    settings, _ = load_settings(cli={"data_dir": tmp_path / "data", "device": "cpu"}, env={})
    runner = SDXLRunner(settings)
    assert runner.default_model_name == "tiny.safetensors"
    from engine.core.request import GenerationRequest

    with pytest.raises(AssetsMissing) as info:
        runner.check(GenerationRequest(prompt="x", performance="Lightning"))
    assert info.value.loc == ("performance",)
