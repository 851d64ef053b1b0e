"""Golden: performance modes, aspect ratios, flag lists, config defaults (refdata/tables/) and the
shipped Fooocus presets (fooocus-data/presets/) — every entry, parametrised from the data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from engine.core.constants import (
    DEFAULT_ASPECT_RATIO,
    FOOOCUS_DEFAULT_STYLES,
    FOOOCUS_V2_STYLE,
    LORA_MAX_WEIGHT,
    LORA_MIN_WEIGHT,
    MAX_IMAGE_NUMBER,
    MAX_LORAS,
    MAX_SEED,
    METADATA_SCHEMES,
    OUTPUT_FORMATS,
    PERFORMANCE_NAMES,
    RANDOM_STYLE,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SDXL_ASPECT_RATIOS,
)
from engine.core.errors import InvalidRequest
from engine.core.request import GenerationRequest, parse_aspect_ratio
from engine.io.presets import DOWNLOAD_KEYS, IGNORED_KEYS, PRESET_FIELD_MAP, apply_preset, load_preset
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import MAX_WILDCARD_DEPTH
from engine.sdxl.modes import PERFORMANCE_MODES, SamplingSettings, aspect_ratio_ui_label
from engine.sdxl.resolve import resolve_request
from tests.paths import fooocus_data_dir, refdata_dir


def _load(name: str) -> dict[str, Any]:
    path = refdata_dir() / "tables" / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


_MODES = _load("performance_modes.json")
_RATIOS = _load("aspect_ratios.json")
_FLAGS = _load("flags_and_lists.json")
_CONFIG = _load("config_defaults.json")
_PRESET_FILES = sorted((fooocus_data_dir() / "presets").glob("*.json"))
_DEFAULTS = GenerationRequest()

#: Fooocus metadata key (the right side of possible_preset_keys) -> our GenerationRequest field.
_METADATA_KEY_TO_FIELD = {
    "base_model": "base_model", "refiner_model": "refiner_model", "refiner_switch": "refiner_switch",
    "guidance_scale": "cfg", "sharpness": "sharpness", "adaptive_cfg": "adaptive_cfg", "clip_skip": "clip_skip",
    "sampler": "sampler", "scheduler": "scheduler", "steps": "steps", "overwrite_switch": "refiner_switch_step",
    "performance": "performance", "image_number": "image_number", "prompt": "prompt",
    "negative_prompt": "negative_prompt", "styles": "styles", "resolution": "aspect_ratio", "vae": "vae",
    "<processed>": "loras",
}


def test_golden_files_present() -> None:
    for name, data in (("performance_modes.json", _MODES), ("aspect_ratios.json", _RATIOS),
                       ("flags_and_lists.json", _FLAGS), ("config_defaults.json", _CONFIG)):
        assert data, f"refdata/tables/{name} missing or empty"
    assert _PRESET_FILES, "no presets in fooocus-data/presets"


# -- performance modes ---------------------------------------------------------------------------

_MODE_ROWS = _MODES.get("modes", [])


def test_mode_names_and_order() -> None:
    assert [row["name"] for row in _MODE_ROWS] == list(PERFORMANCE_MODES) == list(PERFORMANCE_NAMES)


def _stub_settings(fields: dict[str, Any]) -> SamplingSettings:
    refiner = fields["refiner_model_name"]
    return SamplingSettings(
        sampler=fields["sampler_name"], scheduler=fields["scheduler_name"], cfg=fields["cfg_scale"],
        sharpness=fields["sharpness"], adaptive_cfg=fields["adaptive_cfg"],
        adm_scaler_positive=fields["adm_scaler_positive"], adm_scaler_negative=fields["adm_scaler_negative"],
        adm_scaler_end=fields["adm_scaler_end"], refiner_model=None if refiner == "None" else refiner,
        refiner_switch=fields["refiner_switch"])


@pytest.mark.parametrize("row", _MODE_ROWS, ids=[row["name"] for row in _MODE_ROWS])
def test_performance_mode(row: dict[str, Any]) -> None:
    mode = PERFORMANCE_MODES[row["name"]]
    assert (mode.steps, mode.steps_uov, mode.lora_file, mode.restricted) == \
        (row["steps"], row["steps_uov"], row["lora_filename"], row["has_restricted_features"])
    after = row["task_fields_after_handler_overrides"]
    before = _stub_settings(_MODES["stub_task_defaults_before_override"])
    assert mode.apply(before) == _stub_settings(after)
    assert ([list(mode.lora)] if mode.lora else []) == after["performance_loras"]


@pytest.mark.parametrize("row", _MODE_ROWS, ids=[row["name"] for row in _MODE_ROWS])
def test_performance_mode_through_resolve(row: dict[str, Any]) -> None:
    """The same overrides via resolve_request, from a request carrying the stub task's values."""
    stub = _MODES["stub_task_defaults_before_override"]
    request = GenerationRequest(
        performance=row["name"], sampler=stub["sampler_name"], scheduler=stub["scheduler_name"],
        sharpness=stub["sharpness"], cfg=stub["cfg_scale"], adaptive_cfg=stub["adaptive_cfg"],
        refiner_model=stub["refiner_model_name"], refiner_switch=stub["refiner_switch"],
        adm_scaler_positive=stub["adm_scaler_positive"], adm_scaler_negative=stub["adm_scaler_negative"],
        adm_scaler_end=stub["adm_scaler_end"], seed=1, styles=[])
    resolved = resolve_request(request, default_model="base.safetensors", default_styles=(),
                               style_library=StyleLibrary([]), rng=random.Random(0))
    after = _stub_settings(row["task_fields_after_handler_overrides"])
    assert (resolved.sampler, resolved.scheduler, resolved.cfg, resolved.sharpness, resolved.adaptive_cfg,
            resolved.adm_scaler_positive, resolved.adm_scaler_negative, resolved.adm_scaler_end,
            resolved.refiner_model, resolved.refiner_switch) == \
        (after.sampler, after.scheduler, after.cfg, after.sharpness, after.adaptive_cfg, after.adm_scaler_positive,
         after.adm_scaler_negative, after.adm_scaler_end, after.refiner_model, after.refiner_switch)
    assert resolved.steps == row["steps"]
    performance_loras = row["task_fields_after_handler_overrides"]["performance_loras"]
    assert ([list(resolved.performance_lora)] if resolved.performance_lora else []) == performance_loras
    assert [list(entry) for entry in resolved.loras] == performance_loras  # no user LoRAs in this request
    assert resolved.switch_step == int(round(row["steps"] * after.refiner_switch))


# -- aspect ratios --------------------------------------------------------------------------------

_PARSED_RATIOS = _RATIOS.get("parsed", [])


def test_aspect_ratio_list() -> None:
    assert list(SDXL_ASPECT_RATIOS) == _RATIOS["sdxl_aspect_ratios"] == _CONFIG["values"]["available_aspect_ratios"]
    assert DEFAULT_ASPECT_RATIO == _RATIOS["default_aspect_ratio"]
    assert GenerationRequest().aspect_ratio == _RATIOS["default_aspect_ratio"]


@pytest.mark.parametrize("entry", _PARSED_RATIOS, ids=[e["label"] for e in _PARSED_RATIOS])
def test_aspect_ratio_entry(entry: dict[str, Any]) -> None:
    width, height = parse_aspect_ratio(entry["label"])
    assert (width, height, width * height) == (entry["width"], entry["height"], entry["pixels"])
    assert aspect_ratio_ui_label(entry["label"]) == entry["ui_label_html"]
    # A client may send Fooocus's UI label as is.
    assert GenerationRequest(aspect_ratio=entry["ui_label_html"]).size == (entry["width"], entry["height"])


# -- flags and lists -------------------------------------------------------------------------------

def test_sampler_scheduler_format_lists() -> None:
    assert list(SAMPLER_NAMES) == _FLAGS["sampler_list"]
    assert list(SCHEDULER_NAMES) == _FLAGS["scheduler_list"]
    assert list(OUTPUT_FORMATS) == _FLAGS["output_formats"]
    assert set(_FLAGS["metadata_schemes"]) <= set(METADATA_SCHEMES)
    assert (_FLAGS["MIN_SEED"], _FLAGS["MAX_SEED"]) == (0, MAX_SEED)
    assert _DEFAULTS.refiner_swap_method == _FLAGS["refiner_swap_method_default"]


def test_clip_skip_range() -> None:
    assert GenerationRequest(clip_skip=_FLAGS["clip_skip_max"]).clip_skip == _FLAGS["clip_skip_max"]
    with pytest.raises(InvalidRequest):
        GenerationRequest.parse({"clip_skip": _FLAGS["clip_skip_max"] + 1})


def test_legal_style_names() -> None:
    library = StyleLibrary.load([fooocus_data_dir() / "sdxl_styles"], builtin=False)
    assert (FOOOCUS_V2_STYLE, RANDOM_STYLE) == (_FLAGS["fooocus_expansion_style_name"], _FLAGS["random_style_name"])
    assert library.legal_names() == _FLAGS["legal_style_names"]
    assert len(library) == _FLAGS["style_count"]
    with_ours = StyleLibrary.load([fooocus_data_dir() / "sdxl_styles"])
    assert set(_FLAGS["legal_style_names"]) <= set(with_ours.legal_names())


# -- config defaults we mirror ----------------------------------------------------------------------

def test_config_defaults_we_mirror() -> None:
    values = _CONFIG["values"]
    mirrored = {
        "default_refiner_switch": _DEFAULTS.refiner_switch, "default_cfg_scale": _DEFAULTS.cfg,
        "default_sample_sharpness": _DEFAULTS.sharpness, "default_sampler": _DEFAULTS.sampler,
        "default_scheduler": _DEFAULTS.scheduler, "default_performance": _DEFAULTS.performance,
        "default_styles": list(FOOOCUS_DEFAULT_STYLES), "default_max_image_number": MAX_IMAGE_NUMBER,
        "default_output_format": _DEFAULTS.output_format, "default_cfg_tsnr": _DEFAULTS.adaptive_cfg,
        "default_clip_skip": _DEFAULTS.clip_skip, "default_max_lora_number": MAX_LORAS,
        "default_loras_min_weight": LORA_MIN_WEIGHT, "default_loras_max_weight": LORA_MAX_WEIGHT,
        "default_metadata_scheme": _DEFAULTS.metadata_scheme,
        "wildcards_max_bfs_depth": MAX_WILDCARD_DEPTH, "default_prompt": _DEFAULTS.prompt,
        "default_prompt_negative": _DEFAULTS.negative_prompt,
    }
    for key, ours in mirrored.items():
        assert ours == values[key], key
    patch = _CONFIG["patch_settings_defaults"]
    assert (_DEFAULTS.sharpness, _DEFAULTS.adm_scaler_end, _DEFAULTS.adm_scaler_positive,
            _DEFAULTS.adm_scaler_negative, _DEFAULTS.adaptive_cfg) == \
        (patch["sharpness"], patch["adm_scaler_end"], patch["positive_adm_scale"], patch["negative_adm_scale"],
         patch["adaptive_cfg"])


def test_default_preset_gives_config_defaults() -> None:
    values = _CONFIG["values"]
    request = apply_preset(load_preset(fooocus_data_dir() / "presets" / "default.json"))
    assert request.base_model == values["default_base_model_name"]
    assert (request.refiner_model or "None") == values["default_refiner_model_name"]
    expected_loras = [[name, weight] for enabled, name, weight in values["default_loras"] if enabled and name != "None"]
    assert [[lora.name, lora.weight] for lora in request.loras if lora.enabled] == expected_loras
    assert (request.vae or "Default (model)") == values["default_vae"] == _FLAGS["default_vae"]


def test_every_preset_key_is_understood() -> None:
    for preset_key, metadata_key in _CONFIG["values"]["possible_preset_keys"].items():
        if preset_key in PRESET_FIELD_MAP:
            assert PRESET_FIELD_MAP[preset_key] == _METADATA_KEY_TO_FIELD[metadata_key], preset_key
        else:
            assert preset_key in DOWNLOAD_KEYS or preset_key in IGNORED_KEYS, preset_key


# -- shipped presets ---------------------------------------------------------------------------------

def _expected_field(key: str, value: Any) -> Any:
    """What the request field should be for a raw preset value (Fooocus's 'off' spellings -> None)."""
    if key == "default_loras":
        slots = [slot if len(slot) == 3 else [True, *slot] for slot in value]
        return [(name, weight, enabled) for enabled, name, weight in slots if name != "None"]
    if (key, value) in (("default_refiner", "None"), ("default_vae", "Default (model)")):
        return None
    if key in ("default_overwrite_step", "default_overwrite_switch") and value == -1:
        return None
    return value


@pytest.mark.parametrize("path", _PRESET_FILES, ids=[p.stem for p in _PRESET_FILES])
def test_shipped_preset(path: Path) -> None:
    raw = json.loads(path.read_text(encoding="utf-8"))
    preset = load_preset(path)
    assert preset.unknown_keys == []
    assert preset.name == path.stem
    request = apply_preset(preset)
    for key, value in raw.items():
        if key in PRESET_FIELD_MAP:
            field = PRESET_FIELD_MAP[key]
            got = getattr(request, field)
            if field == "loras":
                got = [(lora.name, lora.weight, lora.enabled) for lora in got]
            expected = _expected_field(key, value)
            if expected is None:
                expected = getattr(_DEFAULTS, field)
            assert got == expected, key
        elif key in DOWNLOAD_KEYS:
            assert preset.downloads[DOWNLOAD_KEYS[key]] == value
    if "previous_default_models" in raw:
        assert preset.previous_default_models == raw["previous_default_models"]
    # The preset resolves: styles exist in Fooocus's set, the performance mode applies.
    resolved = resolve_request(request, default_model="x.safetensors", default_styles=(),
                               style_library=StyleLibrary.load([fooocus_data_dir() / "sdxl_styles"], builtin=False),
                               rng=random.Random(0))
    assert resolved.base_model == raw["default_model"]
    assert resolved.steps == PERFORMANCE_MODES[raw["default_performance"]].steps
