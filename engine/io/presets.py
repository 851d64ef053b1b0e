"""Fooocus presets (``presets/*.json``, spec §14) as request defaults.

A preset maps onto :class:`~engine.core.request.GenerationRequest` fields through Fooocus's
preset→metadata key map. Keys we understand but do not use are kept in ``ignored`` with a note;
keys we do not know are reported in ``unknown_keys``, never dropped silently. Download URLs are
returned for an operator to act on; nothing is downloaded here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine.core.errors import InvalidRequest, UnknownPreset
from engine.core.request import GenerationRequest

if TYPE_CHECKING:
    from engine.core.settings import Settings

#: preset key -> GenerationRequest field (spec §14 possible_preset_keys, in our field names).
PRESET_FIELD_MAP: dict[str, str] = {
    "default_model": "base_model",
    "default_refiner": "refiner_model",
    "default_refiner_switch": "refiner_switch",
    "default_loras": "loras",
    "default_cfg_scale": "cfg",
    "default_sample_sharpness": "sharpness",
    "default_cfg_tsnr": "adaptive_cfg",
    "default_clip_skip": "clip_skip",
    "default_sampler": "sampler",
    "default_scheduler": "scheduler",
    "default_overwrite_step": "steps",
    "default_overwrite_switch": "refiner_switch_step",
    "default_performance": "performance",
    "default_image_number": "image_number",
    "default_prompt": "prompt",
    "default_prompt_negative": "negative_prompt",
    "default_styles": "styles",
    "default_aspect_ratio": "aspect_ratio",
    "default_vae": "vae",
    # config keys a preset may also set (presets are merged over the config defaults)
    "default_output_format": "output_format",
    "default_metadata_scheme": "metadata_scheme",
}
DOWNLOAD_KEYS: dict[str, str] = {
    "checkpoint_downloads": "checkpoints", "embeddings_downloads": "embeddings",
    "lora_downloads": "loras", "vae_downloads": "vae",
}
#: Known keys with no request field: kept in ``PresetResult.ignored`` with this note.
IGNORED_KEYS: dict[str, str] = {
    "previous_default_models": "older model names used instead of downloading (see previous_default_models)",
    "default_loras_min_weight": "UI slider range; requests allow -2..2",
    "default_loras_max_weight": "UI slider range; requests allow -2..2",
    "default_max_lora_number": "requests allow 5 LoRAs",
    "default_inpaint_engine_version": "inpaint is not part of text-to-image requests",
    "default_save_metadata_to_images": "metadata_scheme 'none' turns metadata off",
    "default_advanced_checkbox": "UI only",
    "default_max_image_number": "requests allow 1..32 images",
}
_OFF_VALUES = {"default_refiner": "None", "default_vae": "Default (model)"}
_UNSET_NUMBERS = ("default_overwrite_step", "default_overwrite_switch")


@dataclass(frozen=True)
class PresetResult:
    name: str
    #: GenerationRequest fields (JSON-able) this preset sets.
    defaults: dict[str, Any]
    #: kind ('checkpoints', 'loras', 'embeddings', 'vae') -> {file name: url}.
    downloads: dict[str, dict[str, str]] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    #: Known keys we do not apply, with their values.
    ignored: dict[str, Any] = field(default_factory=dict)
    previous_default_models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _loras(value: Any, source: str) -> list[dict[str, Any]]:
    """``[[enabled, file, weight], ...]`` or the old ``[[file, weight], ...]``; 'None' slots dropped."""
    if not isinstance(value, list):
        raise InvalidRequest(f"{source}: default_loras must be a list", loc=("default_loras",))
    out = []
    for index, slot in enumerate(value):
        if isinstance(slot, list) and len(slot) == 3:
            enabled, name, weight = slot
        elif isinstance(slot, list) and len(slot) == 2:
            enabled, (name, weight) = True, slot
        else:
            raise InvalidRequest(f"{source}: default_loras[{index}] must be [enabled, file, weight] or [file, weight]",
                                 loc=("default_loras", index))
        if name == "None":
            continue
        out.append({"name": name, "weight": weight, "enabled": enabled})
    return out


def parse_preset(data: Mapping[str, Any], *, name: str = "preset") -> PresetResult:
    """Map a preset dict onto request defaults; validate them as a GenerationRequest would."""
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"{name}: a preset must be a JSON object", loc=("preset",))
    defaults: dict[str, Any] = {}
    downloads: dict[str, dict[str, str]] = {}
    ignored: dict[str, Any] = {}
    unknown: list[str] = []
    notes: list[str] = []
    previous: list[str] = []
    for key, value in data.items():
        if key in PRESET_FIELD_MAP:
            if key == "default_loras":
                value = _loras(value, name)
            elif _OFF_VALUES.get(key) == value or (key in _UNSET_NUMBERS and value == -1):
                value = None
            defaults[PRESET_FIELD_MAP[key]] = value
        elif key in DOWNLOAD_KEYS:
            downloads[DOWNLOAD_KEYS[key]] = dict(value or {})
        elif key in IGNORED_KEYS:
            ignored[key] = value
            notes.append(f"{key}: {IGNORED_KEYS[key]}")
            if key == "previous_default_models":
                previous = list(value or [])
        else:
            unknown.append(key)
    if unknown:
        notes.append(f"unknown keys not applied: {', '.join(unknown)}")
    try:  # fail early, with the preset's name and the field path
        GenerationRequest.parse({k: v for k, v in defaults.items() if v is not None})
    except InvalidRequest as exc:
        raise InvalidRequest(f"preset {name}: {exc.message}", loc=exc.loc, details=exc.details) from None
    return PresetResult(name=name, defaults=defaults, downloads=downloads, unknown_keys=unknown, ignored=ignored,
                        previous_default_models=previous, notes=notes)


def load_preset(path: Path | str) -> PresetResult:
    """Read one Fooocus preset file. Missing file -> code ``unknown_preset``; bad JSON or values ->
    ``invalid_request``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UnknownPreset(f"preset {path.stem!r} cannot be read: {exc}", loc=("preset",)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"preset {path.name}: not valid JSON ({exc})", loc=("preset",)) from None
    return parse_preset(data, name=path.stem)


def find_preset(name: str, folders: Iterable[Path | str]) -> Path:
    """``folders/<name>.json``, first folder first; code ``unknown_preset`` when none has it."""
    for folder in folders:
        candidate = Path(folder) / f"{name}.json"
        if Path(name).name == name and candidate.is_file():
            return candidate
    raise UnknownPreset(f"unknown preset {name!r}", loc=("preset",))


def list_presets(folders: Iterable[Path | str]) -> list[str]:
    names: dict[str, None] = {}
    for folder in folders:
        if Path(folder).is_dir():
            names.update((p.stem, None) for p in sorted(Path(folder).glob("*.json")))
    return list(names)


def apply_preset(preset: PresetResult, overrides: Mapping[str, Any] | GenerationRequest | None = None
                 ) -> GenerationRequest:
    """The preset's defaults with the caller's fields on top, validated.

    ``overrides`` is a dict of request fields, or a GenerationRequest whose explicitly set fields win.
    A preset value of None ('None' refiner, -1 steps) means "the request default".
    """
    if isinstance(overrides, BaseModel):
        given = overrides.model_dump(exclude_unset=True)
    else:
        given = dict(overrides or {})
    merged = {k: v for k, v in preset.defaults.items() if v is not None}
    merged.update(given)
    return GenerationRequest.parse(merged)


@dataclass(frozen=True)
class PresetBook:
    """The server's presets, applied to each request at submit, the way Fooocus layers them:
    config defaults (``default_refiner``) < the preset < the request's own explicit fields.

    The preset is the request's ``preset`` or, when it names none, the server's default
    (``settings.preset``, Fooocus's ``--preset``). Files are read per request (a few hundred
    bytes), so an edited preset applies to the next job without a restart and nothing is cached.
    """

    folders: tuple[Path, ...] = ()
    default_preset: str | None = None
    default_refiner: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PresetBook:
        return cls(folders=(settings.data_dir / "presets", *settings.preset_dirs), default_preset=settings.preset,
                   default_refiner=settings.default_refiner)

    def names(self) -> list[str]:
        return list_presets(self.folders)

    def apply(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with the preset's values under its explicitly set fields (validated).
        Unknown preset: ``UnknownPreset`` with loc ("preset",), before anything is queued."""
        name = request.preset or self.default_preset
        if name is None and self.default_refiner is None:
            return request
        defaults: dict[str, Any] = {}
        if self.default_refiner is not None:
            defaults["refiner_model"] = self.default_refiner
        if name is not None:
            try:
                preset = load_preset(find_preset(name, self.folders))
            except UnknownPreset as exc:
                available = ", ".join(self.names()) or "none installed"
                raise UnknownPreset(f"{exc.message}; available: {available}", loc=("preset",)) from None
            for key, value in preset.defaults.items():
                if value is not None:
                    defaults[key] = value
                elif key == "refiner_model":  # the preset turns the refiner off: the config default yields
                    defaults.pop(key, None)
            defaults["preset"] = name
        return apply_preset(PresetResult(name=name or "", defaults=defaults), request)
