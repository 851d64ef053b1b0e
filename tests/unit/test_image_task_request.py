"""Issue 14 request fields: validation at the boundary, resolution (task, denoise, steps, sizes, the
inpaint method table, the inpaint prompt), and the metadata Fooocus writes/reads for them."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest

from engine.core.errors import InvalidRequest
from engine.core.request import GenerationRequest
from engine.imaging.sizes import upscale_plan, vary_target_hw
from engine.io.metadata import MetadataInput, build_metadata_list, metadata_text
from engine.io.metadata.read import parameters_to_request, parse_parameters
from engine.io.metadata.write import fast_upscale_metadata
from engine.prompts.styles import StyleLibrary
from engine.sdxl.resolve import ResolvedRequest, resolve_request
from tests.paths import parity_dir, parity_skip_reason

LIBRARY = StyleLibrary.load([])
IMG = "sha256:" + "a" * 64


def _resolve(input_size: tuple[int, int] | None = (640, 480), **fields: Any) -> ResolvedRequest:
    fields.setdefault("seed", 7)
    return resolve_request(GenerationRequest(**fields), default_model="base.safetensors", default_styles=(),
                           style_library=LIBRARY, rng=random.Random(0), input_size=input_size)


@pytest.mark.parametrize(("fields", "loc"), [
    ({"input_image": IMG}, ("input_image",)),  # nothing to do with the image
    ({"uov_method": "Vary (Subtle)"}, ("input_image",)),
    ({"inpaint_mask": IMG}, ("input_image",)),
    ({"inpaint_mask_upload": IMG}, ("input_image",)),
    ({"outpaint_selections": ["Left"]}, ("input_image",)),
    ({"input_image": IMG, "outpaint_selections": ["Top", "Top"]}, ("outpaint_selections",)),
    ({"input_image": IMG, "uov_method": "Vary (Medium)"}, ("uov_method",)),
    ({"input_image": IMG, "inpaint_mask": IMG, "inpaint_engine": "v3"}, ("inpaint_engine",)),
    ({"input_image": IMG, "inpaint_mask": IMG, "inpaint_strength": 1.5}, ("inpaint_strength",)),
    ({"input_image": IMG, "inpaint_mask": IMG, "inpaint_erode_or_dilate": 65}, ("inpaint_erode_or_dilate",)),
    ({"input_image": IMG, "uov_method": "Vary (Strong)", "vary_strength": 0.0}, ("vary_strength",)),
    ({"input_image": IMG, "outpaint_selections": ["Middle"]}, ("outpaint_selections", 0)),
])
def test_bad_image_fields_name_their_field(fields: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest.parse(fields)
    assert info.value.code == "invalid_request" and tuple(info.value.loc) == loc


def test_defaults_are_contract_values() -> None:
    request = GenerationRequest()
    assert request.uov_method == "Disabled" and request.input_image is None and request.image_task is None
    assert request.inpaint_mode == "Inpaint or Outpaint (default)" and request.outpaint_selections == []
    assert (request.inpaint_engine, request.inpaint_strength, request.inpaint_respective_field,
            request.inpaint_disable_initial_latent) == (None, None, None, None)
    assert GenerationRequest(input_image=IMG, uov_method="Upscale (2x)", inpaint_mask=IMG).image_task == "uov"
    assert GenerationRequest(input_image=IMG, outpaint_selections=["Left"]).image_task == "inpaint"


@pytest.mark.parametrize(("method", "strength", "denoise"), [("Vary (Subtle)", None, 0.5),
                                                             ("Vary (Strong)", None, 0.85),
                                                             ("Vary (Strong)", 0.3, 0.3)])
def test_vary_denoise_size_and_normal_steps(method: str, strength: float | None, denoise: float) -> None:
    resolved = _resolve(input_image=IMG, uov_method=method, vary_strength=strength)
    assert resolved.task == "vary" and resolved.denoise == denoise and resolved.steps == 30
    assert (resolved.height, resolved.width) == vary_target_hw(480, 640)


@pytest.mark.parametrize(("method", "factor"), [("Upscale (1.5x)", 1.5), ("Upscale (2x)", 2.0)])
def test_upscale_uses_uov_steps_plan_size_and_0382(method: str, factor: float) -> None:
    resolved = _resolve(input_image=IMG, uov_method=method)
    plan = upscale_plan(480, 640, factor)
    assert resolved.task == "upscale" and resolved.denoise == 0.382 and resolved.steps == 18
    assert (resolved.height, resolved.width) == plan.result_hw and resolved.upscale_factor == factor
    assert resolved.switch_step == 9  # round(18 · 0.5): the UOV steps are the switch base (parity run f)
    assert _resolve(input_image=IMG, uov_method=method, upscale_strength=0.6).denoise == 0.6
    big = _resolve(input_size=(2400, 2000), input_image=IMG, uov_method=method)
    assert big.upscale_direct_return is upscale_plan(2000, 2400, factor).direct_return is True
    assert not resolved.upscale_direct_return


def test_fast_upscale_is_twice_the_input() -> None:
    resolved = _resolve(input_image=IMG, uov_method="Upscale (Fast 2x)")
    assert resolved.task == "upscale_fast" and resolved.size == (1280, 960)
    small = _resolve(input_size=(64, 48), input_image=IMG, uov_method="Upscale (Fast 2x)")
    assert (small.height, small.width) == upscale_plan(48, 64, 2.0).result_hw  # shape ceil 1024 rule


@pytest.mark.parametrize(("mode", "expected"), [
    ("Inpaint or Outpaint (default)", ("v2.6", 1.0, 0.618, False)),
    ("Improve Detail (face, hand, eyes, etc.)", ("None", 0.5, 0.0, False)),
    ("Modify Content (add objects, change background, etc.)", ("v2.6", 1.0, 0.0, True)),
])
def test_inpaint_mode_table(mode: str, expected: tuple[Any, ...]) -> None:
    resolved = _resolve(input_image=IMG, inpaint_mask=IMG, inpaint_mode=mode)
    p = resolved.inpaint
    assert resolved.task == "inpaint" and p is not None and resolved.size == (640, 480)
    assert (p.engine, p.denoise, p.respective_field, p.disable_initial_latent) == expected
    assert resolved.denoise == expected[1]
    # an engine means the synthetic refiner: switch = round(mode steps · 0.8) (spec §8)
    assert resolved.synthetic_refiner is (expected[0] != "None")
    assert resolved.switch_step == (24 if expected[0] != "None" else 15)


def test_inpaint_overrides_outpaint_and_prompt() -> None:
    resolved = _resolve(input_image=IMG, inpaint_mask=IMG, inpaint_engine="v1", inpaint_strength=0.7,
                        inpaint_respective_field=0.3, inpaint_disable_initial_latent=True, prompt="a door",
                        inpaint_additional_prompt="red")
    p = resolved.inpaint
    assert (p.engine, p.denoise, p.respective_field, p.disable_initial_latent) == ("v1", 0.7, 0.3, True)
    assert resolved.prompt == "red\na door"
    assert _resolve(input_image=IMG, inpaint_mask=IMG, inpaint_additional_prompt="red").prompt == "red"
    out = _resolve(input_image=IMG, outpaint_selections=["Left"], inpaint_strength=0.4).inpaint
    assert out.denoise == 1.0 and out.respective_field == 0.618  # quirk: the method's field stays
    # UOV wins over inpaint: the additional prompt is not used
    assert _resolve(input_image=IMG, uov_method="Vary (Subtle)", inpaint_mask=IMG,
                    inpaint_additional_prompt="red", prompt="x").prompt == "x"


def test_image_task_needs_the_input_size() -> None:
    with pytest.raises(ValueError, match="input_size"):
        _resolve(input_size=None, input_image=IMG, uov_method="Vary (Subtle)")


@pytest.mark.skipif(parity_skip_reason() is not None, reason=str(parity_skip_reason()))
def test_parity_runs_resolve_to_their_recorded_plan() -> None:
    """Each image run's recorded steps/switch/denoise/size come out of resolve (runs-extra params.json)."""
    for name, fields in (("e_vary_subtle", {"uov_method": "Vary (Subtle)"}),
                         ("f_upscale_1_5x", {"uov_method": "Upscale (1.5x)"}),
                         ("g_inpaint_rect", {"inpaint_mask": IMG})):
        params = json.loads((parity_dir() / "runs-extra" / name / "params.json").read_text())
        user, derived = params["user_parameters"], params["derived"]
        switch = user.get("overwrite_switch")
        resolved = _resolve(input_size=(256, 256), input_image=IMG, steps=user["steps"],
                            refiner_switch_step=switch if switch and switch > 0 else None, **fields)
        assert (resolved.steps, resolved.switch_step, resolved.denoise) == (
            derived["steps"], derived["switch"], derived["denoise"]), name
        if name != "g_inpaint_rect":  # inpaint's size is the crop's, decided in the pipeline
            assert resolved.size == (derived["width"], derived["height"]), name


def _meta(**changes: Any) -> MetadataInput:
    base = MetadataInput(
        prompt="a cat", negative_prompt="", expansion="", styles=[], performance="Speed", steps=30, width=1024,
        height=1024, cfg=4, sharpness=2, adm=(1.5, 0.8, 0.3), base_model="base.safetensors",
        base_model_hash="aaaaaaaaaa", full_prompt=["a cat"], full_negative_prompt=[""], seed=5,
        sampler="dpmpp_2m_sde_gpu", scheduler="karras", version="Hooocus v0", metadata_scheme="fooocus")
    return replace(base, **changes)


@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
def test_inpaint_metadata_round_trips(scheme: str) -> None:
    inp = _meta(inpaint_mode="Modify Content (add objects, change background, etc.)", inpaint_engine="v2.5",
                metadata_scheme=scheme)
    keys = [key for _label, key, _value in build_metadata_list(inp)]
    assert "inpaint_method" in keys and "inpaint_engine_version" in keys
    assert "inpaint_method" not in [key for _l, key, _v in build_metadata_list(_meta())]
    request, warnings = parameters_to_request(parse_parameters(metadata_text(inp), scheme))
    assert request.inpaint_mode == inp.inpaint_mode and request.inpaint_engine == "v2.5"
    assert request.input_image is None and not warnings  # the image itself is not in the metadata


def test_fast_upscale_metadata_is_fooocus_one_entry() -> None:
    text, items = fast_upscale_metadata("fooocus", "Hooocus v0")
    assert items[0] == ("Upscale (Fast)", "upscale_fast", "2x")
    assert json.loads(text)["upscale_fast"] == "2x"
    assert fast_upscale_metadata(None)[0] is None
    request, warnings = parameters_to_request(parse_parameters(text, "fooocus"))
    assert request.uov_method == "Disabled" and any("Upscale (Fast 2x)" in w for w in warnings)


def test_unknown_inpaint_values_read_as_warnings() -> None:
    request, warnings = parameters_to_request({"inpaint_method": "Paint", "inpaint_engine_version": "v9"})
    assert request.inpaint_mode == "Inpaint or Outpaint (default)" and request.inpaint_engine is None
    assert len(warnings) == 2


def test_run_context_carries_decoded_inputs() -> None:
    import numpy as np

    from engine.core.jobs import Job, RunContext

    job = Job("j1", GenerationRequest(input_image=IMG, uov_method="Vary (Subtle)"), "local")
    image = np.zeros((8, 8, 3), np.uint8)
    assert RunContext(job, object(), inputs={"input_image": image}).inputs["input_image"] is image  # type: ignore[arg-type]
    assert dict(RunContext(job, object()).inputs) == {}  # type: ignore[arg-type]
