"""Encode finished images with their generation parameters, and read the parameters back.

Where the text goes is Fooocus's layout (spec §13.4), so Fooocus reads our files and we read its:

- PNG: tEXt chunks ``parameters`` (the string) and ``fooocus_scheme`` (``fooocus``/``a1111``);
- JPEG (quality 95, optimize, progressive) and WEBP (quality 95, lossy): an EXIF block in IFD0 with
  0x9286 UserComment = the string, 0x0131 Software, 0x927C MakerNote = the scheme.

Fooocus reads only 0x9286 and 0x927C back (spec §13.6 step 1); 0x0131 is informational, so we
write our own name there instead of claiming to be Fooocus. Bytes are deterministic for the same
input: no timestamps, fixed PNG compression level, the EXIF block built here byte by byte.

Reading also accepts A1111's own files: a PNG ``parameters`` chunk without a scheme, and a JPEG
UserComment in the Exif sub-IFD with its 8-byte character-code prefix.
"""

from __future__ import annotations

import io
import struct
from functools import lru_cache

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from engine.core.errors import InvalidRequest

__all__ = ["JPEG_QUALITY", "PNG_COMPRESS_LEVEL", "WEBP_QUALITY", "encode_image", "exif_block", "hooocus_version",
           "read_image_metadata", "software_string"]

JPEG_QUALITY = 95  # spec §13.4
WEBP_QUALITY = 95  # spec §13.4
#: zlib level 6 is Pillow's (and so Fooocus's) default; fixed here so the bytes never drift.
PNG_COMPRESS_LEVEL = 6
#: A JPEG APP1 segment holds at most 65533 bytes after its length field.
_JPEG_MAX_EXIF_BYTES = 65533

_TAG_SOFTWARE = 0x0131
_TAG_MAKER_NOTE = 0x927C
_TAG_USER_COMMENT = 0x9286
_TAG_EXIF_IFD = 0x8769
_SCHEMES = ("fooocus", "a1111")


@lru_cache(maxsize=1)
def hooocus_version() -> str | None:
    """The installed distribution's version (read when first asked, never at import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hooocus")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return None


def software_string() -> str:
    """'Hooocus <version>' for EXIF 0x0131."""
    found = hooocus_version()
    return f"Hooocus {found}" if found else "Hooocus"


def exif_block(entries: dict[int, str]) -> bytes:
    """A big-endian TIFF header plus one IFD of ASCII entries, laid out exactly as Pillow lays out
    Fooocus's EXIF (entries sorted by tag, values after the IFD, each padded to an even length).

    Text is written as UTF-8. For ASCII text that is the EXIF ASCII type byte for byte; for other
    text it keeps every character where Pillow would write '?' (Fooocus loses them; we do not).
    """
    values = [(tag, text.encode("utf-8") + b"\0") for tag, text in sorted(entries.items())]
    ifd_size = 2 + 12 * len(values) + 4
    data_offset = 8 + ifd_size
    ifd = bytearray(struct.pack(">H", len(values)))
    data = bytearray()
    for tag, raw in values:
        if len(raw) <= 4:
            ifd += struct.pack(">HHL", tag, 2, len(raw)) + raw.ljust(4, b"\0")
            continue
        ifd += struct.pack(">HHLL", tag, 2, len(raw), data_offset + len(data))
        data += raw + (b"\0" if len(raw) % 2 else b"")
    ifd += struct.pack(">L", 0)  # no next IFD
    return b"MM\x00\x2a" + struct.pack(">L", 8) + bytes(ifd) + bytes(data)


def encode_image(rgb: np.ndarray, *, fmt: str, parameters: str | None = None, scheme: str | None = None,
                 software: str | None = None) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 image as png/jpeg/webp with the parameters embedded.

    ``parameters`` None writes no metadata at all. ``scheme`` None leaves the scheme out (a reader
    then tells the schemes apart by content). ``software`` overrides the EXIF Software string.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError("encode_image needs an [H, W, 3] uint8 array")
    if scheme is not None and scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES} or None, got {scheme!r}")
    image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    out = io.BytesIO()
    if fmt == "png":
        info = None
        if parameters is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", parameters)  # tEXt, or iTXt when not Latin-1
            if scheme is not None:
                info.add_text("fooocus_scheme", scheme)
        image.save(out, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        return out.getvalue()
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"fmt must be png, jpeg or webp, got {fmt!r}")
    extra = {}
    if parameters is not None:
        entries = {_TAG_USER_COMMENT: parameters, _TAG_SOFTWARE: software or software_string()}
        if scheme is not None:
            entries[_TAG_MAKER_NOTE] = scheme
        tiff = exif_block(entries)
        if fmt == "jpeg" and len(tiff) + 6 > _JPEG_MAX_EXIF_BYTES:
            raise InvalidRequest(f"the parameters ({len(tiff)} bytes) do not fit in a JPEG EXIF block "
                                 f"({_JPEG_MAX_EXIF_BYTES} bytes); use png or webp", loc=("output_format",))
        # JPEG carries the APP1 "Exif\0\0" header; Pillow's WEBP writer wants the bare TIFF bytes.
        extra["exif"] = b"Exif\x00\x00" + tiff if fmt == "jpeg" else tiff
    if fmt == "jpeg":
        image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True, **extra)
    else:
        image.save(out, format="WEBP", quality=WEBP_QUALITY, lossless=False, **extra)
    return out.getvalue()


def _exif_text(value: object) -> str | None:
    """An IFD value as text. Pillow decodes ASCII entries as Latin-1; undo that to read UTF-8."""
    if isinstance(value, bytes):
        return _user_comment_text(value)
    if not isinstance(value, str):
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _user_comment_text(raw: bytes) -> str | None:
    """EXIF UserComment with its 8-byte character code (A1111 writes 'UNICODE' + UTF-16)."""
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        return body.decode("utf-16-be", errors="replace")
    if code in (b"ASCII\0\0\0", b"\0" * 8):
        return body.rstrip(b"\0").decode("utf-8", errors="replace")
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def read_image_metadata(data: bytes) -> tuple[str | None, str | None]:
    """``(parameters, scheme)`` stored in a PNG/JPEG/WEBP file; ``(None, None)`` when it has none.

    The scheme is ``'fooocus'``, ``'a1111'`` or None (unknown: spec §13.6 says a JSON object means
    fooocus and plain text a1111; :func:`engine.io.metadata.parse_parameters` applies that rule).
    Pixels are never decoded. Bytes that are not an image raise ``InvalidRequest``.
    """
    try:
        image = Image.open(io.BytesIO(data))
        parameters = scheme = None
        if image.format == "PNG":
            info = image.info
            if "parameters" not in info:  # text after the pixel data: .text reads the whole file
                info = {**info, **image.text}
            text = info.get("parameters")
            parameters = text if isinstance(text, str) else None
            scheme = info.get("fooocus_scheme")
        else:
            exif = image.getexif()
            parameters = _exif_text(exif.get(_TAG_USER_COMMENT))
            scheme = _exif_text(exif.get(_TAG_MAKER_NOTE))
            if parameters is None:  # A1111 and most cameras: UserComment in the Exif sub-IFD
                parameters = _exif_text(exif.get_ifd(_TAG_EXIF_IFD).get(_TAG_USER_COMMENT))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"cannot read image metadata: {exc}") from None
    if not parameters:
        return None, None
    return parameters, scheme if scheme in _SCHEMES else None
