"""Writing finished images to disk the way Fooocus lays them out (one folder per day), and pruning
them by total size or age when the user sets a limit (settings ``output_max_bytes``,
``output_max_age_days``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.events import ImageReady


def output_path(out_dir: Path, image: ImageReady, *, now: dt.datetime | None = None) -> Path:
    """``out_dir/YYYY-MM-DD/YYYY-MM-DD_HH-MM-SS_<seed>_<index>.<ext>`` (Fooocus uses a random suffix;
    the seed and index make ours unique within a job and easy to find again)."""
    now = now or dt.datetime.now()
    day = out_dir / now.strftime("%Y-%m-%d")
    stem = f"{now.strftime('%Y-%m-%d_%H-%M-%S')}_{image.seed}_{image.index}"
    path = day / f"{stem}.{image.extension}"
    counter = 1
    while path.exists():
        path = day / f"{stem}-{counter}.{image.extension}"
        counter += 1
    return path


def write_image(out_dir: Path, image: ImageReady, *, now: dt.datetime | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half an image."""
    path = output_path(out_dir, image, now=now)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(image.data)
    tmp.replace(path)
    return path


# -- retention ---------------------------------------------------------------------------------
# Only files that write_image() produced are ever deleted: a "YYYY-MM-DD" folder directly under
# out_dir holding "YYYY-MM-DD_HH-MM-SS_<seed>_<index>[-n].<ext>" files whose first bytes are an
# image signature. Fooocus's own outputs ("..._<random>.png"), notes, temp files and anything
# reached through a symlink are left alone, so out_dir may safely be shared with other tools.

_DAY_DIR_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_OUR_IMAGE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+(?:-\d+)?\.(?:png|jpeg|webp)$")
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class _OutputFile:
    path: Path
    mtime_s: float
    size_bytes: int


def _looks_like_image(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _our_images(out_dir: Path) -> list[_OutputFile]:
    """Our image files under ``out_dir``, oldest first. Symlinks (files or folders) are skipped."""
    found: list[_OutputFile] = []
    try:
        days = [e for e in os.scandir(out_dir) if _DAY_DIR_RE.match(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:  # missing or not a folder: nothing of ours to prune
        return found
    for day in days:
        try:
            entries = list(os.scandir(day.path))
        except OSError:
            continue
        for entry in entries:
            if not (_OUR_IMAGE_RE.match(entry.name) and entry.is_file(follow_symlinks=False)):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found.append(_OutputFile(out_dir / day.name / entry.name, stat.st_mtime, stat.st_size))
    found.sort(key=lambda f: (f.mtime_s, f.path.name))
    return found


def _delete(path: Path, deleted: list[Path]) -> bool:
    """Unlink ``path`` if it really is an image (the name alone is not proof); record it."""
    if not _looks_like_image(path):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    deleted.append(path)
    return True


def prune_outputs(out_dir: Path, *, max_bytes: int | None = None, max_age_days: float | None = None,
                  now: dt.datetime | None = None) -> list[Path]:
    """Delete our oldest images until none is older than ``max_age_days`` and the rest total at
    most ``max_bytes``. Returns the deleted paths, oldest first. ``None`` limits are off.

    Age is the file's modification time. Day folders left empty are removed. Cost: one directory
    scan of ``out_dir`` per call.
    """
    if max_bytes is None and max_age_days is None:
        return []
    now_s = (now or dt.datetime.now()).timestamp()
    cutoff_s = None if max_age_days is None else now_s - max_age_days * _SECONDS_PER_DAY
    deleted: list[Path] = []
    kept: list[_OutputFile] = []
    for f in _our_images(out_dir):
        if cutoff_s is not None and f.mtime_s < cutoff_s and _delete(f.path, deleted):
            continue
        kept.append(f)
    if max_bytes is not None:
        total_bytes = sum(f.size_bytes for f in kept)
        for f in kept:  # oldest first
            if total_bytes <= max_bytes:
                break
            if _delete(f.path, deleted):
                total_bytes -= f.size_bytes
    for day in {p.parent for p in deleted}:
        with contextlib.suppress(OSError):
            day.rmdir()  # only succeeds when empty
    return deleted
