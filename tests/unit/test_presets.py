"""Preset loading: key map, old LoRA form, unknown keys, errors, overrides (spec §14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.errors import HooocusError, InvalidRequest, UnknownPreset
from engine.core.jobs import Engine
from engine.core.request import GenerationRequest
from engine.core.runtime import create_runtime
from engine.core.settings import Settings
from engine.core.testing import FakeRunner
from engine.io.presets import PresetBook, apply_preset, find_preset, list_presets, load_preset, parse_preset


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


# -- presets wired into requests (issue 13.6) -----------------------------------------------------


def _book(tmp_path: Path, **kwargs: object) -> PresetBook:
    folder = tmp_path / "presets"
    folder.mkdir(exist_ok=True)
    _preset(folder, {"default_cfg_scale": 6.5, "default_sample_sharpness": 3.0, "default_styles": ["Fooocus Sharp"],
                     "default_refiner": "None", "default_aspect_ratio": "896*1152"}, name="mine")
    return PresetBook(folders=(folder,), **kwargs)  # type: ignore[arg-type]


def test_request_preset_gives_defaults_and_explicit_fields_win(tmp_path: Path) -> None:
    book = _book(tmp_path)
    request = book.apply(GenerationRequest.parse({"prompt": "a cat", "preset": "mine", "cfg": 9.0}))
    assert (request.prompt, request.cfg, request.sharpness, request.styles, request.size, request.preset) == \
        ("a cat", 9.0, 3.0, ["Fooocus Sharp"], (896, 1152), "mine")
    # a field explicitly given at its default value still wins over the preset
    assert book.apply(GenerationRequest.parse({"preset": "mine", "sharpness": 2.0})).sharpness == 2.0
    # no preset named and no server default: the request is untouched
    plain = GenerationRequest.parse({"prompt": "x"})
    assert book.apply(plain) is plain


def test_unknown_preset_is_a_clear_error_on_the_preset_field(tmp_path: Path) -> None:
    with pytest.raises(UnknownPreset) as info:
        _book(tmp_path).apply(GenerationRequest.parse({"preset": "nope"}))
    assert info.value.code == "unknown_preset" and info.value.loc == ("preset",)
    assert "nope" in info.value.message and "mine" in info.value.message  # lists what exists
    with pytest.raises(InvalidRequest) as bad:  # a path is not a preset name
        GenerationRequest.parse({"preset": "../etc/passwd"})
    assert bad.value.loc == ("preset",)


def test_server_default_preset_and_default_refiner_layering(tmp_path: Path) -> None:
    book = _book(tmp_path, default_preset="mine", default_refiner="r.safetensors")
    # settings.preset applies when the request names none; its 'None' refiner overrides the config default
    request = book.apply(GenerationRequest.parse({}))
    assert (request.cfg, request.refiner_model) == (6.5, None)
    only_refiner = PresetBook(default_refiner="r.safetensors")
    assert only_refiner.apply(GenerationRequest.parse({})).refiner_model == "r.safetensors"
    assert only_refiner.apply(GenerationRequest.parse({"refiner_model": "own"})).refiner_model == "own"


def test_preset_dirs_setting_is_read(tmp_path: Path) -> None:
    book = _book(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", preset_dirs=book.folders, preset="mine", default_refiner="r")
    from_settings = PresetBook.from_settings(settings)
    assert from_settings.folders == (tmp_path / "data" / "presets", *book.folders)
    assert from_settings.apply(GenerationRequest.parse({})).cfg == 6.5


def test_engine_applies_the_preset_before_queueing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", preset_dirs=_book(tmp_path).folders)
    runtime = create_runtime(settings, runner=FakeRunner())
    job = runtime.engine.submit({"prompt": "x", "preset": "mine", "cfg": 5.0})
    assert (job.request.cfg, job.request.sharpness) == (5.0, 3.0)
    with pytest.raises(UnknownPreset):
        runtime.engine.submit({"preset": "nope"})
    assert runtime.engine.stats().queue_depth == 1  # the bad request queued nothing
    bare = Engine(FakeRunner())  # no preset folders at all
    with pytest.raises(UnknownPreset) as info:
        bare.submit({"preset": "mine"})
    assert info.value.loc == ("preset",) and bare.stats().queue_depth == 0


def test_cli_preset_flag_reaches_the_request(tmp_path: Path) -> None:
    from hooocus.cli import build_parser, request_fields_from_args

    args = build_parser().parse_args(["generate", "a cat", "--preset", "mine", "--cfg", "8"])
    fields = request_fields_from_args(args, Settings(data_dir=tmp_path))
    assert (fields["preset"], fields["cfg"]) == ("mine", 8.0)
