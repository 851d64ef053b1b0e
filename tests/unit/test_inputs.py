"""Input images (issue 14): references, decoding with limits, uploads owned per principal, and the
submit-time resolver (bad input → stable code + field path, nothing queued, the next job fine)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import HooocusError
from engine.core.inputs import (
    ImageRef,
    UploadStore,
    base64_cap,
    decode_image,
    parse_image_ref,
    probe_image,
)
from engine.core.jobs import JobState
from engine.core.runtime import create_runtime
from engine.core.settings import Settings
from engine.core.testing import FakeRunner
from engine.imaging.convert import hwc3, uint16_to_uint8
from tests.images import InputsRecorder, data_uri, encode, solid_png


def rgb_png(width: int = 16, height: int = 12, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    return solid_png(width, height, color)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height, with a tiny body: opening it reads only the header."""
    raw = rgb_png(1, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return patched + raw[8 + 25:]


def expect_error(code: str, at: tuple[object, ...] | None, fn, *args, **kw) -> HooocusError:
    with pytest.raises(HooocusError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value.to_dict()
    if at is not None:
        assert info.value.loc == at
    return info.value


# -- references ----------------------------------------------------------------------------------------


def test_parse_image_ref_kinds_and_errors() -> None:
    sha = "AB" * 32
    assert parse_image_ref(f"sha256:{sha}") == ImageRef(kind="sha256", sha256=sha.lower())
    png = rgb_png()
    assert parse_image_ref(data_uri(png)).data == png
    expect_error("invalid_request", ("inpaint_mask",), parse_image_ref, "file:///etc/passwd", loc=("inpaint_mask",))
    expect_error("invalid_request", ("input_image",), parse_image_ref, "sha256:1234")
    expect_error("invalid_image", ("input_image",), parse_image_ref, "data:image/png;base64,!!!not base64!!")


def test_huge_base64_is_refused_before_decoding() -> None:
    cap = 4096
    # One character over the longest base64 text that can hold cap bytes; not even valid base64,
    # so image_too_large proves the length was checked before any decoding was tried.
    text = "data:image/png;base64," + "*" * (base64_cap(cap) + 1)
    expect_error("image_too_large", ("input_image",), parse_image_ref, text, max_bytes=cap)
    assert len(parse_image_ref(data_uri(b"x" * cap), max_bytes=cap).data or b"") == cap


# -- decoding --------------------------------------------------------------------------------------------


def test_not_an_image_and_truncated_file_are_invalid_image() -> None:
    expect_error("invalid_image", ("input_image",), decode_image, b"hello, not an image")
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    expect_error("invalid_image", ("input_image",), decode_image, png[: len(png) // 2])
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    expect_error("invalid_image", ("inpaint_mask",), decode_image, jpeg[: len(jpeg) // 2], loc=("inpaint_mask",))


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = bomb_png(8_000, 8_000)  # 64 MP claimed in a file of a few dozen bytes
    assert len(bomb) < 200
    assert probe_image(bomb, max_pixels=10**10)[:2] == (8_000, 8_000)  # the header is read ...
    err = expect_error("image_too_large", ("input_image",), decode_image, bomb, max_pixels=40_000_000)
    assert "8000x8000" in err.message  # ... and refused before decoding (which would need 192 MB)
    # Beyond Pillow's own limit (179 MP) Pillow refuses at open: still image_too_large, never a crash.
    expect_error("image_too_large", ("input_image",), decode_image, bomb_png(50_000, 50_000))
    expect_error("image_too_large", None, decode_image, rgb_png(100, 100), max_pixels=100 * 100 - 1)
    assert decode_image(rgb_png(100, 100), max_pixels=100 * 100).shape == (100, 100, 3)


def test_modes_are_normalised_like_hwc3() -> None:
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(grey16)))
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, hwc3(uint16_to_uint8(grey16)))

    rgba = rng.integers(0, 256, (4, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"))), hwc3(rgba))

    grey = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(grey, "L"))), hwc3(grey))

    palette = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).quantize(8)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(decode_image(encode(palette)), expected)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=100))
    assert out.shape == (4, 4, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(image, "PNG", exif=exif.tobytes())  # PNG: no chroma smearing of the marker pixel
    out = decode_image(data)
    assert out.shape == (4, 2, 3)  # W and H swapped
    assert tuple(out[0, -1]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 255)  # top-left → top-right
    assert probe_image(data)[:2] == (2, 4)


def test_masks_read_channel_zero_without_alpha() -> None:
    mask = np.zeros((5, 6, 4), dtype=np.uint8)
    mask[1:3, 2:4, 0] = 255
    mask[..., 3] = 0  # fully transparent: the stored colour counts (Fooocus's widget drops alpha)
    out = decode_image(encode(Image.fromarray(mask, "RGBA")), kind="mask", loc=("inpaint_mask",))
    assert out.shape == (5, 6) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask[..., 0])


# -- uploads ---------------------------------------------------------------------------------------------


def test_upload_store_owner_bounds_and_folder(tmp_path: Path) -> None:
    store = UploadStore(max_bytes=3000, folder=tmp_path)
    noisy = [encode(Image.effect_noise((24, 24), 80 + i).convert("RGB")) for i in range(4)]
    assert all(1000 < len(d) < 2000 for d in noisy), [len(d) for d in noisy]
    first = store.put(noisy[0], owner="alice")
    assert (first.width, first.height, first.content_type) == (24, 24, "image/png")
    assert store.get(first.sha256, owner="alice") == noisy[0]
    assert store.get(first.sha256, owner="bob") is None
    store.put(noisy[0], owner="bob")  # the same bytes from bob: both own it
    assert store.get(first.sha256, owner="bob") == noisy[0]
    for data in noisy[1:]:
        store.put(data, owner="alice")
    assert store.total_bytes <= 3000 and store.get(first.sha256, owner="alice") is None  # oldest out
    assert not list(tmp_path.glob(f"{first.sha256}.*"))  # and gone from the folder too
    reloaded = UploadStore(max_bytes=3000, folder=tmp_path)
    assert len(reloaded) == len(store)
    last = store.put(noisy[-1], owner="alice")
    assert reloaded.get(last.sha256, owner="alice") == noisy[-1]
    assert reloaded.get(last.sha256, owner="bob") is None


def test_a_principal_over_its_share_loses_only_its_own_oldest_uploads(tmp_path: Path) -> None:
    noisy = [encode(Image.effect_noise((24, 24), 60 + i).convert("RGB")) for i in range(6)]
    assert all(1000 < len(d) < 2000 for d in noisy), [len(d) for d in noisy]
    # Room for all six overall, but alice may hold at most two (each is 1–2 kB).
    store = UploadStore(max_bytes=20_000, max_bytes_per_owner=4000, folder=tmp_path)
    bob_first = store.put(noisy[0], owner="bob")
    shared = store.put(noisy[1], owner="alice")
    store.put(noisy[1], owner="bob")  # bob holds the same bytes
    alice = [store.put(data, owner="alice") for data in noisy[2:]]
    assert store.get(bob_first.sha256, owner="bob") == noisy[0]  # bob's uploads are untouched
    assert store.get(shared.sha256, owner="bob") == noisy[1]  # still bob's, though alice let go of it
    assert store.get(shared.sha256, owner="alice") is None
    assert store.get(alice[0].sha256, owner="alice") is None  # alice's oldest went first
    assert store.get(alice[-1].sha256, owner="alice") == noisy[-1]
    assert store.owner_bytes("alice") <= 4000
    assert not list(tmp_path.glob(f"{alice[0].sha256}.*"))  # nobody owns it: gone from the folder
    owners = (tmp_path / f"{shared.sha256}.owners").read_text(encoding="utf-8").split()
    assert owners == ["bob"]  # the folder follows, so a restart keeps the same owners
    reloaded = UploadStore(max_bytes=20_000, max_bytes_per_owner=4000, folder=tmp_path)
    assert reloaded.get(shared.sha256, owner="alice") is None and reloaded.get(shared.sha256, owner="bob")


def test_upload_store_refuses_bad_uploads() -> None:
    store = UploadStore(max_upload_bytes=2048, max_pixels=10_000)
    expect_error("image_too_large", ("file",), store.put, b"\0" * 2049, owner="a")
    expect_error("invalid_image", ("file",), store.put, b"GIF89a but not really", owner="a")
    expect_error("invalid_image", ("file",), store.put, b"", owner="a")
    expect_error("image_too_large", ("file",), store.put, bomb_png(1000, 1000), owner="a")
    assert len(store) == 0


# -- the submit-time resolver through the engine -----------------------------------------------------------


@pytest.fixture()
def runtime(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, max_upload_bytes=64 * 1024, max_input_pixels=1_000_000)
    rt = create_runtime(settings, runner=InputsRecorder(), record_history=False).start()
    yield rt
    rt.close()


def base(**kw: object) -> dict[str, object]:
    return {"prompt": "p", "steps": 2, "width": 512, "height": 512, **kw}


def test_runner_receives_decoded_inputs(runtime) -> None:
    image = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:6, 3:9] = 255
    uploaded = runtime.uploads.put(encode(Image.fromarray(mask, "L")), owner="alice")
    job = runtime.engine.submit(base(uov_method="Vary (Subtle)", input_image=data_uri(encode(Image.fromarray(image))),
                                     inpaint_mask=f"sha256:{uploaded.sha256}"), owner="alice")
    assert job.wait(10) and job.state is JobState.DONE
    seen = runtime.engine.runner.seen[job.job_id]
    assert set(seen) == {"input_image", "inpaint_mask"}
    np.testing.assert_array_equal(seen["input_image"], image)
    np.testing.assert_array_equal(seen["inpaint_mask"], mask)
    assert seen["input_image"].dtype == np.uint8 and seen["inpaint_mask"].ndim == 2
    assert job.inputs == {}  # a finished job drops its arrays


BAD_INPUTS = [
    ("input_image", "not a reference", "invalid_request"),
    ("input_image", "data:image/png;base64,@@@@", "invalid_image"),
    ("input_image", data_uri(b"definitely not an image"), "invalid_image"),
    ("inpaint_mask", data_uri(rgb_png(64, 64)[:60]), "invalid_image"),
    ("input_image", data_uri(bomb_png(2000, 2000)), "image_too_large"),
    ("input_image", "data:image/png;base64," + "A" * (base64_cap(64 * 1024) + 4), "image_too_large"),
    ("inpaint_mask_upload", "sha256:" + "0" * 64, "not_found"),
]


@pytest.mark.parametrize(("field", "ref", "code"), BAD_INPUTS, ids=[c + "-" + f for f, _, c in BAD_INPUTS])
def test_bad_input_fails_at_submit_nothing_queued_next_job_fine(runtime, field: str, ref: str, code: str) -> None:
    engine = runtime.engine
    expect_error(code, (field,), engine.submit, base(**{"uov_method": "Vary (Subtle)", "input_image": data_uri(rgb_png()), field: ref}),
                 owner="alice")
    assert engine.jobs() == [] and engine.stats().queue_depth == 0
    job = engine.submit(base(uov_method="Vary (Subtle)", input_image=data_uri(rgb_png())), owner="alice")
    assert job.wait(10) and job.state is JobState.DONE


def test_sha256_refs_are_owned_per_principal(runtime) -> None:
    engine = runtime.engine
    upload = runtime.uploads.put(rgb_png(), owner="alice")
    expect_error("not_found", ("input_image",), engine.submit, base(uov_method="Vary (Subtle)", input_image=f"sha256:{upload.sha256}"),
                 owner="bob")
    assert engine.jobs() == []
    # An image alice's job generated is hers to reuse; bob gets not_found, as for an unknown hash.
    first = engine.submit(base(), owner="alice")
    assert first.wait(10) and first.images
    generated = first.images[0].sha256
    expect_error("not_found", ("input_image",), engine.submit, base(uov_method="Vary (Subtle)", input_image=f"sha256:{generated}"),
                 owner="bob")
    again = engine.submit(base(uov_method="Vary (Subtle)", input_image=f"sha256:{generated}"), owner="alice")
    assert again.wait(10) and again.state is JobState.DONE
    assert runtime.engine.runner.seen[again.job_id]["input_image"].shape == (
        first.images[0].height, first.images[0].width, 3)


def test_engine_without_resolver_refuses_images() -> None:
    from engine.core.jobs import Engine

    engine = Engine(FakeRunner())
    expect_error("invalid_request", ("input_image",), engine.submit, base(uov_method="Vary (Subtle)", input_image=data_uri(rgb_png())))
    assert engine.jobs() == []


def test_generated_images_found_through_history_after_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    rt = create_runtime(settings, runner=InputsRecorder()).start()
    try:
        job = rt.engine.submit(base(), owner="alice")
        assert job.wait(10) and job.images
        sha = job.images[0].sha256
    finally:
        rt.close()
    later = create_runtime(settings, runner=InputsRecorder()).start()
    try:
        expect_error("not_found", ("input_image",), later.engine.submit, base(uov_method="Vary (Subtle)", input_image=f"sha256:{sha}"),
                     owner="bob")
        again = later.engine.submit(base(uov_method="Vary (Subtle)", input_image=f"sha256:{sha}"), owner="alice")
        assert again.wait(10) and again.state is JobState.DONE
    finally:
        later.close()
