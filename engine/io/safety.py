"""Weight-file safety: only well-formed ``.safetensors`` files ever reach torch.

Reliability matrix rows 20-21 (house style, part B): a pickle checkpoint (``.ckpt/.pt/.bin/.pth``,
or a pickle renamed ``.safetensors``) is refused with :class:`UnsafeFile` and never unpickled; a
corrupt ``.safetensors`` file (truncated, bad header JSON, absurd header length, bad offsets,
garbage, empty) gives :class:`ModelInvalid` with a reason instead of a crash. The checks read the
first 8 bytes and the JSON header only, so listing a folder of 7 GB checkpoints stays cheap.

Also here: the sha256 of a model file with a small JSON cache (Fooocus keeps ``hash_cache.txt``,
spec §13.6 item 5) and the 10-hex-digit short hash Fooocus writes into metadata (spec §13.2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import ModelInvalid, UnsafeFile
from engine.core.formats import file_sha256

if TYPE_CHECKING:
    from safetensors import safe_open

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
#: Suffixes of pickle-based weight formats. Refused by name, whatever their content.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
#: safetensors itself caps the header at 100 MB; an SDXL checkpoint's header is about 200 kB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
SHORT_HASH_LEN = 10
HASH_CACHE_FILE = "sha256_cache.json"

#: Bytes per element of the safetensors dtypes we accept (sub-byte float formats are refused).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    #: Byte range inside the data section (after the 8-byte length and the header).
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsInfo:
    """What the header of a checked ``.safetensors`` file says; no tensor data is read."""

    path: Path
    size_bytes: int
    header_bytes: int
    tensors: Mapping[str, TensorInfo]
    #: The free-form ``__metadata__`` string map (empty when absent).
    metadata: Mapping[str, str]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.tensors)


def looks_like_pickle(prefix: bytes) -> bool:
    """True for a zip archive (torch's default save format wraps a pickle) or a pickle stream.

    Pickle protocols 2-5 start with the PROTO opcode 0x80 followed by the protocol number.
    """
    return prefix[:4] == b"PK\x03\x04" or (len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5)


def check_weight_file(path: str | os.PathLike[str]) -> SafetensorsInfo:
    """Check that ``path`` is a well-formed safetensors file and return its header.

    Raises :class:`UnsafeFile` for pickle formats (by suffix or by content) and
    :class:`ModelInvalid` for anything else that safetensors would reject. Never unpickles and
    never reads tensor data.
    """
    path = Path(path)
    label = path.name
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeFile(f"{label}: pickle-based weight files ({suffix}) are refused; only .safetensors "
                         "files are loaded (convert it with a trusted tool first)")
    if suffix != SAFETENSORS_SUFFIX:
        raise ModelInvalid(f"{label}: not a .safetensors file")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(9)
            header_len = struct.unpack("<Q", prefix[:8])[0] if len(prefix) >= 8 else -1
            # A real header is a JSON object of at least "{}" that fits in the file. Test that before
            # sniffing for pickle: a valid header length can start with 0x80 0x02..0x05 too.
            plausible = 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES) and prefix[8:9] == b"{"
            if not plausible:
                _raise_implausible(label, prefix, size, header_len)
            fh.seek(8)
            raw = fh.read(header_len)
    except OSError as exc:
        raise ModelInvalid(f"{label}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) != header_len:
        raise ModelInvalid(f"{label}: truncated header")
    tensors, metadata = _parse_header(label, raw, data_bytes=size - 8 - header_len)
    return SafetensorsInfo(path=path, size_bytes=size, header_bytes=header_len, tensors=tensors, metadata=metadata)


def _raise_implausible(label: str, prefix: bytes, size: int, header_len: int) -> None:
    if size == 0:
        raise ModelInvalid(f"{label}: empty file")
    if looks_like_pickle(prefix):
        raise UnsafeFile(f"{label}: this is a pickle/torch archive renamed .safetensors; it is refused "
                         "and was not loaded")
    if header_len < 0:
        raise ModelInvalid(f"{label}: truncated ({size} bytes)")
    if header_len > MAX_HEADER_BYTES:
        raise ModelInvalid(f"{label}: header length {header_len} bytes is implausible (limit {MAX_HEADER_BYTES})")
    if header_len > size - 8:
        raise ModelInvalid(f"{label}: truncated (header claims {header_len} bytes, file has {size})")
    raise ModelInvalid(f"{label}: not a safetensors file (no JSON header)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_header(label: str, raw: bytes, *, data_bytes: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelInvalid(f"{label}: header is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise ModelInvalid(f"{label}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ModelInvalid(f"{label}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(label, name, entry)
    # safetensors requires the tensors to tile the data section exactly: no gaps, no overlaps,
    # nothing after the last one (its own InvalidOffset / MetadataIncompleteBuffer checks).
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            raise ModelInvalid(f"{label}: bad data offsets at tensor {name!r}")
        position = info.end
    if position != data_bytes:
        raise ModelInvalid(f"{label}: data section is {data_bytes} bytes but the header describes {position} "
                           "(truncated or corrupt file)")
    return tensors, dict(metadata)


def _tensor_info(label: str, name: str, entry: Any) -> TensorInfo:
    bad = ModelInvalid(f"{label}: malformed header entry for tensor {name[:200]!r}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ModelInvalid(f"{label}: unsupported dtype {str(dtype)[:20]!r} for tensor {name[:200]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelInvalid(f"{label}: tensor {name[:200]!r} has {offsets[1] - offsets[0]} bytes, its shape "
                           f"{shape} and dtype {dtype} need {math.prod(shape) * DTYPE_BYTES[dtype]}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def open_safetensors_checked(path: str | os.PathLike[str], *, device: str = "cpu") -> safe_open:
    """Check ``path`` with :func:`check_weight_file`, then open it with ``safetensors.safe_open``.

    The handle reads tensors lazily (memory-mapped); use it as a context manager so the mapping is
    released when done. Tensor reads that fail later raise ``safetensors.SafetensorError``.
    """
    from safetensors import SafetensorError, safe_open

    check_weight_file(path)
    try:
        return safe_open(os.fspath(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ModelInvalid(f"{Path(path).name}: cannot be opened ({str(exc)[:200]})") from None


def short_hash(sha256_hex: str) -> str:
    """The first 10 hex digits, as Fooocus writes model and LoRA hashes into metadata (spec §13.2)."""
    return sha256_hex[:SHORT_HASH_LEN]


def sha256_file(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The sha256 (hex) of a whole file, remembered in ``cache_dir/sha256_cache.json``.

    A cache entry is keyed by the file's real path and is used only while its size and mtime are
    unchanged, so a replaced file is hashed again. The cache is rewritten atomically; a damaged cache
    is ignored. Concurrent writers may drop each other's new entries, never corrupt the file.
    """
    real = os.path.realpath(path)
    stat = os.stat(real)
    cache_path = Path(cache_dir) / HASH_CACHE_FILE if cache_dir is not None else None
    cache = _read_hash_cache(cache_path) if cache_path else {}
    entry = cache.get(real)
    if (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]
    digest = file_sha256(real)
    if cache_path is not None:
        cache = _read_hash_cache(cache_path)  # re-read: another process may have added entries meanwhile
        cache[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        _write_json_atomic(cache_path, cache)
    return digest


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable hash cache %s", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only cache folder must not break hashing
        log.warning("cannot write hash cache %s: %s", path, exc)
