"""Output files: dated folders, and retention by size and age that only ever deletes our images."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from engine.core.events import ImageReady
from engine.core.outputs import prune_outputs, write_image

NOW = dt.datetime(2024, 5, 20, 12, 0, 0)
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def make_image(out_dir: Path, day: str, name: str, *, size_bytes: int, age_days: float,
               head: bytes = PNG_HEAD) -> Path:
    """A file in ``out_dir/day`` with an image signature, ``size_bytes`` long, ``age_days`` old."""
    path = out_dir / day / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + b"\0" * (size_bytes - len(head)))
    mtime_s = NOW.timestamp() - age_days * 86_400
    os.utime(path, (mtime_s, mtime_s))
    return path


def ours(out_dir: Path, stamp: str, seed: int, *, size_bytes: int = 100, age_days: float = 0.0,
         ext: str = "png") -> Path:
    """A file named as write_image names them, in its day folder."""
    head = {"png": PNG_HEAD, "jpeg": b"\xff\xd8\xff\xe0", "webp": b"RIFF\0\0\0\0WEBP"}[ext]
    return make_image(out_dir, stamp[:10], f"{stamp}_{seed}_0.{ext}", size_bytes=size_bytes, age_days=age_days,
                      head=head)


def test_write_image_uses_a_dated_folder_and_never_overwrites(tmp_path: Path) -> None:
    image = ImageReady(job_id="j", index=1, seed=42, data=PNG_HEAD + b"x", mime="image/png")
    first = write_image(tmp_path, image, now=NOW)
    second = write_image(tmp_path, image, now=NOW)
    assert first == tmp_path / "2024-05-20" / "2024-05-20_12-00-00_42_1.png"
    assert second != first and second.parent == first.parent and second.read_bytes() == image.data
    assert not list(first.parent.glob("*.tmp"))


def test_no_limits_deletes_nothing(tmp_path: Path) -> None:
    old = ours(tmp_path, "2020-01-01_00-00-00", 1, age_days=1000)
    assert prune_outputs(tmp_path, now=NOW) == []
    assert old.exists()
    assert prune_outputs(tmp_path / "missing", max_bytes=0, now=NOW) == []


def test_age_limit_deletes_only_our_old_images(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    out = tmp_path / "out"
    old_a = ours(out, "2024-05-01_10-00-00", 1, age_days=19)
    old_b = ours(out, "2024-05-02_10-00-00", 2, age_days=18, ext="jpeg")
    young = ours(out, "2024-05-19_10-00-00", 3, age_days=1, ext="webp")
    # Look like ours by name, but are not ours to delete:
    fooocus_named = make_image(out, "2024-05-01", "2024-05-01_10-00-00_1234.png", size_bytes=50, age_days=19)
    not_an_image = make_image(out, "2024-05-01", "2024-05-01_10-00-01_5_0.png", size_bytes=50, age_days=19,
                              head=b"hello world!")
    notes = make_image(out, "2024-05-01", "notes.txt", size_bytes=50, age_days=19)
    loose = make_image(out, ".", "2024-05-01_10-00-00_9_0.png", size_bytes=50, age_days=19)
    # A symlink named like our image, pointing at an old image outside the folder.
    target = make_image(outside, "x", "2024-05-01_10-00-00_7_0.png", size_bytes=50, age_days=30)
    link = out / "2024-05-02" / "2024-05-02_09-00-00_7_0.png"
    link.symlink_to(target)
    # A symlinked day folder leading out of the output folder, holding an old "ours" image.
    foreign_day = outside / "2024-04-01"
    foreign_img = ours(outside, "2024-04-01_10-00-00", 8, age_days=40)
    (out / "2024-04-01").symlink_to(foreign_day, target_is_directory=True)

    deleted = prune_outputs(out, max_age_days=7, now=NOW)

    assert deleted == [old_a, old_b]
    assert not old_a.exists() and not old_b.exists()
    for survivor in (young, fooocus_named, not_an_image, notes, loose, target, foreign_img):
        assert survivor.exists(), survivor
    assert link.is_symlink() and (out / "2024-04-01").is_symlink()
    assert (out / "2024-05-01").is_dir()  # not empty: foreign files stay, so the folder stays


def test_size_limit_deletes_oldest_first_until_under_the_limit(tmp_path: Path) -> None:
    files = [ours(tmp_path, f"2024-05-{10 + i:02d}_08-00-00", i, size_bytes=100 * (i + 1), age_days=10 - i)
             for i in range(5)]  # sizes 100..500, oldest first
    keep_bytes = 400 + 500
    deleted = prune_outputs(tmp_path, max_bytes=keep_bytes, now=NOW)
    assert deleted == files[:3]
    assert [f.exists() for f in files] == [False, False, False, True, True]
    # emptied day folders go, so the tree does not fill with empty folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2024-05-13", "2024-05-14"]
    assert prune_outputs(tmp_path, max_bytes=keep_bytes, now=NOW) == []


def test_size_and_age_limits_together(tmp_path: Path) -> None:
    ancient = ours(tmp_path, "2024-01-01_00-00-00", 1, size_bytes=100, age_days=100)
    mid = ours(tmp_path, "2024-05-15_00-00-00", 2, size_bytes=300, age_days=5)
    new = ours(tmp_path, "2024-05-20_00-00-00", 3, size_bytes=300, age_days=0)
    deleted = prune_outputs(tmp_path, max_bytes=350, max_age_days=30, now=NOW)
    assert deleted == [ancient, mid]
    assert new.exists()


@pytest.mark.parametrize("max_bytes", [0, 1])
def test_a_limit_below_one_image_empties_the_folder(tmp_path: Path, max_bytes: int) -> None:
    files = [ours(tmp_path, "2024-05-20_11-00-00", seed, age_days=0.1 - seed / 100) for seed in range(3)]
    assert prune_outputs(tmp_path, max_bytes=max_bytes, now=NOW) == files
    assert list(tmp_path.iterdir()) == []
