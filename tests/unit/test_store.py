"""engine/core/store.py: the content-addressed image store — owners, the in-memory byte bound, and the
folder bound (oldest files out first, counted again after a restart)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.core.events import ImageReady
from engine.core.store import ImageStore


def _image(n: int, size: int = 1000) -> ImageReady:
    data = bytes([n % 256]) * size
    return ImageReady(job_id=f"j{n}", data=data, sha256=hashlib.sha256(data).hexdigest())


def test_owners_memory_bound_and_lookup_from_the_folder(tmp_path: Path) -> None:
    store = ImageStore(max_bytes=2500, folder=tmp_path)
    first = store.put(_image(1), owner="alice")
    store.put(_image(1), owner="bob")  # the same bytes from bob's job: both own it
    assert store.owners(first.sha256) == {"alice", "bob"}
    for n in (2, 3):
        store.put(_image(n), owner="alice")
    assert len(store) == 2 and store.owners(first.sha256) == frozenset()  # evicted from memory
    again = store.get(first.sha256)  # still served from the folder
    assert again is not None and again.data == _image(1).data
    assert store.get("../" + first.sha256) is None and store.get("nothex") is None


def test_folder_is_bounded_oldest_first_and_after_a_restart(tmp_path: Path) -> None:
    store = ImageStore(max_bytes=10_000, folder=tmp_path, max_folder_bytes=2500)
    images = [_image(n) for n in range(4)]
    for n, image in enumerate(images):
        store.put(image)
        os.utime(tmp_path / f"{image.sha256}.png", (1000 + n, 1000 + n))  # distinct ages for the reload
    assert store.folder_bytes <= 2500
    on_disk = {p.stem for p in tmp_path.iterdir()}
    assert on_disk == {images[2].sha256, images[3].sha256}  # the two newest stay
    # A restart with a smaller cap counts what is there and prunes the oldest.
    reloaded = ImageStore(folder=tmp_path, max_folder_bytes=1500)
    assert reloaded.folder_bytes == 1000 and {p.stem for p in tmp_path.iterdir()} == {images[3].sha256}
    assert reloaded.get(images[2].sha256) is None and reloaded.get(images[3].sha256) is not None
