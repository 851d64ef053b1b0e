"""Content-addressed store of finished images, shared by every front door.

Images are keyed by the sha256 of their encoded bytes. The in-memory part is bounded by bytes
(oldest out first); an optional folder keeps them across restarts, bounded the same way by
``max_folder_bytes`` (oldest files out first), so a long-running server's disk does not fill up
with copies of images whose jobs left the history long ago.

Each image also remembers which principals' jobs produced it (``owners``): an image's PNG
metadata holds the prompt, so front doors serve it only to an owner or an admin (or via a
signed URL). Identical bytes from two principals' jobs belong to both. The job history keeps the
same fact on disk (``JobHistory.image_owners``) for images no longer in memory.
"""

from __future__ import annotations

import collections
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.core.events import ImageReady
from engine.core.formats import MIME_BY_FORMAT, extension_for_mime, extensions_for_mime

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    mime: str
    data: bytes

    @property
    def extension(self) -> str:
        return extension_for_mime(self.mime)


class ImageStore:
    """Thread-safe: the worker thread puts, async front doors get."""

    def __init__(self, *, max_bytes: int = 512 * 1024 * 1024, folder: Path | None = None,
                 max_folder_bytes: int = 4 * 1024 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.folder = folder
        self.max_folder_bytes = max_folder_bytes
        #: The folder's files, oldest first (path -> size); bounded by ``max_folder_bytes``.
        self._files: collections.OrderedDict[Path, int] = collections.OrderedDict()
        self._folder_bytes = 0
        self._items: collections.OrderedDict[str, StoredImage] = collections.OrderedDict()
        #: sha256 -> owner names; an entry leaves with its image (bounded like ``_items``).
        self._owners: dict[str, set[str]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            existing = sorted((p for p in folder.iterdir() if p.is_file() and _SHA256_RE.match(p.stem)),
                              key=lambda p: p.stat().st_mtime)
            for path in existing:
                self._files[path] = path.stat().st_size
                self._folder_bytes += self._files[path]
            self._prune_folder()

    def put(self, image: ImageReady, *, owner: str | None = None) -> StoredImage:
        """Store ``image``; ``owner`` is the principal whose job produced it."""
        item = StoredImage(sha256=image.sha256, mime=image.mime, data=image.data)
        with self._lock:
            if item.sha256 not in self._items:
                self._items[item.sha256] = item
                self._bytes += len(item.data)
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    old_sha, old = self._items.popitem(last=False)
                    self._bytes -= len(old.data)
                    self._owners.pop(old_sha, None)
            else:
                self._items.move_to_end(item.sha256)
            if owner is not None and item.sha256 in self._items:
                self._owners.setdefault(item.sha256, set()).add(owner)
        if self.folder is not None:
            path = self.folder / f"{item.sha256}.{item.extension}"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(item.data)
                tmp.replace(path)
            with self._lock:
                if path not in self._files:
                    self._files[path] = len(item.data)
                    self._folder_bytes += len(item.data)
                self._files.move_to_end(path)
            self._prune_folder()
        return item

    @property
    def folder_bytes(self) -> int:
        with self._lock:
            return self._folder_bytes

    def _prune_folder(self) -> None:
        """Delete the oldest files until the folder is within ``max_folder_bytes`` (the newest stays)."""
        doomed: list[Path] = []
        with self._lock:
            while self._folder_bytes > self.max_folder_bytes and len(self._files) > 1:
                path, size = self._files.popitem(last=False)
                self._folder_bytes -= size
                doomed.append(path)
        for path in doomed:
            path.unlink(missing_ok=True)

    def get(self, sha256: str) -> StoredImage | None:
        """The image, or None. ``sha256`` is validated so it can never become a path trick."""
        sha256 = sha256.lower()
        if not _SHA256_RE.match(sha256):
            return None
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
                return item
        if self.folder is not None:
            for mime in MIME_BY_FORMAT.values():
                for ext in extensions_for_mime(mime):
                    path = self.folder / f"{sha256}.{ext}"
                    if path.is_file():
                        return StoredImage(sha256=sha256, mime=mime, data=path.read_bytes())
        return None

    def owners(self, sha256: str) -> frozenset[str]:
        """Who produced the image (empty when unknown here, e.g. evicted or from the folder)."""
        with self._lock:
            return frozenset(self._owners.get(sha256.lower(), ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
