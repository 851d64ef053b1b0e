"""Issue 16 Enhance on the built-in demo model with tiny random mask models (tests/enhance_models.py)
installed where set-up puts the real ones: the pass order, the skip rules, save_only_final, the seed
rule, cancel mid-enhance, and model_missing before anything runs.

A full inpaint pass samples a crop at shape ceil 1024 (spec §12.2), tens of seconds on 2 CPU cores,
so the fast tests use passes that skip (no box found) or the Upscale (Fast 2x) pass (no diffusion);
one real inpaint pass runs in the slow-marked test."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import HooocusError, JobCancelled
from engine.core.events import ImageReady, JobWarning, Progress, Started
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.core.settings import load_settings
from engine.sdxl.pipeline import SDXLRunner
from tests.engine.demo import StubEngine
from tests.enhance_models import install_tiny_enhance_models

IMG = "sha256:" + "0" * 64
#: box_threshold 1.0: no random-weight box score reaches it (scores are sigmoids, < 1), so SAM finds nothing.
NOTHING = {"detection_prompt": "face", "box_threshold": 1.0}
#: The tiny rembg model's mask is where the image is bluer than red (tests/enhance_models.py).
BLUE_HALF = {"mask_model": "u2netp", "prompt": "detailed face", "inpaint_engine": "None"}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> SDXLRunner:
    data = tmp_path_factory.mktemp("data")
    settings, _ = load_settings(cli={"data_dir": data, "device": "cpu"}, env={})
    install_tiny_enhance_models(settings.models_dir)
    return SDXLRunner(settings, model="demo")


def _half_blue(height: int = 64, width: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    return image


def run(runner: SDXLRunner, fields: dict[str, Any], inputs: dict[str, np.ndarray] | None = None) -> Job:
    job = Job("j", GenerationRequest.parse({"prompt": "a fox", "seed": 11, "steps": 1, "width": 64, "height": 64,
                                            **fields}), "local")
    runner.check(job.request)
    runner.run(RunContext(job, StubEngine(), inputs=inputs or {}))  # type: ignore[arg-type]
    return job


def _images(job: Job) -> list[ImageReady]:
    return [e for e in job.events_after(0) if isinstance(e, ImageReady)]


def _warnings(job: Job) -> list[JobWarning]:
    return [e for e in job.events_after(0) if isinstance(e, JobWarning)]


def _pixels(event: ImageReady) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.data)).convert("RGB"))


def test_nothing_detected_skips_the_pass_and_keeps_the_generated_image(runner: SDXLRunner) -> None:
    job = run(runner, {"enhance": {"tabs": [NOTHING, NOTHING]}})
    images = _images(job)
    assert [e.index for e in images] == [0]  # the generated image only: both passes skipped
    skipped = [w for w in _warnings(job) if w.code == "enhance_skipped"]
    assert len(skipped) == 2 and "'face'" in skipped[0].message
    assert len([e for e in job.events_after(0) if isinstance(e, Started)]) == 1  # one started per job


def test_upscale_pass_before_and_after_and_save_only_final(runner: SDXLRunner) -> None:
    job = run(runner, {"enhance": {"uov_method": "Upscale (Fast 2x)", "tabs": [NOTHING]}})
    images = _images(job)
    assert [e.index for e in images] == [0, 1]  # generated, then the 2x pass (the tab was skipped)
    # Fast 2x of a 64 px image: 2x, raised to shape ceil 1024 (spec §12.1, engine/imaging/upscaler.py)
    assert (images[1].width, images[1].height) == (1024, 1024) and images[0].width == 64
    after = run(runner, {"enhance": {"uov_method": "Upscale (Fast 2x)", "tabs": [NOTHING],
                                     "uov_processing_order": "After Last Enhancement", "save_only_final": True}})
    final = _images(after)
    assert len(final) == 1 and final[0].index == 0 and final[0].width == 1024  # only the last result
    assert final[0].sha256 == images[1].sha256  # same seed and pixels: the same file


def test_enhance_only_runs_on_the_input_image(runner: SDXLRunner) -> None:
    image = _half_blue(40, 56)
    skipped = run(runner, {"input_image": IMG, "enhance": {"tabs": [NOTHING]}}, {"input_image": image})
    started = [e for e in skipped.events_after(0) if isinstance(e, Started)]
    assert len(started) == 1 and started[0].seeds == (11,) and started[0].params["task"] == "enhance"
    assert not _images(skipped) and [w.code for w in _warnings(skipped)] == ["enhance_skipped"]
    job = run(runner, {"input_image": IMG, "enhance": {"uov_method": "Upscale (Fast 2x)"}}, {"input_image": image})
    images = _images(job)
    # no generation: one image, the input's upscale (its aspect kept), not a 64 px generation
    assert len(images) == 1 and images[0].width > 56 and abs(images[0].width / images[0].height - 56 / 40) < 0.1


def test_every_image_is_enhanced_in_order(runner: SDXLRunner) -> None:
    job = run(runner, {"image_number": 2, "enhance": {"uov_method": "Upscale (Fast 2x)"}})
    images = _images(job)
    assert [e.index for e in images] == [0, 1, 2, 3]
    # Fooocus's order: every generated image first, then each image's passes (images_to_enhance)
    assert [e.width for e in images] == [64, 64, 1024, 1024]
    assert [e.seed for e in images] == [11, 12, 11, 11]  # spec §12.6: every pass uses the task seed


def test_cancel_mid_enhance_then_the_next_job_runs(runner: SDXLRunner) -> None:
    job = Job("j", GenerationRequest.parse({"prompt": "a fox", "seed": 11, "steps": 1, "width": 64, "height": 64,
                                            "enhance": {"tabs": [NOTHING, NOTHING]}}), "local")

    def cancel_at_first_skip(event: object) -> None:
        if isinstance(event, JobWarning) and event.code == "enhance_skipped":
            job.cancel_token.cancel()

    job.subscribe(cancel_at_first_skip)
    with pytest.raises(JobCancelled):
        runner.run(RunContext(job, StubEngine(), inputs={}))  # type: ignore[arg-type]
    assert len([w for w in _warnings(job) if w.code == "enhance_skipped"]) == 1  # the second tab never ran
    after = run(runner, {"enhance": {"uov_method": "Upscale (Fast 2x)"}})
    assert len(_images(after)) == 2


def test_missing_mask_model_is_model_missing_before_anything_runs(tmp_path: Path) -> None:
    settings, _ = load_settings(cli={"data_dir": tmp_path, "device": "cpu"}, env={})
    bare = SDXLRunner(settings, model="demo")
    request = GenerationRequest.parse({"enhance": {"tabs": [{"detection_prompt": "face"}, {"mask_model": "u2net"}]}})
    with pytest.raises(HooocusError) as caught:
        bare.check(request)
    assert caught.value.code == "model_missing" and caught.value.loc == ("enhance", "tabs", 0, "mask_model")
    assert "hooocus setup --only enhance" in caught.value.message
    assert caught.value.details["file"] == "config.json"


@pytest.mark.slow
def test_rembg_tab_inpaints_the_blue_half(runner: SDXLRunner) -> None:
    image = _half_blue()
    job = run(runner, {"input_image": IMG, "enhance": {"tabs": [BLUE_HALF]}}, {"input_image": image})
    images = _images(job)
    assert len(images) == 1
    got = _pixels(images[0])
    assert got.shape == image.shape
    assert not np.array_equal(got[:, 40:], image[:, 40:])  # the blue half was regenerated
    progress = [e for e in job.events_after(0) if isinstance(e, Progress)]
    assert progress and all(p.image_index == 0 for p in progress)


class _NoSyntheticContext(RunContext):
    synthetic_refiner = False


class _Resolved(Exception):
    def __init__(self, resolved: Any) -> None:
        self.resolved = resolved


def test_a_pass_context_can_turn_the_synthetic_refiner_off(runner: SDXLRunner,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """What engine/sdxl/enhance.py relies on for Fooocus's quirk (the passes keep the job's decision):
    the runner reads ``synthetic_refiner`` from the context. Stopped where the inpaint pixels would be
    prepared (the resolution is done by then; a whole inpaint takes a minute on 2 CPU cores)."""

    def stop(ctx: Any, resolved: Any, image: Any) -> None:
        raise _Resolved(resolved)

    monkeypatch.setattr(runner, "_inpaint_pixels", stop)
    seen = []
    for context_class in (RunContext, _NoSyntheticContext):
        job = Job("j", GenerationRequest.parse({"prompt": "a fox", "seed": 1, "steps": 1, "input_image": IMG,
                                                "inpaint_mask": IMG}), "local")
        with pytest.raises(_Resolved) as caught:
            runner.run(context_class(job, StubEngine(), inputs={"input_image": _half_blue(),  # type: ignore[arg-type]
                                                                "inpaint_mask": np.full((64, 64), 255, np.uint8)}))
        seen.append(caught.value.resolved.synthetic_refiner)
    assert seen == [True, False]
