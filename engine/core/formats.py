"""The one table of image file formats: name ↔ MIME type ↔ file extension ↔ Pillow format, and the
one whole-file sha256. Every front door and the engine use these (issue 13.6: no second copy)."""

from __future__ import annotations

import hashlib
import os

#: Output/preview format name -> MIME type. The names are ``OutputFormat`` and the file extensions.
MIME_BY_FORMAT: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMAT_BY_MIME: dict[str, str] = {mime: fmt for fmt, mime in MIME_BY_FORMAT.items()}
#: Format name -> Pillow's ``Image.save(format=...)``.
PIL_FORMAT: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: Extension spellings that name a format by another name.
_EXTENSION_ALIASES: dict[str, str] = {"jpg": "jpeg"}
#: Extension for bytes of a type not in the table.
UNKNOWN_EXTENSION = "bin"


def extension_for_mime(mime: str) -> str:
    return FORMAT_BY_MIME.get(mime, UNKNOWN_EXTENSION)


def format_for_extension(extension: str) -> str:
    """'JPG' / '.jpg' -> 'jpeg'; an extension not in the table comes back lower-cased."""
    ext = extension.lower().lstrip(".")
    return _EXTENSION_ALIASES.get(ext, ext)


def mime_for_extension(extension: str) -> str | None:
    return MIME_BY_FORMAT.get(format_for_extension(extension))


def extensions_for_mime(mime: str) -> tuple[str, ...]:
    """Every extension a file of this type may carry (canonical first): 'image/jpeg' -> ('jpeg', 'jpg')."""
    fmt = FORMAT_BY_MIME.get(mime)
    if fmt is None:
        return ()
    return (fmt, *(alias for alias, target in _EXTENSION_ALIASES.items() if target == fmt))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a whole file, read in chunks (model files are gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
