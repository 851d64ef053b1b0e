"""What is installed, and installing it: the plan (present / partial / missing / mismatch) and
the set-up run (link from a local install, take a file placed by hand, else download; convert pickles).

Offline, set-up names every missing file, its URL and where to put it by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from engine.core.errors import AssetsMissing, HooocusError
from engine.core.formats import file_sha256
from engine.io.setup import catalogue
from engine.io.setup.catalogue import _LICENCE_NC, DATA_LAYOUT, EXPANSION_LICENCE_NOTICE, Asset, select_assets
from engine.io.setup.download import _http_client, _Unreachable, convert_pickle_to_safetensors, download_file

#: Files up to this size are re-hashed whenever the plan looks at them; bigger ones only with --verify.
_ALWAYS_HASH_BYTES = 64 << 20

State = Literal["present", "missing", "partial", "mismatch"]


@dataclass(frozen=True)
class AssetStatus:
    asset: Asset
    path: Path
    state: State
    #: Bytes already in the ``.part`` file (state "partial").
    bytes_present: int = 0
    detail: str = ""



def _choose(assets: Iterable[Asset] | None, only: Sequence[str] | None) -> list[Asset]:
    """``assets`` as given (filtered by ``only``), or the default selection from ALL_ASSETS."""
    if assets is None:
        return select_assets(catalogue.ALL_ASSETS, only)
    return select_assets(assets, only, include_optional=True)


def _converted_source_sha256(path: Path) -> str | None:
    """The ``source_sha256`` recorded in a safetensors header (read without torch)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                return None
            header = json.loads(handle.read(length))
        return header.get("__metadata__", {}).get("source_sha256")
    except (OSError, ValueError, struct.error, AttributeError):
        return None


def _status(asset: Asset, data_dir: Path, *, verify: bool) -> AssetStatus:
    path = data_dir / asset.dest
    if path.is_file():
        if asset.convert is not None:
            if _converted_source_sha256(path) == asset.sha256:
                return AssetStatus(asset, path, "present")
            return AssetStatus(asset, path, "mismatch", detail="not converted from the pinned file")
        size = path.stat().st_size
        if asset.size_bytes is not None and size != asset.size_bytes:
            return AssetStatus(asset, path, "mismatch", detail=f"{size} bytes, expected {asset.size_bytes}")
        if asset.sha256 is not None and (verify or size <= _ALWAYS_HASH_BYTES):
            digest = file_sha256(path)
            if digest != asset.sha256:
                return AssetStatus(asset, path, "mismatch", detail=f"sha256 {digest}, pinned {asset.sha256}")
        return AssetStatus(asset, path, "present")
    download = asset.download_dest(data_dir)
    part = download.with_name(download.name + ".part")
    if part.is_file():
        return AssetStatus(asset, path, "partial", bytes_present=part.stat().st_size)
    return AssetStatus(asset, path, "missing")


def plan_setup(data_dir: Path, *, assets: Iterable[Asset] | None = None, only: Sequence[str] | None = None,
               verify: bool = False) -> list[AssetStatus]:
    """What is present, partly downloaded, missing or different from its pin under ``data_dir``."""
    chosen = _choose(assets, only)
    return [_status(a, Path(data_dir), verify=verify) for a in chosen]


# -- set-up -------------------------------------------------------------------------------------------


def _find_local(asset: Asset, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        for relative in asset.local_paths:
            candidate = Path(root) / relative
            if candidate.is_file():
                return candidate
    return None


def _link(source: Path, dest: Path) -> None:
    """Symlink ``dest`` -> ``source`` (no copy of a 7 GB file); copy where links are not allowed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.symlink(source.resolve(), dest)
    except OSError:
        shutil.copy2(source, dest)


def _unpinned_refusal(asset: Asset, source: Path) -> str:
    """Why an unpinned pickle was not converted, and how the user can pin it after checking it."""
    digest = file_sha256(source)
    return (f"{source.name} is a pickle with no published sha256 pin, so set-up did not open it. It is kept at "
            f"{source} (sha256 {digest}). Check that value against the sha256 the publisher shows for "
            f"{asset.url} (on Hugging Face: the file's page, 'SHA256'), then run set-up again with "
            f"--trust-sha256 {asset.name}={digest}")


def _manual_hint(asset: Asset, data_dir: Path) -> str:
    where = asset.download_dest(data_dir)
    pin = f" (sha256 {asset.sha256})" if asset.sha256 else ""
    then = "; set-up converts it on the next run" if asset.convert else ""
    return f"  {asset.name}\n      from {asset.url}\n      put it at {where}{pin}{then}"


def run_setup(data_dir: Path, *, assets: Iterable[Asset] | None = None, only: Sequence[str] | None = None,
              link_from: Sequence[Path] = (), timeout_s: float = 30.0, retries: int = 3, progress: bool = True,
              verify: bool = False, echo: Callable[[str], None] | None = None) -> list[AssetStatus]:
    """Install every selected asset that is not present yet; return the final statuses.

    Order per asset: a copy in one of ``link_from`` (verified, then linked or converted), a file
    placed by hand in downloads/ (for the pickle), else a download. Raises ``AssetsMissing`` at
    the end, naming every asset still missing, why, its URL and where to put it by hand.
    """
    echo = echo or (lambda message: print(message, file=sys.stderr))
    data_dir = Path(data_dir)
    chosen = _choose(assets, only)
    plan = plan_setup(data_dir, assets=chosen, verify=verify)
    todo = [s for s in plan if s.state != "present"]
    if any(s.asset.licence == _LICENCE_NC for s in todo):
        echo(EXPANSION_LICENCE_NOTICE)
    problems: dict[str, str] = {}
    #: host -> why it could not be reached; each host is tried once, and the message names the
    #: host that actually failed (files come from GitHub and Hugging Face, not one place).
    unreachable: dict[str, str] = {}
    client = _http_client(timeout_s)
    try:
        for status in todo:
            asset = status.asset
            if status.state == "mismatch":
                problems[asset.name] = (f"{status.path} exists but differs from the pinned file ({status.detail}); "
                                        "move it away to download the pinned one")
                continue
            try:
                source = _local_source(asset, data_dir, link_from, echo)
                if source is None:
                    host = urlsplit(asset.url).netloc
                    if host in unreachable:
                        problems[asset.name] = f"not downloaded: {unreachable[host]}"
                        continue
                    need = (asset.size_bytes or 0) - status.bytes_present
                    target = asset.download_dest(data_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if need > shutil.disk_usage(target.parent).free:
                        problems[asset.name] = f"not enough free disk space in {target.parent} ({need} bytes needed)"
                        continue
                    echo(f"downloading {asset.name} ({_human(asset.size_bytes)})")
                    source = download_file(asset.url, target, sha256=asset.sha256, size_bytes=asset.size_bytes,
                                           client=client, retries=retries, progress=progress, desc=asset.name)
                    if asset.sha256 is None and asset.convert is None:
                        echo(f"warning: {asset.name} has no pinned sha256; got {file_sha256(source)}")
                if asset.convert is not None and asset.sha256 is None:
                    # Never unpickle bytes nobody pinned: keep the download for the user to check.
                    problems[asset.name] = _unpinned_refusal(asset, source)
                    continue
                if asset.convert is not None:
                    echo(f"converting {source.name} to {asset.dest}")
                    convert_pickle_to_safetensors(source, data_dir / asset.dest, expected_sha256=asset.sha256,
                                                  kind=asset.convert)
                    if source.parent == data_dir / DATA_LAYOUT["downloads"]:
                        source.unlink()  # keep no pickle around once its tensors are safe
            except _Unreachable as exc:
                host = urlsplit(asset.url).netloc
                unreachable[host] = f"cannot reach {host} ({exc}); offline?"
                problems[asset.name] = f"not downloaded: {unreachable[host]}"
            except HooocusError as exc:
                problems[asset.name] = exc.message
    finally:
        client.close()
    final = plan_setup(data_dir, assets=chosen)
    missing = [s for s in final if s.state != "present"]
    if missing:
        lines = [f"{len(missing)} of {len(final)} set-up files are missing or wrong:"]
        for s in missing:
            lines.append(_manual_hint(s.asset, data_dir))
            if s.asset.name in problems:
                lines.append(f"      why: {problems[s.asset.name]}")
        raise AssetsMissing("\n".join(lines), details=[
            {"name": s.asset.name, "url": s.asset.url, "dest": str(s.asset.download_dest(data_dir)),
             "sha256": s.asset.sha256, "reason": problems.get(s.asset.name, s.state)} for s in missing])
    return final


def _local_source(asset: Asset, data_dir: Path, roots: Sequence[Path], echo: Callable[[str], None]) -> Path | None:
    """A verified local copy to use instead of downloading: linked into place (normal files) or
    returned for conversion (the pickle). None when there is none."""
    if asset.convert is not None:
        placed = asset.download_dest(data_dir)
        if placed.is_file():  # put there by hand, or a complete earlier download
            return placed
    found = _find_local(asset, roots)
    if found is None:
        return None
    if asset.sha256 is not None and file_sha256(found) != asset.sha256:
        echo(f"{found} differs from the pinned {asset.name}; downloading instead")
        return None
    if asset.convert is not None:
        return found
    _link(found, data_dir / asset.dest)
    echo(f"linked {asset.dest} -> {found}")
    return data_dir / asset.dest


def _human(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "size unknown"
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size_bytes} B"  # pragma: no cover

