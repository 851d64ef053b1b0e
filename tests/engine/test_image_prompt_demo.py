"""Issue 16 Image Prompt end to end on the built-in demo model (tiny UNet, tiny seeded IP-Adapter and
ControlNets): every supported slot type changes the image against the same job without it, weight
and stop_at are honoured, the UNet is left as it was, a cancel mid-job leaves the next job fine, and
bad slots are refused at submit with a stable code and the field path.

Sizes are 64×64 with 2 steps (the demo UNet runs in well under a second per step on one core)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.core.errors import HooocusError, JobCancelled
from engine.core.events import ImageReady, Progress
from engine.core.inputs import InputResolver, UploadStore, image_prompt_key
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.sdxl.pipeline import SDXLRunner
from tests.engine.demo import StubEngine, noise_image
from tests.face_models import face_picture

IMG = "sha256:" + "0" * 64
BASE = {"prompt": "a fox", "seed": 11, "steps": 2, "width": 64, "height": 64}


def _picture() -> np.ndarray:
    """A picture with edges (for the canny/CPDS maps): a bright square on noise."""
    image = noise_image(48, 40) // 4
    image[10:30, 8:28] = 230
    return image


def run(runner: SDXLRunner, slots: list[dict[str, Any]], *, images: list[np.ndarray] | None = None,
        engine: Any = None, **fields: Any) -> tuple[Job, list[ImageReady]]:
    request = GenerationRequest.parse({**BASE, **fields, "image_prompts": [{"image": IMG, **s} for s in slots]})
    runner.check(request)
    pictures = images or [_picture()] * len(slots)
    inputs = {image_prompt_key(i): pictures[i] for i in range(len(slots))}
    job = Job("j", request, "local")
    runner.run(RunContext(job, engine or StubEngine(), inputs=inputs))  # type: ignore[arg-type]
    return job, [e for e in job.events_after(0) if isinstance(e, ImageReady)]


def pixels(event: ImageReady) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.data)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def plain(runner: SDXLRunner) -> np.ndarray:
    _job, out = run(runner, [])
    return pixels(out[0])


def _processors(runner: SDXLRunner) -> dict[str, str]:
    unet = runner.base_components.unet  # type: ignore[union-attr]
    return {name: type(p).__name__ for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("slot_type", ["ImagePrompt", "FaceSwap", "PyraCanny", "CPDS"])
def test_each_type_changes_the_image_and_leaves_the_unet_clean(runner: SDXLRunner, plain: np.ndarray,
                                                                slot_type: str) -> None:
    before = _processors(runner)
    _job, out = run(runner, [{"type": slot_type}])
    assert len(out) == 1 and (out[0].width, out[0].height) == (64, 64)
    assert np.abs(pixels(out[0]) - plain).max() > 0
    assert _processors(runner) == before  # the IP processors were removed after sampling
    _job, again = run(runner, [{"type": slot_type}])
    assert again[0].data == out[0].data  # deterministic


def test_stop_at_zero_is_no_image_prompt_and_weight_is_honoured(runner: SDXLRunner, plain: np.ndarray) -> None:
    _job, stopped = run(runner, [{"type": "ImagePrompt", "stop_at": 0.0, "weight": 2.0}])
    assert np.array_equal(pixels(stopped[0]), plain)
    _job, light = run(runner, [{"type": "ImagePrompt", "weight": 0.2, "stop_at": 1.0}])
    _job, heavy = run(runner, [{"type": "ImagePrompt", "weight": 2.0, "stop_at": 1.0}])
    assert not np.array_equal(pixels(light[0]), pixels(heavy[0]))
    # A control with weight 0 adds zero residuals: the image is the plain one up to float rounding
    # (the residual path adds exact zeros, so the difference is 0 here; allow 1 level for the uint8 cast).
    _job, zero = run(runner, [{"type": "CPDS", "weight": 0.0}])
    assert np.abs(pixels(zero[0]) - plain).max() <= 1
    _job, strong = run(runner, [{"type": "CPDS", "weight": 2.0}])
    assert np.abs(pixels(strong[0]) - plain).max() > 1


def test_control_stop_at_gates_by_sigma(runner: SDXLRunner) -> None:
    _job, early = run(runner, [{"type": "PyraCanny", "stop_at": 0.05}])
    _job, late = run(runner, [{"type": "PyraCanny", "stop_at": 1.0}])
    assert early[0].data != late[0].data


def test_all_slots_together_and_with_a_refiner(runner: SDXLRunner, plain: np.ndarray) -> None:
    slots = [{"type": "ImagePrompt"}, {"type": "ImagePrompt", "weight": 1.0}, {"type": "PyraCanny"},
             {"type": "CPDS"}]
    _job, out = run(runner, slots)
    assert np.abs(pixels(out[0]) - plain).max() > 0
    before = _processors(runner)
    _job, refined = run(runner, [{"type": "ImagePrompt", "stop_at": 1.0}], refiner_model="demo-refiner",
                        refiner_switch_step=1)
    assert len(refined) == 1 and _processors(runner) == before


def test_cancel_mid_job_then_next_job_is_fine(runner: SDXLRunner, plain: np.ndarray) -> None:
    request = GenerationRequest.parse({**BASE, "image_prompts": [{"image": IMG}, {"image": IMG, "type": "CPDS"},
                                                                 {"image": IMG, "type": "FaceSwap"}]})
    job = Job("c", request, "local")
    seen = {"n": 0}

    def listener(event: Any) -> None:
        if isinstance(event, Progress) and event.stage == "sample":
            seen["n"] += 1
            job.cancel_token.cancel("user")

    job.subscribe(listener)
    before = _processors(runner)
    with pytest.raises(JobCancelled):
        runner.run(RunContext(job, StubEngine(), inputs={image_prompt_key(0): _picture(),  # type: ignore[arg-type]
                                                        image_prompt_key(1): _picture(),
                                                        image_prompt_key(2): face_picture(64, 64, cell=(1, 1))}))
    assert seen["n"] >= 1 and _processors(runner) == before
    _job, out = run(runner, [])
    assert np.array_equal(pixels(out[0]), plain)


@pytest.mark.parametrize(("data", "code", "loc"), [
    ({"image_prompts": [{"image": IMG}] * 5}, "invalid_request", ("image_prompts",)),
    ({"image_prompts": [{"image": IMG, "type": "Depth"}]}, "invalid_request", ("image_prompts", 0, "type")),
    ({"image_prompts": [{"image": IMG, "stop_at": 1.5}]}, "invalid_request", ("image_prompts", 0, "stop_at")),
    ({"image_prompts": [{"image": IMG, "weight": -1}]}, "invalid_request", ("image_prompts", 0, "weight")),
    ({"image_prompts": [{"image": IMG, "extra": 1}]}, "invalid_request", ("image_prompts", 0, "extra")),
])
def test_bad_slots_are_refused_with_the_field_path(data: dict[str, Any], code: str, loc: tuple[Any, ...]) -> None:
    with pytest.raises(HooocusError) as info:
        GenerationRequest.parse(data)
    assert info.value.code == code and tuple(info.value.loc or ()) == loc


def test_defaults_per_type_come_from_the_spec_table() -> None:
    request = GenerationRequest.parse({"image_prompts": [{"image": IMG, "type": t} for t in
                                                         ("ImagePrompt", "FaceSwap", "PyraCanny", "CPDS")]})
    got = [(s.resolved_stop_at, s.resolved_weight) for s in request.image_prompts]
    assert got == [(0.5, 0.6), (0.9, 0.75), (0.5, 1.0), (0.5, 1.0)]  # spec §12.3 table


def test_foreign_sha256_is_not_found_with_the_slot_path() -> None:
    import hashlib
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_picture()).save(buffer, format="PNG")
    uploads = UploadStore()
    info = uploads.put(buffer.getvalue(), owner="alice")
    resolver = InputResolver(uploads)
    request = GenerationRequest.parse({"image_prompts": [{"image": IMG}, {"image": f"sha256:{info.sha256}"}]})
    assert info.sha256 == hashlib.sha256(buffer.getvalue()).hexdigest()
    with pytest.raises(HooocusError) as bob:
        resolver(request.model_copy(update={"image_prompts": request.image_prompts[1:]}), "bob")
    assert bob.value.code == "not_found" and tuple(bob.value.loc or ()) == ("image_prompts", 0, "image")
    decoded = resolver(request.model_copy(update={"image_prompts": request.image_prompts[1:]}), "alice")
    assert decoded[image_prompt_key(0)].shape == (48, 40, 3)


def test_missing_weights_name_the_file_and_the_setup_group(tmp_path: Any) -> None:
    from engine.sdxl.image_prompt import (
        FACE_ADAPTER_FILE,
        FACE_DETECTOR_FILE,
        IP_ADAPTER_FILES,
        check_image_prompt_files,
    )

    for slot_type, group in (("ImagePrompt", "ip-adapter"), ("FaceSwap", "ip-adapter"), ("PyraCanny", "controlnet"),
                             ("CPDS", "controlnet")):
        slots = GenerationRequest.parse({"image_prompts": [{"image": IMG, "type": slot_type}]}).image_prompts
        check_image_prompt_files(slots, models_dir=tmp_path, data_dir=tmp_path, is_demo=True)  # demo: built in
        with pytest.raises(HooocusError) as missing:
            check_image_prompt_files(slots, models_dir=tmp_path, data_dir=tmp_path, is_demo=False)
        assert missing.value.code == "model_missing" and f"hooocus setup --only {group}" in missing.value.message
        assert tuple(missing.value.loc or ()) == ("image_prompts", 0, "type")
    # FaceSwap with the ip-adapter group installed: the face adapter, then the detector, from "faceswap".
    slots = GenerationRequest.parse({"image_prompts": [{"image": IMG}, {"image": IMG, "type": "FaceSwap"}]}).image_prompts
    for rel in IP_ADAPTER_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in (FACE_ADAPTER_FILE, FACE_DETECTOR_FILE):
        with pytest.raises(HooocusError) as missing:
            check_image_prompt_files(slots, models_dir=tmp_path, data_dir=tmp_path, is_demo=False)
        assert missing.value.code == "model_missing" and tuple(missing.value.loc or ()) == ("image_prompts", 1, "type")
        assert Path(rel).name in missing.value.message and "hooocus setup --only faceswap" in missing.value.message
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    check_image_prompt_files(slots, models_dir=tmp_path, data_dir=tmp_path, is_demo=False)


def test_faceswap_uses_the_aligned_face_crop(runner: SDXLRunner, plain: np.ndarray) -> None:
    # The demo detector calls a white 32-px grid cell a face and the crop maps that cell onto the whole
    # 512² crop, so the same face at two places of the picture gives one crop and one image; the
    # ImagePrompt slot (the whole picture, stretched) sees two different pictures.
    here, there = face_picture(128, 128, cell=(1, 1)), face_picture(128, 128, cell=(2, 2))
    _job, face_here = run(runner, [{"type": "FaceSwap"}], images=[here])
    _job, face_there = run(runner, [{"type": "FaceSwap"}], images=[there])
    assert face_here[0].data == face_there[0].data
    _job, ip_here = run(runner, [{"type": "ImagePrompt", "stop_at": 0.9, "weight": 0.75}], images=[here])
    _job, ip_there = run(runner, [{"type": "ImagePrompt", "stop_at": 0.9, "weight": 0.75}], images=[there])
    assert ip_here[0].data != ip_there[0].data
    # No face: the whole picture goes in (as Fooocus), which is not the crop; the face adapter is not
    # the ImagePrompt one (same picture, same stop/weight, other image).
    _job, no_face = run(runner, [{"type": "FaceSwap"}], images=[face_picture(128, 128, cell=None)])
    assert no_face[0].data != face_here[0].data and np.abs(pixels(no_face[0]) - plain).max() > 0
    assert face_here[0].data != ip_here[0].data
    # With an ImagePrompt slot: both adapters' tokens in one job, the UNet left clean.
    before = _processors(runner)
    _job, both = run(runner, [{"type": "ImagePrompt"}, {"type": "FaceSwap"}], images=[_picture(), here])
    assert both[0].data not in (face_here[0].data, ip_here[0].data) and _processors(runner) == before


def test_tokens_are_concatenated_imageprompt_slots_first_as_fooocus(runner: SDXLRunner, plain: np.ndarray) -> None:
    # Fooocus patches the UNet with cn_tasks[ImagePrompt] + cn_tasks[FaceSwap], whatever the slot order.
    from engine.sdxl.image_prompt import prepare_image_prompts
    from engine.sdxl.models.demo import demo_face_detector, demo_ip_adapter

    unet = runner.base_components.unet  # type: ignore[union-attr]
    slots = GenerationRequest.parse({"image_prompts": [
        {"image": IMG, "type": "FaceSwap", "weight": 0.25}, {"image": IMG, "type": "ImagePrompt", "weight": 0.5},
        {"image": IMG, "type": "FaceSwap", "weight": 0.75}, {"image": IMG, "type": "ImagePrompt", "weight": 1.0}]}
    ).image_prompts
    asked: list[str] = []

    def ip_models(kind: str) -> Any:
        asked.append(kind)
        return demo_ip_adapter(unet, kind)

    prepared = prepare_image_prompts(slots, {image_prompt_key(i): _picture() for i in range(4)}, width_px=64,
                                     height_px=64, base_unet=unet, model_sampling=None, ip_models=ip_models,
                                     controlnet_for=lambda t: None, face_detector=demo_face_detector)  # type: ignore[arg-type,return-value]
    assert prepared is not None and prepared.ip_layers is not None
    assert all([kv.weight for kv in layer] == [0.5, 1.0, 0.25, 0.75] for layer in prepared.ip_layers)
    assert asked == ["FaceSwap", "ImagePrompt", "FaceSwap", "ImagePrompt"]


@pytest.mark.parametrize("swap", ["joint", "separate"])
def test_ip_adapter_leaves_at_the_refiner_swap(runner: SDXLRunner, monkeypatch: pytest.MonkeyPatch,
                                               swap: str) -> None:
    # spec §12.4: the IP patches are removed at the refiner swap; controls act on the base UNet only.
    from engine.sdxl.image_prompt import ImagePromptRun

    calls: list[tuple[bool, bool, bool]] = []  # (base UNet?, IP processors installed?, residuals given?)
    original = ImagePromptRun.unet_kwargs

    def spy(self: ImagePromptRun, unet: Any, *args: Any) -> dict[str, Any]:
        out = original(self, unet, *args)
        calls.append((unet is self.base_unet, self._hook is not None, bool(out)))
        return out

    monkeypatch.setattr(ImagePromptRun, "unet_kwargs", spy)
    _job, out = run(runner, [{"type": "ImagePrompt", "stop_at": 1.0}, {"type": "CPDS", "stop_at": 1.0}],
                    steps=4, refiner_model="demo-refiner", refiner_switch_step=2, refiner_swap_method=swap)
    assert len(out) == 1
    base_calls = [c for c in calls if c[0]]
    refiner_calls = [c for c in calls if not c[0]]
    assert base_calls and refiner_calls
    assert all(installed and residuals for _b, installed, residuals in base_calls)
    assert not any(installed or residuals for _b, installed, residuals in refiner_calls)
