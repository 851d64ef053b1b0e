"""Issue 16: a real (non-demo) model reads the Image Prompt weights from the set-up files, safetensors
only: the IP-Adapter plus in its released layout, the negative tokens, the CLIP vision tower, a
Control-LoRA, FaceSwap's face IP-Adapter and its YuNet detector (an ONNX graph), all tiny and written
by the test for a tiny single-file checkpoint. With the files the
job runs and the slots change the image; without one the request is refused at submit
(``model_missing`` naming the file and the set-up group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.core.errors import HooocusError
from engine.core.events import ImageReady
from engine.core.inputs import image_prompt_key
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.sdxl.image_prompt import CONTROL_FILES, FACE_ADAPTER_FILE, FACE_DETECTOR_FILE, IP_ADAPTER_FILES
from tests.engine.demo import StubEngine, noise_image
from tests.face_models import face_picture, write_tiny_yunet

IMG = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from safetensors.torch import save_file

    from engine.core.settings import load_settings
    from engine.sdxl.control.control_lora import CONTROL_LORA_MARKER
    from engine.sdxl.ip_adapter.model import build_tiny_ip_adapter
    from engine.sdxl.models.demo import build_demo_sdxl, save_single_file
    from engine.sdxl.pipeline import SDXLRunner
    from tests.unit.test_control_lora import _control_only_ldm, _rand
    from tests.unit.test_ip_adapter import _released_layout

    root = tmp_path_factory.mktemp("ipfiles")
    models = root / "data" / "models"
    (models / "checkpoints").mkdir(parents=True)
    demo = build_demo_sdxl("base")
    save_single_file(demo, models / "checkpoints" / "tiny.safetensors")
    demo.tokenizer.save_pretrained(str(root / "tokenizer"))  # the single-file loader needs tokenizer files
    adapter = build_tiny_ip_adapter(demo.unet, seed_tag="ipwire-files")
    files = {IP_ADAPTER_FILES["adapter"]: _released_layout(adapter),
             IP_ADAPTER_FILES["negative"]: {"data": adapter.negative_tokens},
             IP_ADAPTER_FILES["clip_vision"]: adapter.vision.state_dict(),
             # the face adapter: another seed, the same CLIP vision (the loader shares the ImagePrompt one)
             FACE_ADAPTER_FILE: _released_layout(build_tiny_ip_adapter(demo.unet, seed_tag="ipwire-face"))}
    write_tiny_yunet(models / FACE_DETECTOR_FILE)
    import torch
    from diffusers import ControlNetModel

    from engine.sdxl.models.demo import _unet_to_ldm

    base = ControlNetModel.from_unet(demo.unet)
    control: dict[str, torch.Tensor] = {CONTROL_LORA_MARKER: torch.zeros(0)}
    encoder = {n: p.detach() for n, p in base.named_parameters() if not n.startswith("controlnet_")}
    for name, ldm in zip(encoder, _unet_to_ldm(encoder, demo.unet.config), strict=True):
        if name.endswith(".bias"):  # as a Control-LoRA stores biases: full values (here nudged)
            control[ldm] = encoder[name] + _rand(encoder[name].shape, f"ipwire/bias/{name}", 0.01)
    for name, param in base.named_parameters():
        if name.startswith("controlnet_"):  # the ControlNet-only layers, in the ldm ControlNet's names
            control[_control_only_ldm(name)] = _rand(param.shape, f"ipwire/{name}")
    files[CONTROL_FILES["CPDS"]] = control
    for rel, tensors in files.items():
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(models / rel))
    settings, _ = load_settings(cli={"data_dir": root / "data", "device": "cpu",
                                     "clip_tokenizer_dir": root / "tokenizer"}, env={})
    return SDXLRunner(settings), models


def _run(runner: Any, slots: list[dict[str, Any]], pictures: list[np.ndarray] | None = None) -> np.ndarray:
    import io

    from PIL import Image

    request = GenerationRequest.parse({"prompt": "x", "seed": 1, "steps": 2, "width": 64, "height": 64, "styles": [],
                                       "image_prompts": [{"image": IMG, **s} for s in slots]})
    runner.check(request)
    job = Job("j", request, "local")
    inputs = {image_prompt_key(i): (pictures or [noise_image(40, 48)] * len(slots))[i] for i in range(len(slots))}
    runner.run(RunContext(job, StubEngine(), inputs=inputs))  # type: ignore[arg-type]
    (event,) = [e for e in job.events_after(0) if isinstance(e, ImageReady)]
    return np.asarray(Image.open(io.BytesIO(event.data)).convert("RGB"))


def test_a_real_model_reads_the_set_up_files(setup: tuple[Any, Path]) -> None:
    runner, _models = setup
    assert runner.default_model_name == "tiny.safetensors"
    plain = _run(runner, [])
    assert not np.array_equal(_run(runner, [{"type": "ImagePrompt", "stop_at": 1.0}]), plain)
    assert not np.array_equal(_run(runner, [{"type": "CPDS"}]), plain)


def test_faceswap_reads_the_face_adapter_and_the_detector_file(setup: tuple[Any, Path]) -> None:
    runner, _models = setup
    plain = _run(runner, [])
    here = _run(runner, [{"type": "FaceSwap"}], [face_picture(128, 128, cell=(1, 1))])
    there = _run(runner, [{"type": "FaceSwap"}], [face_picture(128, 128, cell=(2, 2))])
    assert not np.array_equal(here, plain)
    assert np.array_equal(here, there)  # the detector file found the face: both crops are the one white cell
    ip = _run(runner, [{"type": "ImagePrompt", "stop_at": 0.9, "weight": 0.75}], [face_picture(128, 128, cell=(1, 1))])
    assert not np.array_equal(ip, here)  # the face adapter file is not the ImagePrompt one
    # Both adapters are cached (one per kind) and share one CLIP vision tower, as in Fooocus.
    cached = {key[2]: runner.models.peek(key) for key in runner.models.keys() if key[0] == "ip_adapter"}
    assert set(cached) == {"ImagePrompt", "FaceSwap"} and cached["ImagePrompt"].vision is cached["FaceSwap"].vision
    assert cached["ImagePrompt"].kv is not cached["FaceSwap"].kv


def test_a_missing_file_is_model_missing_at_submit(setup: tuple[Any, Path]) -> None:
    runner, models = setup
    assert not (models / CONTROL_FILES["PyraCanny"]).exists()  # the test wrote only the CPDS one
    with pytest.raises(HooocusError) as info:
        runner.check(GenerationRequest.parse({"image_prompts": [{"image": IMG, "type": "PyraCanny"}]}))
    assert info.value.code == "model_missing" and "control-lora-canny-rank128.safetensors" in info.value.message
    assert "hooocus setup --only controlnet" in info.value.message
