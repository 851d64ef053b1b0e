"""Images coming in: references, uploads, and decoding with limits (issue 14).

A request names an input image (``input_image``, ``inpaint_mask``, ``inpaint_mask_upload``) by a
*reference* string, resolved once at submit time so a bad one fails before anything is queued:

- ``sha256:<64 hex>``: an image this server holds for the same principal, either an upload
  (:class:`UploadStore`) or an image one of the principal's jobs generated (the runtime's
  ``ImageStore`` owners, then the job history). Another principal's image is ``not_found``, the
  same answer as for an unknown one, so a hash is not an existence oracle.
- ``data:image/<png|jpeg|webp>;base64,<...>``: the bytes inline, within ``max_upload_bytes``.

Decoding (:func:`decode_image`) reads the size from the header first and refuses more than
``max_pixels`` *before* any pixel is decoded (a decompression bomb costs a header read), applies
the EXIF orientation (a phone photo comes out the way it is shown), and normalises every Pillow
mode to what Fooocus's pixel code expects (engine/imaging/convert.py: HWC3 rules, 16-bit scaled).
Every failure is a :class:`HooocusError` with a stable code (``invalid_image``,
``image_too_large``, ``not_found``, ``invalid_request``) and ``loc`` = the field path.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import logging
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.core.errors import HooocusError, ImageTooLarge, InvalidImage, InvalidRequest, NotFound

if TYPE_CHECKING:  # numpy/Pillow are imported when an image is decoded, not when the core is imported
    import numpy as np

    from engine.core.history import JobHistory
    from engine.core.store import ImageStore

log = logging.getLogger("hooocus.inputs")

Loc = tuple[str | int, ...]

#: The request fields that hold image references, and what each decodes to.
IMAGE_FIELDS: dict[str, Literal["image", "mask"]] = {
    "input_image": "image",
    "inpaint_mask": "mask",
    "inpaint_mask_upload": "mask",
}
#: Image Prompt slots (issue 16) are a list field: slot i's image is decoded under this key.
IMAGE_PROMPTS_FIELD = "image_prompts"


def image_prompt_key(index: int) -> str:
    """The ``RunContext.inputs`` key of image-prompt slot ``index`` (its field path, dotted)."""
    return f"{IMAGE_PROMPTS_FIELD}.{index}.image"


def image_prompt_refs(request: Any) -> list[tuple[Loc, str, str]]:
    """(field path, inputs key, reference text) of every image-prompt slot of ``request``."""
    slots = getattr(request, IMAGE_PROMPTS_FIELD, None) or []
    return [((IMAGE_PROMPTS_FIELD, i, "image"), image_prompt_key(i), slot.image) for i, slot in enumerate(slots)]


#: Defaults of the Settings fields of the same names.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_INPUT_PIXELS = 40_000_000
#: Pillow formats we decode. Fooocus's UI takes whatever the browser shows; these cover phones,
#: editors and 16-bit/CMYK sources (TIFF) without reaching Pillow's rarer, less hardened decoders.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_MIME_BY_PIL_FORMAT = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                       "BMP": "image/bmp", "TIFF": "image/tiff"}
_EXT_BY_MIME = {mime: fmt.lower() for fmt, mime in _MIME_BY_PIL_FORMAT.items()}
_SHA_REF_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_DATA_URI_RE = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,", re.IGNORECASE)


def base64_cap(max_bytes: int) -> int:
    """The longest base64 text that can decode to ``max_bytes`` (4 characters per 3 bytes)."""
    return 4 * ((max_bytes + 2) // 3)


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference: ``kind`` "sha256" (``sha256`` set) or "data" (``data`` set)."""

    kind: Literal["sha256", "data"]
    sha256: str | None = None
    data: bytes | None = None


def parse_image_ref(text: Any, *, loc: Loc = ("input_image",),
                    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> ImageRef:
    """``sha256:<hex>`` or a ``data:image/...;base64,`` URI → :class:`ImageRef`.

    The base64 text is measured before it is decoded, so a huge string costs nothing."""
    if not isinstance(text, str):
        raise InvalidRequest("an image reference must be a string ('sha256:<hex>' or a data URI)", loc=loc)
    match = _SHA_REF_RE.match(text)
    if match:
        return ImageRef(kind="sha256", sha256=match.group(1).lower())
    head = _DATA_URI_RE.match(text)
    if head:
        payload = text[head.end():]
        if len(payload) > base64_cap(max_bytes):
            raise ImageTooLarge(f"the data URI holds more than {max_bytes} bytes", loc=loc)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage("the data URI is not valid base64", loc=loc) from None
        if not data:
            raise InvalidImage("the data URI is empty", loc=loc)
        return ImageRef(kind="data", data=data)
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidRequest(f"not an image reference: {shown!r}; use 'sha256:<64 hex>' (an upload or an image "
                         "you generated) or 'data:image/png;base64,...'", loc=loc)


def _open(data: bytes, *, max_pixels: int, loc: Loc) -> Any:
    """Open (header only) and check the pixel count; returns the Pillow image, not yet decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning (> 89 MP) is noise here: our cap below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):  # > 179 MP: Pillow refuses before we can
            raise ImageTooLarge(f"the image has too many pixels (limit {max_pixels})", loc=loc) from None
        raise InvalidImage("not an image (PNG, JPEG, WebP, GIF, BMP or TIFF expected)", loc=loc) from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidImage("not a readable image (damaged header)", loc=loc) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})", loc=loc)
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{max_pixels}", loc=loc)
    return image


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                loc: Loc = ("file",)) -> tuple[int, int, str]:
    """(width, height, content type) from the header, with the pixel cap; nothing decoded."""
    image = _open(data, max_pixels=max_pixels, loc=loc)
    width, height = image.size
    orientation = 1
    raw_exif = image.info.get("exif")
    if raw_exif:  # the header's EXIF only: Image.getexif() on a PNG decodes the whole image first
        from PIL import Image

        exif = Image.Exif()
        try:
            exif.load(raw_exif)
            orientation = exif.get(0x0112, 1)
        except Exception:  # noqa: BLE001 - damaged EXIF: no orientation, as exif_transpose would do
            orientation = 1
    if orientation in (5, 6, 7, 8):  # these EXIF orientations rotate by 90 degrees
        width, height = height, width
    return width, height, _MIME_BY_PIL_FORMAT.get(image.format or "", "application/octet-stream")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, loc: Loc = ("input_image",),
                 kind: Literal["image", "mask"] = "image") -> np.ndarray:
    """Bytes → H×W×3 uint8 RGB (``kind="image"``) or H×W uint8 (``kind="mask"``).

    The pixel cap is checked from the header before decoding; EXIF orientation is applied; a
    truncated file is ``invalid_image``. Masks lose any alpha before their first channel is read
    (Fooocus's upload widget hands the mask over as RGB; engine/imaging/convert.mask_to_2d)."""
    from PIL import Image, ImageOps

    from engine.imaging.convert import mask_to_2d, pil_to_rgb, uint16_to_uint8

    image = _open(data, max_pixels=max_pixels, loc=loc)
    try:
        image.seek(0)  # animated GIF/WebP: the first frame, as a browser shows it first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # within our cap (checked)
            image.load()
        image = ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the image data is damaged or truncated ({type(exc).__name__})", loc=loc) from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has too many pixels (limit {max_pixels})", loc=loc) from None
    if kind == "image":
        return pil_to_rgb(image, loc=loc)
    import numpy as np

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return mask_to_2d(uint16_to_uint8(np.asarray(image)), loc=loc)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return mask_to_2d(np.asarray(image), loc=loc)


# -- uploads ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadInfo:
    sha256: str
    width: int
    height: int
    content_type: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "width": self.width, "height": self.height,
                "content_type": self.content_type, "size_bytes": self.size_bytes}


@dataclass
class _Upload:
    info: UploadInfo
    data: bytes
    owners: set[str]


class UploadStore:
    """Uploaded images by content hash, each owned by the principals who uploaded it.

    Bounded by bytes (oldest out first; a file evicted from memory is also deleted from the
    folder, so the folder is bounded the same way), and per principal by ``max_bytes_per_owner``:
    a principal over its share loses its own oldest uploads first, so one busy token cannot push
    everybody else's uploads out of the shared cap. With ``folder``, uploads survive a restart:
    ``<sha>.<ext>`` plus ``<sha>.owners`` (one principal per line). Thread-safe."""

    def __init__(self, *, max_bytes: int = 256 * 1024 * 1024, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, folder: Path | None = None,
                 max_bytes_per_owner: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_owner = max_bytes if max_bytes_per_owner is None else min(max_bytes_per_owner, max_bytes)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.folder = folder
        self._items: collections.OrderedDict[str, _Upload] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._load_folder()

    def put(self, data: bytes, *, owner: str, loc: Loc = ("file",)) -> UploadInfo:
        """Check ``data`` is an image within the limits (header only) and keep it for ``owner``."""
        if len(data) > self.max_upload_bytes:
            raise ImageTooLarge(f"the upload is larger than {self.max_upload_bytes} bytes", loc=loc)
        if not data:
            raise InvalidImage("the upload is empty", loc=loc)
        width, height, content_type = probe_image(data, max_pixels=self.max_pixels, loc=loc)
        info = UploadInfo(sha256=hashlib.sha256(data).hexdigest(), width=width, height=height,
                          content_type=content_type, size_bytes=len(data))
        with self._lock:
            item = self._items.get(info.sha256)
            if item is None:
                item = _Upload(info=info, data=data, owners=set())
                self._items[info.sha256] = item
                self._bytes += len(data)
            self._items.move_to_end(info.sha256)
            item.owners.add(owner)
            owners = sorted(item.owners)
            released = self._enforce_owner_share_locked(owner, keep=info.sha256)
            evicted = self._evict_locked()
        self._write(info, data, owners)
        for item, remaining in released:  # the folder follows: fewer owners, or the files go
            if remaining:
                self._write(item.info, item.data, remaining)
            else:
                self._delete(item.info.sha256)
        for sha in evicted:
            self._delete(sha)
        return info

    def owner_bytes(self, owner: str) -> int:
        """Bytes of the uploads ``owner`` holds (an upload shared by two principals counts for both)."""
        with self._lock:
            return sum(len(item.data) for item in self._items.values() if owner in item.owners)

    def _enforce_owner_share_locked(self, owner: str, *, keep: str) -> list[tuple[_Upload, list[str]]]:
        """Drop ``owner`` from its oldest uploads (not ``keep``, the one just put) until it is within
        ``max_bytes_per_owner``; an upload nobody owns any more is removed. Returns (upload, owners left)."""
        used = sum(len(item.data) for item in self._items.values() if owner in item.owners)
        released: list[tuple[_Upload, list[str]]] = []
        for sha in list(self._items):  # oldest first
            if used <= self.max_bytes_per_owner:
                break
            item = self._items[sha]
            if sha == keep or owner not in item.owners:
                continue
            item.owners.discard(owner)
            used -= len(item.data)
            if not item.owners:
                del self._items[sha]
                self._bytes -= len(item.data)
            released.append((item, sorted(item.owners)))
        return released

    def get(self, sha256: str, *, owner: str) -> bytes | None:
        """The bytes if ``owner`` uploaded them, else None (also for someone else's upload)."""
        sha256 = sha256.lower()
        with self._lock:
            item = self._items.get(sha256)
            if item is None or owner not in item.owners:
                return None
            self._items.move_to_end(sha256)
            return item.data

    def info(self, sha256: str, *, owner: str) -> UploadInfo | None:
        with self._lock:
            item = self._items.get(sha256.lower())
            return item.info if item is not None and owner in item.owners else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _evict_locked(self) -> list[str]:
        evicted = []
        while self._bytes > self.max_bytes and len(self._items) > 1:
            sha, old = self._items.popitem(last=False)
            self._bytes -= len(old.data)
            evicted.append(sha)
        return evicted

    def _paths(self, sha256: str) -> list[Path]:
        assert self.folder is not None
        return [self.folder / f"{sha256}.{ext}" for ext in sorted(set(_EXT_BY_MIME.values()))]

    def _write(self, info: UploadInfo, data: bytes, owners: list[str]) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{info.sha256}.{_EXT_BY_MIME.get(info.content_type, 'bin')}"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        owners_path = self.folder / f"{info.sha256}.owners"
        tmp = owners_path.with_suffix(".owners-tmp")
        tmp.write_text("\n".join(owners) + "\n", encoding="utf-8")
        tmp.replace(owners_path)

    def _delete(self, sha256: str) -> None:
        if self.folder is None:
            return
        for path in [*self._paths(sha256), self.folder / f"{sha256}.owners"]:
            path.unlink(missing_ok=True)

    def _load_folder(self) -> None:
        # Oldest first, so the newest uploads are the ones kept when the folder is over the cap.
        assert self.folder is not None
        files = sorted((p for p in self.folder.glob("*.owners") if _SHA_RE.match(p.stem)),
                       key=lambda p: p.stat().st_mtime)
        for owners_path in files:
            sha = owners_path.stem
            owners = {line.strip() for line in owners_path.read_text(encoding="utf-8").splitlines() if line.strip()}
            data_path = next((p for p in self._paths(sha) if p.is_file()), None)
            if data_path is None or not owners:
                continue
            data = data_path.read_bytes()
            try:
                width, height, content_type = probe_image(data, max_pixels=self.max_pixels)
            except HooocusError:
                log.warning("ignoring unreadable upload %s", data_path.name)
                continue
            info = UploadInfo(sha256=sha, width=width, height=height, content_type=content_type,
                              size_bytes=len(data))
            self._items[sha] = _Upload(info=info, data=data, owners=owners)
            self._bytes += len(data)
        for sha in self._evict_locked():
            self._delete(sha)


# -- the submit-time resolver -------------------------------------------------------------------------


class InputResolver:
    """``Engine.submit``'s ``resolve_inputs`` hook: the request's image fields → decoded arrays.

    ``sha256:`` references look in the caller's uploads, then in the images the caller's jobs
    generated (``images`` owners, then ``history``, which also finds files written by an earlier
    process). The decoded arrays are keyed by field name (RunContext.inputs)."""

    def __init__(self, uploads: UploadStore, *, images: ImageStore | None = None,
                 history: JobHistory | None = None, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.uploads = uploads
        self.images = images
        self.history = history
        self.max_pixels = max_pixels
        self.max_upload_bytes = max_upload_bytes

    def __call__(self, request: Any, owner: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        fields: list[tuple[Loc, str, str | None, Literal["image", "mask"]]] = [
            ((name,), name, getattr(request, name, None), kind) for name, kind in IMAGE_FIELDS.items()]
        fields += [(loc, key, text, "image") for loc, key, text in image_prompt_refs(request)]
        for loc, key, text, kind in fields:
            if text is None:
                continue
            ref = parse_image_ref(text, loc=loc, max_bytes=self.max_upload_bytes)
            data = ref.data if ref.kind == "data" else self.fetch(ref.sha256 or "", owner=owner, loc=loc)
            assert data is not None
            out[key] = decode_image(data, max_pixels=self.max_pixels, loc=loc, kind=kind)
        return out

    def resolve_one(self, text: Any, owner: str, *, loc: Loc = ("image",)) -> np.ndarray:
        """One image reference (``loc`` its field path) → H×W×3 uint8 RGB, for ``owner`` (describe)."""
        ref = parse_image_ref(text, loc=loc, max_bytes=self.max_upload_bytes)
        data = ref.data if ref.kind == "data" else self.fetch(ref.sha256 or "", owner=owner, loc=loc)
        assert data is not None
        return decode_image(data, max_pixels=self.max_pixels, loc=loc, kind="image")

    def fetch(self, sha256: str, *, owner: str, loc: Loc) -> bytes:
        """The bytes of an image ``owner`` may use, or ``not_found`` (unknown and foreign alike)."""
        data = self.uploads.get(sha256, owner=owner)
        if data is not None:
            return data
        if self.images is not None:
            stored = self.images.get(sha256)
            if stored is not None and owner in self.images.owners(sha256):
                return stored.data
            if stored is not None and self.history is not None and owner in self.history.image_owners(sha256):
                return stored.data
        if self.history is not None and owner in self.history.image_owners(sha256):
            path = self.history.image_path(sha256)
            if path is not None:
                return path.read_bytes()
        raise NotFound(f"no image sha256:{sha256} for you (upload it first, or use one of your own images)",
                       loc=loc)


ResolveInputs = Callable[[Any, str], Mapping[str, "np.ndarray"]]
