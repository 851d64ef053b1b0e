"""Preset loading: key map, old LoRA form, unknown keys, errors, overrides (spec §14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.errors import HooocusError, InvalidRequest
from engine.core.request import GenerationRequest
from engine.io.presets import apply_preset, find_preset, list_presets, load_preset, parse_preset


def _preset(tmp_path: Path, data: dict[str, object], name: str = "mine") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_maps_keys_and_reports_unknown(tmp_path: Path) -> None:
    preset = load_preset(_preset(tmp_path, {
        "default_model": "m.safetensors", "default_refiner": "None", "default_cfg_scale": 5.5,
        "default_overwrite_step": -1, "default_overwrite_switch": 12, "default_aspect_ratio": "896*1152",
        "default_loras": [["old_form.safetensors", 0.3], [True, "None", 1.0], [False, "off.safetensors", 0.2]],
        "lora_downloads": {"old_form.safetensors": "https://example.invalid/x"},
        "previous_default_models": ["m_v1.safetensors"], "default_inpaint_engine_version": "None",
        "some_future_key": 1, "another": "x",
    }))
    assert preset.unknown_keys == ["some_future_key", "another"]
    assert any("some_future_key" in note for note in preset.notes)
    assert preset.downloads == {"loras": {"old_form.safetensors": "https://example.invalid/x"}}
    assert preset.previous_default_models == ["m_v1.safetensors"]
    assert "default_inpaint_engine_version" in preset.ignored
    request = apply_preset(preset)
    assert (request.base_model, request.refiner_model, request.cfg, request.steps, request.refiner_switch_step,
            request.size) == ("m.safetensors", None, 5.5, None, 12, (896, 1152))
    assert [(lora.name, lora.weight, lora.enabled) for lora in request.loras] == \
        [("old_form.safetensors", 0.3, True), ("off.safetensors", 0.2, False)]


def test_overrides_win(tmp_path: Path) -> None:
    preset = load_preset(_preset(tmp_path, {"default_cfg_scale": 7.0, "default_refiner": "r.safetensors",
                                            "default_styles": ["Fooocus V2"]}))
    assert apply_preset(preset, {"cfg": 3.0}).cfg == 3.0
    explicit = GenerationRequest.parse({"refiner_model": None, "prompt": "x"})
    merged = apply_preset(preset, explicit)
    assert merged.refiner_model is None and merged.cfg == 7.0 and merged.prompt == "x"
    assert merged.styles == ["Fooocus V2"]
    assert apply_preset(preset, GenerationRequest(prompt="y")).refiner_model == "r.safetensors"


def test_bad_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        load_preset(_preset(tmp_path, {"default_sampler": "no_such_sampler"}))
    assert "mine" in info.value.message and info.value.loc == ("sampler",)
    with pytest.raises(InvalidRequest):
        load_preset(_preset(tmp_path, {"default_loras": [["a", 1.0, True, 4]]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(InvalidRequest):
        load_preset(bad)
    with pytest.raises(InvalidRequest):
        parse_preset(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(HooocusError) as missing:
        load_preset(tmp_path / "nope.json")
    assert missing.value.code == "unknown_preset"


def test_find_and_list(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _preset(first, {}, "one")
    _preset(second, {}, "one")
    _preset(second, {}, "two")
    assert find_preset("one", [first, second]) == first / "one.json"
    assert list_presets([first, second]) == ["one", "two"]
    for name in ("three", "../a/one"):
        with pytest.raises(HooocusError) as info:
            find_preset(name, [first, second])
        assert info.value.code == "unknown_preset"
