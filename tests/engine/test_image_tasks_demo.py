"""Issue 14 image tasks end to end on the built-in demo model (tiny VAE/UNet, in-memory ESRGAN):
each task gives an image of the planned size, the same request gives the same bytes, a cancel
mid-job ends the job and the next one runs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import JobCancelled
from engine.core.events import ImageReady, Progress
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.core.settings import load_settings
from engine.imaging.sizes import upscale_plan, vary_target_hw
from engine.io.imageio import read_image_metadata
from engine.sdxl.pipeline import SDXLRunner
from tests.engine.demo import StubEngine, noise_image

IMG = "sha256:" + "0" * 64


def run(runner: SDXLRunner, image: np.ndarray, **fields: Any) -> tuple[Job, list[ImageReady]]:
    request = GenerationRequest.parse({"prompt": "a fox", "seed": 11, "input_image": IMG, **fields})
    job = Job("j", request, "local")
    runner.run(RunContext(job, StubEngine(), inputs={"input_image": image}))  # type: ignore[arg-type]
    return job, [e for e in job.events_after(0) if isinstance(e, ImageReady)]


def _size(event: ImageReady) -> tuple[int, int]:
    decoded = Image.open(io.BytesIO(event.data))
    assert decoded.size == (event.width, event.height)
    return event.width, event.height


# Vary and Upscale sample at shape ceil >= 1024 px (Fooocus's size rule), 25-230 s each on 2 CPU
# cores with the demo model: slow-marked; the cancel test below covers Vary in the fast set.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["Vary (Subtle)", "Vary (Strong)"])
def test_vary_gives_the_clamped_shape_ceil_size(runner: SDXLRunner, method: str) -> None:
    image = noise_image(48, 64)
    _job, out = run(runner, image, uov_method=method, steps=2)
    height, width = vary_target_hw(48, 64)
    assert len(out) == 1 and _size(out[0]) == (width // 8 * 8, height // 8 * 8)


@pytest.mark.slow
def test_upscale_2x_size_and_determinism(runner: SDXLRunner) -> None:
    image = noise_image(40, 40)
    _job, first = run(runner, image, uov_method="Upscale (2x)", steps=1)
    height, width = upscale_plan(40, 40, 2.0).result_hw
    assert _size(first[0]) == (width // 8 * 8, height // 8 * 8)
    _job, second = run(runner, image, uov_method="Upscale (2x)", steps=1)
    assert first[0].data == second[0].data
    _job, other = run(runner, image, uov_method="Upscale (2x)", steps=1, seed=12)
    assert other[0].data != first[0].data


@pytest.mark.slow
def test_upscale_above_2800_returns_the_upscaled_pixels(runner: SDXLRunner) -> None:
    image = noise_image(720, 720)  # 2x → shape ceil 1472; 1.5x of 2000+ would be slow on CPU: use the 2x rule
    plan = upscale_plan(720, 720, 2.0)
    assert not plan.direct_return
    big = noise_image(1440, 1440)
    big_plan = upscale_plan(1440, 1440, 2.0)
    assert big_plan.direct_return
    job, out = run(runner, big, uov_method="Upscale (2x)", steps=1)
    assert len(out) == 1 and _size(out[0]) == (big_plan.result_hw[1], big_plan.result_hw[0])
    assert not [e for e in job.events_after(0) if isinstance(e, Progress)]  # no diffusion ran
    del image


def test_fast_upscale_has_fooocus_log_entry_and_no_diffusion(runner: SDXLRunner) -> None:
    image = noise_image(24, 32)
    job, out = run(runner, image, uov_method="Upscale (Fast 2x)")
    height, width = upscale_plan(24, 32, 2.0).result_hw
    assert _size(out[0]) == (width, height)
    parameters, _scheme = read_image_metadata(out[0].data)
    assert '"upscale_fast": "2x"' in parameters
    assert not [e for e in job.events_after(0) if isinstance(e, Progress) and e.stage == "sample"]


def test_cancel_mid_vary_then_next_job_runs(runner: SDXLRunner) -> None:
    image = noise_image(48, 64)
    request = GenerationRequest.parse({"prompt": "a fox", "seed": 11, "input_image": IMG,
                                       "uov_method": "Vary (Strong)", "steps": 3})
    job = Job("c", request, "local")

    def cancel_on_first_step(event: object) -> None:
        if isinstance(event, Progress) and event.stage == "sample":
            job.cancel_token.cancel()

    job.subscribe(cancel_on_first_step)
    with pytest.raises(JobCancelled):
        runner.run(RunContext(job, StubEngine(), inputs={"input_image": image}))  # type: ignore[arg-type]
    assert not [e for e in job.events_after(0) if isinstance(e, ImageReady)]
    _job, out = run(runner, image, uov_method="Vary (Strong)", steps=1)
    assert len(out) == 1


def test_missing_upscaler_is_model_missing_with_setup_command(tmp_path: Path) -> None:
    from engine.core.errors import HooocusError

    settings, _ = load_settings(cli={"data_dir": tmp_path, "device": "cpu"}, env={})
    real = SDXLRunner(settings, model="demo")
    resolved = type("R", (), {"base_model": "not-demo.safetensors"})()
    with pytest.raises(HooocusError) as info:
        real._upscaler(resolved)  # type: ignore[arg-type]
    assert info.value.code == "model_missing" and "hooocus setup --only upscale" in info.value.message
