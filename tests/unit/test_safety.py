"""Weight-file safety (reliability matrix rows 20-21): corrupt files and pickles are refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.core.errors import HooocusError, ModelInvalid, UnsafeFile
from engine.io.safety import (
    HASH_CACHE_FILE,
    check_weight_file,
    open_safetensors_checked,
    sha256_file,
    short_hash,
)


class TouchOnUnpickle:
    """A pickle payload: unpickling it creates ``path`` (as a malicious checkpoint would run code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def write_valid(path: Path) -> Path:
    save_file({"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b.bias": torch.ones(5, dtype=torch.float16)}, str(path), metadata={"format": "pt"})
    return path


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes, *, pad_to: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    if pad_to is not None:
        text += b" " * (pad_to - len(text))
    return struct.pack("<Q", len(text)) + text + data


def corrupt_variants(valid: bytes) -> dict[str, bytes]:
    header, data = split(valid)
    n = struct.unpack("<Q", valid[:8])[0]
    bad_offsets = json.loads(json.dumps(header))
    bad_offsets["a.weight"]["data_offsets"][1] += 4  # overlaps the next tensor / runs past the data
    bad_json = bytearray(valid)
    bad_json[8] = ord("[")  # the header no longer parses as a JSON object
    bad_json[9:12] = b"#!~"
    return {
        "truncated": valid[:-7],
        "bad_header_json": bytes(bad_json),
        "header_len_2^40": struct.pack("<Q", 2**40) + valid[8:],
        "bad_offsets": join(bad_offsets, data, pad_to=n),
        "garbage": bytes((i * 131 + 7) % 251 for i in range(4096)),
        "empty": b"",
    }


def test_valid_file_header_is_read(tmp_path: Path) -> None:
    info = check_weight_file(write_valid(tmp_path / "ok.safetensors"))
    assert set(info.keys) == {"a.weight", "b.bias"}
    assert info.tensors["a.weight"].shape == (3, 4) and info.tensors["a.weight"].dtype == "F32"
    assert info.tensors["b.bias"].numel == 5
    assert info.metadata == {"format": "pt"}
    with open_safetensors_checked(info.path) as handle:
        assert torch.equal(handle.get_tensor("a.weight"), torch.arange(12, dtype=torch.float32).reshape(3, 4))


@pytest.mark.parametrize("variant", ["truncated", "bad_header_json", "header_len_2^40", "bad_offsets", "garbage",
                                     "empty"])
def test_corrupt_files_are_model_invalid(tmp_path: Path, variant: str) -> None:
    valid = write_valid(tmp_path / "ok.safetensors").read_bytes()
    path = tmp_path / f"{variant}.safetensors"
    path.write_bytes(corrupt_variants(valid)[variant])
    # The library agrees the file is broken (so the variant really is corrupt) ...
    with pytest.raises(SafetensorError):
        with safe_open(str(path), framework="pt") as handle:
            [handle.get_tensor(k) for k in handle.keys()]
    # ... and we say so with a clear error before the library ever sees it.
    with pytest.raises(ModelInvalid) as err:
        check_weight_file(path)
    assert path.name in err.value.message
    with pytest.raises(ModelInvalid):
        open_safetensors_checked(path)


def test_header_length_that_looks_like_a_pickle_opcode_is_still_accepted(tmp_path: Path) -> None:
    """A header of 0x280 bytes starts with 0x80 0x02, the pickle protocol-2 marker."""
    header, data = split(write_valid(tmp_path / "ok.safetensors").read_bytes())
    path = tmp_path / "odd.safetensors"
    path.write_bytes(join(header, data, pad_to=0x280))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert set(check_weight_file(path).keys) == {"a.weight", "b.bias"}


def test_payload_is_live(tmp_path: Path) -> None:
    """Sanity: the payload used below really creates its marker when unpickled."""
    marker = tmp_path / "sanity-marker"
    pickle.loads(pickle.dumps(TouchOnUnpickle(marker)))
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth", ".CKPT"])
def test_pickle_suffixes_are_refused_unread(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    with pytest.raises(UnsafeFile):
        check_weight_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_renamed_safetensors_is_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": TouchOnUnpickle(marker)}, protocol=protocol))
    with pytest.raises(UnsafeFile):
        check_weight_file(path)
    with pytest.raises(UnsafeFile):
        open_safetensors_checked(path)
    assert not marker.exists()


def test_torch_zip_renamed_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(UnsafeFile):
        check_weight_file(path)


def test_other_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelInvalid):
        check_weight_file(tmp_path / "model.gguf")
    with pytest.raises(ModelInvalid):
        check_weight_file(tmp_path / "missing.safetensors")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_our_errors(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    try:
        check_weight_file(path)
    except HooocusError as exc:
        assert exc.code in ("model_invalid", "unsafe_file")


def test_sha256_and_its_cache(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"hello world" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    cache_dir = tmp_path / "cache"
    assert sha256_file(path, cache_dir=cache_dir) == expected
    cache = json.loads((cache_dir / HASH_CACHE_FILE).read_text())
    assert cache[os.path.realpath(path)]["sha256"] == expected
    # While size and mtime are unchanged the cached value is used (planted to prove it) ...
    cache[os.path.realpath(path)]["sha256"] = "f" * 64
    (cache_dir / HASH_CACHE_FILE).write_text(json.dumps(cache))
    assert sha256_file(path, cache_dir=cache_dir) == "f" * 64
    # ... and a changed file is hashed again.
    path.write_bytes(b"changed")
    assert sha256_file(path, cache_dir=cache_dir) == hashlib.sha256(b"changed").hexdigest()
    assert short_hash(expected) == expected[:10] and len(short_hash(expected)) == 10


def test_damaged_hash_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"abc")
    (tmp_path / HASH_CACHE_FILE).write_text("{not json")
    assert sha256_file(path, cache_dir=tmp_path) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads((tmp_path / HASH_CACHE_FILE).read_text())  # rewritten whole
