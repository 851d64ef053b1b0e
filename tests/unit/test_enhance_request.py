"""Issue 16 Enhance request fields (spec §12.6): defaults from Fooocus's tables, validation with field
paths, enhance-only mode on an input image, and a FLUX.1 model refusing them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.core.errors import HooocusError
from engine.core.request import MAX_ENHANCE_TABS, EnhanceOptions, EnhanceTab, GenerationRequest
from tests.paths import refdata_dir

IMG = "sha256:" + "0" * 64


def _error(data: dict[str, Any]) -> HooocusError:
    with pytest.raises(HooocusError) as caught:
        GenerationRequest.parse(data)
    return caught.value


def test_defaults_are_fooocus_defaults() -> None:
    config = json.loads((refdata_dir() / "tables" / "config_defaults.json").read_text())["values"]
    flags = json.loads((refdata_dir() / "tables" / "flags_and_lists.json").read_text())
    tab, options = EnhanceTab(detection_prompt="face"), EnhanceOptions(uov_method="Vary (Subtle)")
    assert tab.mask_model == config["default_enhance_inpaint_mask_model"]
    assert tab.sam_model == config["default_inpaint_mask_sam_model"]
    assert tab.cloth_category == config["default_inpaint_mask_cloth_category"]
    assert tab.max_detections == config["default_sam_max_detections"]
    assert tab.inpaint_engine == config["default_inpaint_engine_version"]
    assert options.uov_processing_order == config["default_enhance_uov_processing_order"]
    assert options.uov_prompt_type == config["default_enhance_uov_prompt_type"]
    assert options.save_only_final == config["default_save_only_final_enhanced_image"]
    assert EnhanceOptions.model_fields["uov_method"].default == config["default_enhance_uov_method"]
    controls = {c.get("label"): c for c in json.loads((refdata_dir() / "tables" / "webui_controls.json").read_text())["controls"]}
    assert tab.box_threshold == controls["Box Threshold"]["value"]
    assert tab.text_threshold == controls["Text Threshold"]["value"]
    assert tab.strength == controls["Inpaint Denoising Strength"]["value"]
    assert tab.respective_field == controls["Inpaint Respective Field"]["value"]
    # every option list is Fooocus's
    assert set(EnhanceTab.model_fields["mask_model"].annotation.__args__) == set(flags["inpaint_mask_models"])
    assert list(EnhanceOptions.model_fields["uov_processing_order"].annotation.__args__) == \
        flags["enhancement_uov_processing_order"]
    assert list(EnhanceOptions.model_fields["uov_prompt_type"].annotation.__args__) == \
        flags["enhancement_uov_prompt_types"]
    assert MAX_ENHANCE_TABS == 5


@pytest.mark.parametrize("enhance,loc", [
    ({}, ("enhance", "tabs")),  # nothing to do
    ({"tabs": [{}]}, ("enhance", "tabs", 0, "detection_prompt")),  # sam needs a detection text
    ({"tabs": [{"mask_model": "u2net"}, {"detection_prompt": " "}]}, ("enhance", "tabs", 1, "detection_prompt")),
    ({"tabs": [{"detection_prompt": "face", "strength": 1.5}]}, ("enhance", "tabs", 0, "strength")),
    ({"tabs": [{"detection_prompt": "face", "mask_model": "yolo"}]}, ("enhance", "tabs", 0, "mask_model")),
    ({"tabs": [{"detection_prompt": "face", "bogus": 1}]}, ("enhance", "tabs", 0, "bogus")),
    ({"tabs": [{"mask_model": "u2net"}] * 6}, ("enhance", "tabs")),
    ({"uov_method": "Upscale (3x)"}, ("enhance", "uov_method")),
    ({"uov_method": "Vary (Subtle)", "uov_processing_order": "Sometimes"}, ("enhance", "uov_processing_order")),
])
def test_bad_enhance_fields_name_their_path(enhance: dict[str, Any], loc: tuple[Any, ...]) -> None:
    err = _error({"enhance": enhance})
    assert err.code == "invalid_request" and err.loc == loc


def test_enhance_only_on_an_input_image() -> None:
    request = GenerationRequest.parse({"input_image": IMG, "enhance": {"tabs": [{"mask_model": "u2net"}]}})
    assert request.enhance_only and request.image_task == "enhance"
    # with an image task the task runs first and enhance works on its results
    vary = GenerationRequest.parse({"input_image": IMG, "uov_method": "Vary (Subtle)",
                                    "enhance": {"tabs": [{"mask_model": "u2net"}]}})
    assert not vary.enhance_only and vary.image_task == "uov"
    # without enhance an input image alone is still refused
    assert _error({"input_image": IMG}).loc == ("input_image",)
    # enhance after text-to-image
    assert GenerationRequest.parse({"enhance": {"uov_method": "Upscale (2x)"}}).image_task is None


def test_a_flux_model_refuses_enhance() -> None:
    from engine.flux.semantics import check_flux_request

    request = GenerationRequest.parse({"enhance": {"uov_method": "Upscale (2x)"}})
    with pytest.raises(HooocusError) as caught:
        check_flux_request(request, variant="schnell", model_name="flux")
    assert caught.value.code == "unsupported_for_model" and caught.value.loc == ("enhance",)
