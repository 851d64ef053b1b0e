"""Pinned downloads and the pickle conversion.

Every transfer has timeouts, resumes from a ``*.part`` file with an HTTP Range request, shows a tqdm
bar, and is checked against its pinned sha256 before it is renamed into place (a mismatch deletes the
part). A pickle is converted to safetensors only after its sha256 equals the pin, unpickled from the
hashed bytes with ``torch.load(weights_only=True)``; an unpinned pickle is never opened.

httpx, tqdm and torch are imported when used.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from engine.core.errors import HooocusError, ModelInvalid, UnsafeFile
from engine.core.formats import file_sha256


class ChecksumMismatch(ModelInvalid):
    """Downloaded bytes do not have the pinned sha256 (the part file has been deleted)."""


class _Unreachable(Exception):
    """The server could not be reached at all (no connection)."""


# -- transfer ----------------------------------------------------------------------------------------


def _http_client(timeout_s: float) -> Any:
    """One client for a whole set-up run: redirects followed (Hugging Face -> CDN), every phase timed out."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 15.0)), follow_redirects=True,
                        headers={"User-Agent": "hooocus-setup"})


def _transfer_once(client: Any, url: str, part: Path, *, size_bytes: int | None, desc: str, progress: bool) -> None:
    """One GET into ``part``, continuing it with a Range request when it already has bytes."""
    import httpx
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if size_bytes is not None and offset >= size_bytes:
        if offset == size_bytes:
            return  # complete already; the checksum decides
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 and offset:  # our part is not a prefix of theirs
                part.unlink()
                raise httpx.ReadError("range not satisfiable; starting again")
            if response.status_code not in (200, 206):
                raise HooocusError(f"HTTP {response.status_code} for {url}", code="assets_missing")
            if response.status_code == 206 and not response.headers.get("content-range", "").startswith(
                    f"bytes {offset}-"):
                part.unlink(missing_ok=True)
                raise httpx.ReadError("unexpected Content-Range; starting again")
            if response.status_code == 200:
                offset = 0  # the server ignored the Range header and sends the whole file
            length = response.headers.get("content-length")
            total = size_bytes or (offset + int(length) if length and length.isdigit() else None)
            with open(part, "ab" if offset else "wb") as handle, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                    disable=not progress, leave=False, file=sys.stderr) as bar:
                for chunk in response.iter_bytes():  # as it arrives: a broken transfer keeps its bytes
                    handle.write(chunk)
                    bar.update(len(chunk))
                    offset += len(chunk)
                    if size_bytes is not None and offset > size_bytes:
                        break  # more than the pinned file: the checksum will fail
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None


def download_file(url: str, dest: Path, *, sha256: str | None, size_bytes: int | None = None,
                  client: Any = None, timeout_s: float = 30.0, retries: int = 3, progress: bool = True,
                  desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it; verify; rename into place.

    A broken transfer is resumed up to ``retries`` times in this call (the part file stays for a
    later run). A sha256 other than the pinned one deletes the part and raises ChecksumMismatch.
    """
    import httpx

    own_client = client is None
    if own_client:
        client = _http_client(timeout_s)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                _transfer_once(client, url, part, size_bytes=size_bytes, desc=desc or dest.name, progress=progress)
                break
            except httpx.TransportError as exc:  # read error, timeout, peer closed mid-body
                if attempt == retries:
                    raise HooocusError(f"download of {url} interrupted ({exc or type(exc).__name__}); "
                                       f"run set-up again to resume from {part}", code="assets_missing") from None
    finally:
        if own_client:
            client.close()
    digest = file_sha256(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumMismatch(f"{dest.name}: sha256 {digest} does not match the pinned {sha256}; "
                               "the download was deleted")
    if dest.is_symlink():
        dest.unlink()
    os.replace(part, dest)
    return dest


# -- the pickle conversion -----------------------------------------------------------------------------


def convert_pickle_to_safetensors(source: Path, dest: Path, *, expected_sha256: str | None,
                                  kind: str = "pickle_to_safetensors") -> Path:
    """Convert a pickled tensor state dict to safetensors, only if its sha256 is the pinned one.

    The bytes are read once, hashed, and unpickled from memory with ``weights_only=True`` (tensors
    and plain containers only), so the file that was checked is the file that is read. An unpinned
    or mismatching file is never unpickled. Tied tensors are copied (safetensors stores no aliases).
    ``kind`` "fooocus_patch_to_safetensors" flattens ``{key: (w_uint8, min, max)}`` into
    ``<key>::w`` / ``<key>::min`` / ``<key>::max`` (the layout the inpaint patch loader reads);
    "nested_pickle_to_safetensors" flattens ``{part: {name: tensor}}`` into ``part.name`` (the
    IP-Adapter's ``image_proj`` / ``ip_adapter`` halves, the flat layout its loader reads).
    """
    if expected_sha256 is None:
        raise UnsafeFile(f"{source.name} is a pickle without a pinned sha256; refusing to open it")
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise UnsafeFile(f"{source.name}: sha256 {digest} is not the pinned {expected_sha256}; not opened")
    import io

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refused something that is not a tensor
        raise UnsafeFile(f"{source.name} is not a plain tensor state dict: {exc}") from None
    if kind == "fooocus_patch_to_safetensors":
        state = _flatten_fooocus_patch(state, source.name)
    elif kind == "nested_pickle_to_safetensors":
        state = _flatten_nested(state, source.name)
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ModelInvalid(f"{source.name} does not hold a state dict of named tensors")
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": source.name, "source_sha256": digest})
    os.replace(tmp, dest)
    return dest



#: Separator and part names of the safetensors form of a ``.fooocus.patch`` (the loader's contract:
#: engine.sdxl.models.inpaint.PATCH_KEY_SEPARATOR; not imported, io stays below the model family).
_PATCH_SEPARATOR = "::"
_PATCH_PARTS = ("w", "min", "max")


def _flatten_nested(state: Any, file_name: str) -> dict[str, Any]:
    """``{part: {name: tensor}}`` -> ``{part.name: tensor}``; anything else is ModelInvalid."""
    import torch

    if not isinstance(state, dict) or not state:
        raise ModelInvalid(f"{file_name} is not a dict of state dicts")
    flat: dict[str, Any] = {}
    for part, inner in state.items():
        if not (isinstance(part, str) and isinstance(inner, dict) and inner):
            raise ModelInvalid(f"{file_name}: entry {part!r} is not a state dict")
        for name, tensor in inner.items():
            if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
                raise ModelInvalid(f"{file_name}: {part}.{name!r} is not a named tensor")
            flat[f"{part}.{name}"] = tensor
    return flat


def _flatten_fooocus_patch(state: Any, file_name: str) -> dict[str, Any]:
    """``{key: (w_uint8, min, max)}`` -> ``{key::w, key::min, key::max}``; anything else is ModelInvalid."""
    import torch

    if not isinstance(state, dict) or not state:
        raise ModelInvalid(f"{file_name} is not a fooocus patch (expected a dict of (w, min, max) tuples)")
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, (tuple, list)) and len(value) == len(_PATCH_PARTS)
                and all(isinstance(t, torch.Tensor) for t in value)):
            raise ModelInvalid(f"{file_name}: entry {key!r} is not a (w, min, max) tensor triple")
        if value[0].dtype != torch.uint8:
            raise ModelInvalid(f"{file_name}: entry {key!r} has w of dtype {value[0].dtype}, expected uint8")
        for part, tensor in zip(_PATCH_PARTS, value, strict=True):
            flat[f"{key}{_PATCH_SEPARATOR}{part}"] = tensor
    return flat
