"""Model folders: list what is there, and resolve a client-given name to a file inside them.

Reliability matrix row 22: a name is looked up in a dict built from a folder scan, never joined onto
a path, so ``../x``, ``/etc/passwd``, ``a/../../b``, ``..\\x``, ``%2e%2e/x`` and ``x\\x00y`` cannot
reach outside a folder; they are also refused up front. A symlink whose target leaves its folder is
skipped at scan time and checked again on resolve (``resolve().is_relative_to``). Every failure is
the same ``unknown model NAME; available: ...`` message, so the answer says nothing about which
files exist elsewhere.

A folder may be an existing Fooocus/A1111/ComfyUI ``models/...`` folder. Only ``.safetensors``
files are listed; a diffusers model folder (one with ``model_index.json``) inside a checkpoints
folder is one entry. Spec §11.1: only SDXL base checkpoints can be the base model; §8: SDXL base or
refiner checkpoints can be the refiner.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from engine.core.constants import DEMO_MODEL, DEMO_REFINER
from engine.core.errors import HooocusError, UnknownLora, UnknownModel
from engine.io.family import classify_keys, inspect_weights
from engine.io.safety import SAFETENSORS_SUFFIX, check_weight_file, sha256_file

if TYPE_CHECKING:
    from engine.core.settings import Settings

log = logging.getLogger(__name__)

ModelKind = Literal["checkpoints", "loras", "vae", "embeddings"]
KINDS: tuple[str, ...] = ("checkpoints", "loras", "vae", "embeddings")
CheckpointKind = Literal["sdxl_base", "sdxl_refiner", "sd15", "unknown"]

MAX_NAME_CHARS = 512
#: How many names an "unknown model" message lists.
MAX_LISTED_NAMES = 20
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:")

_UNET = "model.diffusion_model."
_CLIP_L_SDXL = "conditioner.embedders.0.transformer."
_BIGG_BASE = "conditioner.embedders.1.model."
_BIGG_REFINER = "conditioner.embedders.0.model."
_CLIP_L_SD15 = "cond_stage_model.transformer."


def _flux_reason(variant: str | None) -> str:
    return (f"a FLUX.1 [{variant}] model: it runs on the Flux runner (name it as a request's base_model "
            "or as --model), not as an SDXL base or refiner")


def detect_checkpoint_kind(keys: Iterable[str]) -> CheckpointKind:
    """What a single-file (Stability/A1111 layout) checkpoint holds, from its tensor names alone.

    SDXL base: UNet + CLIP-L at ``conditioner.embedders.0.transformer`` + OpenCLIP bigG at
    ``conditioner.embedders.1.model``; SDXL refiner: UNet + bigG at ``conditioner.embedders.0.model``;
    SD 1.5: UNet + CLIP-L at ``cond_stage_model.transformer``. Anything else is "unknown".
    """
    seen = {prefix: False for prefix in (_UNET, _CLIP_L_SDXL, _BIGG_BASE, _BIGG_REFINER, _CLIP_L_SD15)}
    for key in keys:
        for prefix in seen:
            if not seen[prefix] and key.startswith(prefix):
                seen[prefix] = True
    if not seen[_UNET]:
        return "unknown"
    if seen[_BIGG_BASE] and seen[_CLIP_L_SDXL]:
        return "sdxl_base"
    if seen[_BIGG_REFINER]:
        return "sdxl_refiner"
    if seen[_CLIP_L_SD15]:
        return "sd15"
    return "unknown"


@dataclass(frozen=True)
class ModelEntry:
    """One model file (or diffusers folder) found in a model folder."""

    #: The name clients use: the path relative to its folder, with '/' separators.
    name: str
    path: Path
    size_bytes: int
    usable: bool
    #: Why the entry is not usable (None when it is).
    reason: str | None = None
    #: For checkpoints: "sdxl_base", "sdxl_refiner", "sd15", "flux_schnell", "flux_dev" or "unknown"; None for
    #: other kinds.
    architecture: str | None = None


@dataclass(frozen=True)
class _Found:
    name: str
    path: Path
    root: Path
    is_folder: bool


def is_plain_name(name: object) -> bool:
    """True when ``name`` can only mean a path inside a folder (no traversal, no encoding tricks)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        return False
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name) or "\\" in name:
        return False
    if name.startswith(("/", "~")) or _DRIVE.match(name) or _ENCODED_SEPARATOR.search(name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


class ModelRegistry:
    """The model folders of one process, by kind (checkpoints, loras, vae, embeddings).

    Earlier folders win when two hold the same relative name. Listing reads each file's header once
    (cached by path, size and mtime); resolving is a dict lookup over a folder scan.
    """

    def __init__(self, folders_by_kind: Mapping[str, Sequence[str | os.PathLike[str]]], *,
                 hash_cache_dir: str | os.PathLike[str] | None = None) -> None:
        unknown = set(folders_by_kind) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown model kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self._folders: dict[str, tuple[Path, ...]] = {
            kind: tuple(Path(p).expanduser() for p in folders_by_kind.get(kind, ())) for kind in KINDS}
        self._hash_cache_dir = Path(hash_cache_dir) if hash_cache_dir is not None else None
        self._lock = threading.Lock()
        self._scans: dict[str, list[_Found]] = {}
        self._entry_cache: dict[tuple[str, int, int], ModelEntry] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        return cls({kind: settings.search_dirs(kind) for kind in KINDS},  # type: ignore[arg-type]
                   hash_cache_dir=settings.data_dir / "cache")

    def sha256(self, path: str | os.PathLike[str]) -> str | None:
        """The sha256 of a model file (cached, see :func:`sha256_file`); None for a diffusers folder."""
        return None if Path(path).is_dir() else sha256_file(path, cache_dir=self._hash_cache_dir)

    def hash10(self, kind: ModelKind, name: str) -> str:
        """The first 10 hex digits of the sha256 of ``name`` of ``kind`` (what image metadata records for
        a LoRA or model file; cached like :meth:`sha256`), "" for a diffusers folder."""
        return (self.sha256(self.resolve(kind, name)) or "")[:10]

    def folders(self, kind: ModelKind) -> tuple[Path, ...]:
        return self._folders[_check_kind(kind)]

    # -- listing ---------------------------------------------------------------------------------

    def list(self, kind: ModelKind) -> list[ModelEntry]:
        """Every ``.safetensors`` file (and diffusers folder) of ``kind``, usable or not, by name."""
        found = self._scan(_check_kind(kind), refresh=True)
        return [self._entry(kind, item) for item in found]

    def names(self, kind: ModelKind) -> list[str]:
        """Names of the usable entries of ``kind``."""
        return [entry.name for entry in self.list(kind) if entry.usable]

    def _entry(self, kind: str, item: _Found) -> ModelEntry:
        try:
            stat = item.path.stat()
        except OSError:
            return ModelEntry(item.name, item.path, 0, False, "cannot be read")
        cache_key = (str(item.path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._entry_cache.get(cache_key)
        if cached is not None and cached.name == item.name:
            return cached
        entry = self._folder_entry(item) if item.is_folder else self._file_entry(kind, item, stat.st_size)
        with self._lock:
            self._entry_cache[cache_key] = entry
        return entry

    @staticmethod
    def _file_entry(kind: str, item: _Found, size: int) -> ModelEntry:
        try:
            info = check_weight_file(item.path)
        except HooocusError as exc:
            return ModelEntry(item.name, item.path, size, False, exc.message)
        if kind != "checkpoints":
            return ModelEntry(item.name, item.path, size, True)
        arch = detect_checkpoint_kind(info.tensors)
        if arch in ("sdxl_base", "sdxl_refiner"):
            return ModelEntry(item.name, item.path, size, True, None, arch)
        flux = classify_keys(info.tensors)
        if flux.family == "flux":  # issue 17: say what it is rather than "unrecognised"
            return ModelEntry(item.name, item.path, size, False, _flux_reason(flux.variant), f"flux_{flux.variant}")
        reason = ("an SD 1.5 checkpoint; only SDXL models are supported" if arch == "sd15"
                  else "not an SDXL checkpoint (unrecognised tensor names)")
        return ModelEntry(item.name, item.path, size, False, reason, arch)

    @staticmethod
    def _folder_entry(item: _Found) -> ModelEntry:
        size = sum(p.stat().st_size for p in item.path.rglob("*") if p.is_file())
        try:
            index = json.loads((item.path / "model_index.json").read_text(encoding="utf-8"))
            if not isinstance(index, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            return ModelEntry(item.name, item.path, size, False, "model_index.json is not valid JSON")
        if str(index.get("_class_name", "")).startswith("Flux"):
            try:
                variant = inspect_weights(item.path).variant
            except HooocusError as exc:
                return ModelEntry(item.name, item.path, size, False, exc.message)
            return ModelEntry(item.name, item.path, size, False, _flux_reason(variant), f"flux_{variant}")
        if not any((item.path / "unet").glob("*.safetensors")):
            return ModelEntry(item.name, item.path, size, False, "no unet/*.safetensors weights")
        arch = "sdxl_base" if has_component(index, "text_encoder") else "sdxl_refiner"
        return ModelEntry(item.name, item.path, size, True, None, arch)

    # -- resolving -------------------------------------------------------------------------------

    def resolve(self, kind: ModelKind, name: str) -> Path:
        """The path for a client-given ``name``: a relative path inside a folder, a file name, or a
        stem (without ``.safetensors``), in that order of preference; ambiguous short forms miss.

        Raises :class:`UnknownModel` (:class:`UnknownLora` for loras) for anything else.
        """
        _check_kind(kind)
        if is_plain_name(name):
            for refresh in (False, True):  # a cache miss rescans once, so new files are found
                found = _lookup(self._scan(kind, refresh=refresh), name)
                if found is not None and _still_inside(found):
                    return found.path
        raise self.unknown(kind, name)

    def unknown(self, kind: str, name: object) -> HooocusError:
        """The one error for a name that does not resolve (same text whatever the reason)."""
        names = self.names(kind)  # type: ignore[arg-type]
        if kind == "checkpoints":  # the built-in models always load, so a new user learns they exist
            names = [*names, DEMO_MODEL, DEMO_REFINER]
        listed = ", ".join(names[:MAX_LISTED_NAMES]) or "(none)"
        if len(names) > MAX_LISTED_NAMES:
            listed += f", ... ({len(names) - MAX_LISTED_NAMES} more)"
        shown = repr(name[:100]) if isinstance(name, str) else repr(type(name).__name__)
        if kind == "loras":
            return UnknownLora(f"unknown LoRA {shown}; available: {listed}")
        return UnknownModel(f"unknown model {shown}; available: {listed}")

    # -- scanning --------------------------------------------------------------------------------

    def _scan(self, kind: str, *, refresh: bool) -> list[_Found]:
        with self._lock:
            if not refresh and kind in self._scans:
                return self._scans[kind]
        found: dict[str, _Found] = {}
        for folder in self._folders[kind]:
            for item in _scan_folder(folder, diffusers_folders=kind == "checkpoints"):
                found.setdefault(item.name, item)
        result = sorted(found.values(), key=lambda item: (item.name.lower(), item.name))
        with self._lock:
            self._scans[kind] = result
        return result


def registry_from_settings(settings: Settings) -> ModelRegistry:
    """The registry over ``settings``' model folders (our own first, then the configured ones)."""
    return ModelRegistry.from_settings(settings)


def has_component(model_index: Mapping[str, object], component: str) -> bool:
    """True when a diffusers ``model_index.json`` names a class for ``component`` (not null)."""
    value = model_index.get(component)
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def _scan_folder(folder: Path, *, diffusers_folders: bool) -> list[_Found]:
    try:
        root = folder.resolve(strict=True)
    except OSError:
        return []
    if not root.is_dir():
        return []
    out: list[_Found] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if diffusers_folders and here != root and "model_index.json" in filenames:
            dirnames[:] = []  # a diffusers model folder is one entry; its weights are not listed one by one
            out.append(_Found(here.relative_to(root).as_posix(), here, root, True))
            continue
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.lower().endswith(SAFETENSORS_SUFFIX):
                continue
            path = here / filename
            found = _Found(path.relative_to(root).as_posix(), path, root, False)
            if _still_inside(found):
                out.append(found)
            else:
                log.warning("skipping %s: it is a symlink that points outside %s", path, root)
    return out


def _still_inside(found: _Found) -> bool:
    """The target exists and (after following symlinks) lies inside its folder."""
    try:
        real = found.path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real.is_relative_to(found.root) and (real.is_dir() if found.is_folder else real.is_file())


def _lookup(found: list[_Found], name: str) -> _Found | None:
    """Tiers, best first: the relative name, it without ``.safetensors``, the file name, the file
    name's stem. The first tier with any match decides; two matches in it mean no match."""
    tiers = (
        lambda item: item.name,
        lambda item: _strip_suffix(item.name),
        lambda item: item.name.rsplit("/", 1)[-1],
        lambda item: _strip_suffix(item.name.rsplit("/", 1)[-1]),
    )
    for form in tiers:
        matches = [item for item in found if form(item) == name]
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None


def _strip_suffix(name: str) -> str:
    return name[: -len(SAFETENSORS_SUFFIX)] if name.lower().endswith(SAFETENSORS_SUFFIX) else name


__all__ = ["KINDS", "CheckpointKind", "ModelEntry", "ModelKind", "ModelRegistry", "detect_checkpoint_kind",
           "has_component", "is_plain_name", "registry_from_settings"]
