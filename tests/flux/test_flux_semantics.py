"""FLUX.1 request semantics, family detection and metadata (issue 17); torch-free and fast."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from engine.core.errors import HTTP_STATUS_BY_CODE, UnsupportedForModel, exit_code_for
from engine.core.request import GenerationRequest
from engine.flux.semantics import IMAGE_TASK_FIELDS, SDXL_ONLY_FIELDS, check_flux_request, flux_settings
from engine.io.metadata import MetadataInput, metadata_text, parameters_to_request, parse_parameters
from engine.io.model_family import is_flux_spec

#: One non-default value per SDXL-only field (each one a value the request model accepts).
NON_DEFAULT = {"sharpness": 5.0, "adaptive_cfg": 3.0, "adm_scaler_positive": 1.2, "adm_scaler_negative": 0.9,
               "adm_scaler_end": 0.5, "clip_skip": 1, "refiner_model": "demo", "refiner_switch": 0.7,
               "refiner_switch_step": 3, "refiner_swap_method": "separate", "freeu": {"enabled": True},
               "vae": "some-vae", "performance": "Quality", "sampler": "euler", "scheduler": "normal"}


def test_every_sdxl_only_field_has_a_case() -> None:
    assert set(NON_DEFAULT) == set(SDXL_ONLY_FIELDS)


@pytest.mark.parametrize("field", SDXL_ONLY_FIELDS)
def test_sdxl_only_fields_are_refused_naming_the_field(field: str) -> None:
    request = GenerationRequest.parse({"prompt": "x", field: NON_DEFAULT[field]})
    with pytest.raises(UnsupportedForModel) as info:
        check_flux_request(request, variant="schnell", model_name="demo-flux")
    error = info.value
    assert error.code == "unsupported_for_model" and error.loc == (field,) and field in error.message
    assert HTTP_STATUS_BY_CODE[error.code] == 422 and exit_code_for(error) == 2


def test_defaults_and_the_none_refiner_pass() -> None:
    check_flux_request(GenerationRequest.parse({"prompt": "x", "refiner_model": "None", "sharpness": 2.0}),
                       variant="dev", model_name="m")


def test_image_tasks_are_refused() -> None:
    request = GenerationRequest.parse({"prompt": "x", "input_image": "sha256:" + "0" * 64,
                                       "uov_method": "Vary (Subtle)"})
    with pytest.raises(UnsupportedForModel) as info:
        check_flux_request(request, variant="dev", model_name="m")
    assert info.value.loc == ("input_image",) and "image tasks" in info.value.message
    assert "input_image" in IMAGE_TASK_FIELDS


def test_loras_are_not_an_sdxl_only_field() -> None:
    # FLUX.1 LoRAs apply (the runner checks the files: tests/flux/test_flux_lora_jobs.py); only the
    # performance field, which would pick an SDXL performance LoRA, stays refused.
    request = GenerationRequest.parse({"prompt": "x", "loras": [{"name": "off", "enabled": False}, {"name": "a"}]})
    check_flux_request(request, variant="dev", model_name="m")
    assert "loras" not in SDXL_ONLY_FIELDS and "performance" in SDXL_ONLY_FIELDS


def test_variant_defaults_and_explicit_values() -> None:
    plain = GenerationRequest.parse({"prompt": "x", "width": 256, "height": 256})
    schnell = flux_settings(plain, variant="schnell", guidance_embeds=False)
    dev = flux_settings(plain, variant="dev", guidance_embeds=True)
    assert (schnell.steps, schnell.guidance, schnell.warnings) == (4, None, ())
    assert (dev.steps, dev.guidance) == (28, 3.5)
    # The request's cfg default (4.0, Fooocus's) is not a guidance the caller asked for; an explicit one is.
    explicit = GenerationRequest.parse({"prompt": "x", "cfg": 4.0, "steps": 9})
    assert flux_settings(explicit, variant="dev", guidance_embeds=True).guidance == 4.0
    assert flux_settings(explicit, variant="dev", guidance_embeds=True).steps == 9
    ignored = flux_settings(explicit, variant="schnell", guidance_embeds=False)
    assert ignored.guidance is None and [code for code, _ in ignored.warnings] == ["ignored_field"]


def test_sizes_round_down_to_multiples_of_16_with_a_warning() -> None:
    fs = flux_settings(GenerationRequest.parse({"prompt": "x", "width": 1000, "height": 520}), variant="dev",
                       guidance_embeds=True)
    assert (fs.width, fs.height) == (992, 512) and fs.warnings[0][0] == "size_rounded"


# -- family detection -------------------------------------------------------------------------------


def _safetensors_header(path: Path, keys: list[str]) -> Path:
    """A file with a real safetensors header (zero-length float tensors): what the detector reads."""
    header = json.dumps({key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in keys}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_family_is_detected_from_the_weights(tmp_path: Path) -> None:
    assert is_flux_spec("demo-flux") and is_flux_spec("demo-flux-dev")
    assert not is_flux_spec("demo") and not is_flux_spec(None) and not is_flux_spec("some/repo")
    # engine.io.family's markers: a double block's fused qkv plus single blocks (BFL, maybe under a
    # ComfyUI prefix), or diffusers' transformer + single transformer blocks + x_embedder; SDXL: UNet + conditioner.
    bfl_keys = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]
    bfl = _safetensors_header(tmp_path / "flux1-schnell.safetensors", bfl_keys)
    comfy = _safetensors_header(tmp_path / "aio.safetensors", ["model.diffusion_model." + k for k in bfl_keys])
    diffusers = _safetensors_header(tmp_path / "t.safetensors", [
        "transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"])
    sdxl = _safetensors_header(tmp_path / "sdxl.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x.weight"])
    assert is_flux_spec(bfl) and is_flux_spec(comfy) and is_flux_spec(diffusers) and not is_flux_spec(sdxl)
    (tmp_path / "not.safetensors").write_bytes(b"\xff" * 16)
    assert not is_flux_spec(tmp_path / "not.safetensors")
    folder = tmp_path / "FLUX.1-dev"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": True}))
    assert is_flux_spec(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert not is_flux_spec(folder)


# -- metadata ---------------------------------------------------------------------------------------


def _flux_input(scheme: str, guidance: float | None) -> MetadataInput:
    return MetadataInput(
        prompt="a red cube", negative_prompt="", expansion="", styles=["Fooocus Enhance"], performance="Speed",
        steps=4 if guidance is None else 28, width=768, height=512, cfg=guidance or 1.0, sharpness=0.0,
        adm=(1.0, 1.0, 0.0), base_model="flux1-dev.safetensors", base_model_hash="0123456789",
        full_prompt=["a red cube, enhanced"], full_negative_prompt=[], seed=42, sampler="euler",
        scheduler="simple", metadata_scheme=scheme, family="flux", guidance=guidance)


@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
@pytest.mark.parametrize("guidance", [None, 3.5])
def test_flux_metadata_reads_back_as_a_flux_request(scheme: str, guidance: float | None) -> None:
    text = metadata_text(_flux_input(scheme, guidance))
    assert text is not None
    for sdxl_only in ("Sharpness", "sharpness", "ADM", "adm_guidance", "Sampler", "Refiner", "refiner", "VAE"):
        assert sdxl_only not in text, (sdxl_only, text)
    parsed = parse_parameters(text, scheme, model_filenames=["flux1-dev.safetensors"])
    request, warnings = parameters_to_request(parsed, known_models=["flux1-dev.safetensors"])
    assert warnings == []
    assert (request.prompt, request.seed, request.steps, request.size) == ("a red cube", 42,
                                                                           4 if guidance is None else 28, (768, 512))
    assert request.base_model == "flux1-dev.safetensors"
    if guidance is None:
        assert "cfg" not in request.model_fields_set
    else:
        assert request.cfg == guidance and "cfg" in request.model_fields_set
    # Nothing SDXL-only comes back, so the request passes the Flux check as it is.
    check_flux_request(request, variant="dev" if guidance else "schnell", model_name="flux1-dev")
