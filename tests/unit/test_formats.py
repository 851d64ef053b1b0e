"""engine/core/formats.py: the one format table and the one file hash (issue 13.6)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from engine.core import formats
from engine.core.constants import OUTPUT_FORMATS
from engine.core.events import ImageReady
from engine.core.store import ImageStore


def test_every_output_format_has_a_mime_and_a_pillow_format_that_round_trip() -> None:
    assert set(formats.MIME_BY_FORMAT) == set(OUTPUT_FORMATS) == set(formats.PIL_FORMAT)
    for fmt in OUTPUT_FORMATS:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=formats.PIL_FORMAT[fmt])
        assert Image.open(io.BytesIO(buf.getvalue())).get_format_mimetype() == formats.MIME_BY_FORMAT[fmt]
        assert formats.extension_for_mime(formats.MIME_BY_FORMAT[fmt]) == fmt
    assert formats.extension_for_mime("application/pdf") == formats.UNKNOWN_EXTENSION


@pytest.mark.parametrize(("ext", "fmt", "mime"), [("JPG", "jpeg", "image/jpeg"), (".png", "png", "image/png"),
                                                  ("webp", "webp", "image/webp"), ("gif", "gif", None)])
def test_extension_spellings(ext: str, fmt: str, mime: str | None) -> None:
    assert formats.format_for_extension(ext) == fmt
    assert formats.mime_for_extension(ext) == mime


def test_store_reads_a_jpg_spelled_file_back_from_its_folder(tmp_path: Path) -> None:
    sha = "a" * 64
    (tmp_path / f"{sha}.jpg").write_bytes(b"\xff\xd8\xffdata")
    found = ImageStore(folder=tmp_path).get(sha)
    assert found is not None and (found.mime, found.extension) == ("image/jpeg", "jpeg")
    assert ImageReady(job_id="j", mime="image/webp").extension == "webp"


def test_file_sha256_matches_hashlib_on_more_than_one_chunk(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB: several reads
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert formats.file_sha256(path) == hashlib.sha256(data).hexdigest()
