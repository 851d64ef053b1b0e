"""engine.io.imageio: every format x scheme round-trips, bytes are deterministic, foreign files read."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.core.errors import InvalidRequest
from engine.io.imageio import encode_image, read_image_metadata
from engine.io.metadata import MetadataInput, metadata_text, parse_parameters, request_from_image

FORMATS = ("png", "jpeg", "webp")
SCHEMES = ("fooocus", "a1111")


def _pixels(height: int = 40, width: int = 56) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _input(scheme: str) -> MetadataInput:
    return MetadataInput(
        prompt="a café at night, (neon:1.2)\nrain «ünïcödé» 猫", negative_prompt="blurry, \"bad\"",
        expansion="", styles=["Fooocus Sharp"], performance="Quality", steps=42, width=832, height=1216,
        cfg=5.5, sharpness=3.0, adm=(1.4, 0.9, 0.25), base_model="myModel_v1.safetensors", base_model_hash="0123456789",
        refiner_model="refiner_x.safetensors", refiner_model_hash="abcdefabcd", refiner_switch=0.6,
        overwrite_switch=20, refiner_swap_method="separate", adaptive_cfg=6.0, clip_skip=3, sampler="dpmpp_2m",
        scheduler="exponential", vae="my_vae.safetensors", seed=2**63 - 2, freeu=(1.1, 1.2, 0.9, 0.8),
        loras=[("detail.safetensors", 0.5, "1111111111"), ("style.safetensors", -0.25, "2222222222")],
        full_prompt=["cinematic still a café at night . film", "rain «ünïcödé» 猫"],
        full_negative_prompt=["anime, cartoon", "blurry, \"bad\""], metadata_scheme=scheme)


KNOWN = {"known_models": ["myModel_v1.safetensors", "refiner_x.safetensors"],
         "known_loras": ["detail.safetensors", "style.safetensors"], "known_vaes": ["my_vae.safetensors"]}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format_and_scheme(fmt: str, scheme: str) -> None:
    inp = _input(scheme)
    text = metadata_text(inp)
    data = encode_image(_pixels(), fmt=fmt, parameters=text, scheme=scheme)
    assert Image.open(io.BytesIO(data)).format == fmt.upper()
    assert read_image_metadata(data) == (text, scheme)

    request, warnings = request_from_image(data, **KNOWN)
    assert warnings == []
    assert (request.prompt, request.negative_prompt) == (inp.prompt, inp.negative_prompt)
    assert (request.performance, request.steps, request.size, request.seed) == ("Quality", 42, (832, 1216), inp.seed)
    assert (request.sampler, request.scheduler, request.cfg, request.sharpness) == ("dpmpp_2m", "exponential", 5.5, 3.0)
    assert (request.adm_scaler_positive, request.adm_scaler_negative, request.adm_scaler_end) == (1.4, 0.9, 0.25)
    assert (request.adaptive_cfg, request.clip_skip) == (6.0, 3)
    assert (request.base_model, request.refiner_model, request.vae) == (
        "myModel_v1.safetensors", "refiner_x.safetensors", "my_vae.safetensors")
    assert (request.refiner_swap_method, request.refiner_switch_step) == ("separate", 20)
    assert request.freeu is not None and (request.freeu.b1, request.freeu.s2) == (1.1, 0.8)
    assert [(lora.name, lora.weight) for lora in request.loras] == [
        ("detail.safetensors", 0.5), ("style.safetensors", -0.25)]
    if scheme == "fooocus":  # the JSON scheme also keeps the refiner switch and the styles exactly
        assert request.refiner_switch == 0.6
        assert request.styles == ["Fooocus Sharp"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_input_same_bytes(fmt: str) -> None:
    text = metadata_text(_input("fooocus"))
    first = encode_image(_pixels(), fmt=fmt, parameters=text, scheme="fooocus")
    assert encode_image(_pixels(), fmt=fmt, parameters=text, scheme="fooocus") == first
    assert encode_image(_pixels(), fmt=fmt, parameters=text + " ", scheme="fooocus") != first


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_parameters_no_metadata(fmt: str) -> None:
    data = encode_image(_pixels(), fmt=fmt)
    assert read_image_metadata(data) == (None, None)
    assert "exif" not in Image.open(io.BytesIO(data)).info
    with pytest.raises(InvalidRequest, match="no generation parameters"):
        request_from_image(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_scheme_is_told_by_content(fmt: str) -> None:
    """spec §13.6 step 1: without a scheme, a JSON object is fooocus and text is a1111."""
    for scheme in SCHEMES:
        text = metadata_text(_input(scheme))
        parameters, read_scheme = read_image_metadata(encode_image(_pixels(), fmt=fmt, parameters=text))
        assert (parameters, read_scheme) == (text, None)
        parsed = parse_parameters(parameters, read_scheme)
        assert ("full_prompt" in parsed) == (scheme == "fooocus")
        assert parsed["seed"] == str(2**63 - 2)


def test_exif_keys_fooocus_reads_and_our_software_name() -> None:
    data = encode_image(_pixels(), fmt="jpeg", parameters="x: 1, y: 2, z: 3", scheme="a1111")
    exif = Image.open(io.BytesIO(data)).getexif()
    assert exif[0x9286] == "x: 1, y: 2, z: 3" and exif[0x927C] == "a1111"
    assert exif[0x0131].startswith("Hooocus")
    custom = encode_image(_pixels(), fmt="webp", parameters="p", scheme="fooocus", software="Other 1.0")
    assert Image.open(io.BytesIO(custom)).getexif()[0x0131] == "Other 1.0"


def test_a1111_usercomment_in_exif_subifd_is_read() -> None:
    """A1111 writes UserComment into the Exif IFD as 'UNICODE\\0' + UTF-16."""
    text = "a cat\nSteps: 20, Sampler: Euler a, Seed: 7, Size: 512x512"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    out = io.BytesIO()
    Image.fromarray(_pixels()).save(out, format="JPEG", exif=exif)
    assert read_image_metadata(out.getvalue()) == (text, None)


def test_png_without_scheme_chunk_is_a1111_text() -> None:
    """A1111's own PNGs: a 'parameters' chunk and no 'fooocus_scheme'."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a dog\nNegative prompt: cat\nSteps: 20, Sampler: Euler, Seed: 5, Size: 640x448")
    out = io.BytesIO()
    Image.fromarray(_pixels()).save(out, format="PNG", pnginfo=info)
    parameters, scheme = read_image_metadata(out.getvalue())
    assert scheme is None
    parsed = parse_parameters(parameters, scheme)
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["resolution"]) == ("a dog", "cat", "('640', '448')")


def test_fooocus_json_is_ascii_in_every_container() -> None:
    text = metadata_text(_input("fooocus"))
    assert text.isascii() and json.loads(text)["prompt"] == _input("fooocus").prompt


def test_bad_inputs() -> None:
    with pytest.raises(InvalidRequest, match="cannot read image metadata"):
        read_image_metadata(b"definitely not an image")
    with pytest.raises(ValueError):
        encode_image(np.zeros((8, 8), dtype=np.uint8), fmt="png")
    with pytest.raises(ValueError):
        encode_image(_pixels(), fmt="gif")
    with pytest.raises(InvalidRequest, match="JPEG EXIF"):
        encode_image(_pixels(), fmt="jpeg", parameters="x" * 70_000, scheme="a1111")


def test_png_text_after_the_pixel_data_is_read() -> None:
    """Some tools write tEXt after IDAT; the reader must still find it."""
    import struct
    import zlib

    data = encode_image(_pixels(), fmt="png")
    chunk_body = b"parameters\x00late text"
    chunk = struct.pack(">I", len(chunk_body)) + b"tEXt" + chunk_body + struct.pack(">I", zlib.crc32(b"tEXt" + chunk_body))
    iend = data.rindex(b"IEND") - 4
    assert read_image_metadata(data[:iend] + chunk + data[iend:]) == ("late text", None)
