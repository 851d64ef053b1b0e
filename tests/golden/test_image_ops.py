"""Golden: image-input pixel operations (spec §12.1–12.2) against refdata/image_ops/ and parity runs e–g.

Every case is enumerated from the data at collection time and every expected value is read from it.
All comparisons are exact: sizes and boxes are integers, and the pixel files are uint8 results of
deterministic integer/float32 code (OpenCV morphology, Pillow BoxBlur/LANCZOS, a float32 blend
truncated to uint8) that we run through the same libraries, so there is no rounding bound to allow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from engine.imaging.inpaint import (
    color_correction,
    compute_initial_abcd,
    crop_mask_for_generation,
    fooocus_fill,
    paste_back,
    solve_abcd,
)
from engine.imaging.latent_mask import INPAINT_GREY, grey_filled_pixels, latent_mask
from engine.imaging.masks import erode_or_dilate, morphological_open, outpaint_pad
from engine.imaging.resize import resample_image, resize_image
from engine.imaging.sizes import (
    get_shape_ceil,
    set_image_shape_ceil_hw,
    upscale_plan,
    vae_encode_crop_box,
    vary_target_hw,
)
from tests.paths import parity_runs_where, refdata_dir


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


_DATA = _load(refdata_dir() / "image_ops" / "image_ops.json")
_SIZES: list[dict[str, Any]] = _DATA.get("shape_ceil_and_uov_sizes", [])
_RESIZES: list[dict[str, Any]] = _DATA.get("resize_image", [])
_ABCD: list[dict[str, Any]] = _DATA.get("inpaint_abcd", {}).get("cases", [])
_OUTPAINT: list[dict[str, Any]] = _DATA.get("outpaint", [])
_PIXEL_FILES: dict[str, str] = _DATA.get("pixel_files", {})
_UOV_RULES = {"set_image_shape_ceil(upscaled, 1024)": "shape_ceil", "resample_image(upscaled, W*f, H*f)": "resample"}
_INPUT_IMAGE, _INPUT_MASK = "inpaint_input_image.png", "inpaint_input_mask.png"

# The crop-box cases name their masks ("rect", ...) but do not store them. These are the simplest
# masks that reproduce every recorded initial box at all three image sizes (reconstructed, not read
# from Fooocus); solve_abcd is checked independently of them from the recorded initial boxes.
_ABCD_MASKS: dict[str, Any] = {
    "rect": lambda h, w: _mask_from(h, w, lambda y, x: (40 <= y) & (y < 90) & (100 <= x) & (x < 180)),
    "circle": lambda h, w: _mask_from(h, w, lambda y, x: (y - 120) ** 2 + (x - 60) ** 2 < 30 ** 2),
    "thin": lambda h, w: _mask_from(h, w, lambda y, x: (15 <= y) & (y < 20) & (16 <= x) & (x < 251)),
    "corner": lambda h, w: _mask_from(h, w, lambda y, x: (y >= h - 30) & (x >= w - 20)),
}


def _mask_from(h: int, w: int, inside: Any) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (inside(y, x) * 255).astype(np.uint8)


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def _k_keys(case: dict[str, Any]) -> list[tuple[str, float]]:
    return [(key, float(m.group(1))) for key in case if (m := re.fullmatch(r"solve_abcd_k([\d.]+)", key))]


def _uov_keys(case: dict[str, Any]) -> list[tuple[str, float]]:
    return [(key, float(m.group(1))) for key in case if (m := re.fullmatch(r"upscale_([\d.]+)x", key))]


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['H']}x{case['W']}"


def test_image_ops_golden_files_present(refdata: Path) -> None:
    for name, cases in [("shape_ceil_and_uov_sizes", _SIZES), ("resize_image", _RESIZES), ("inpaint_abcd", _ABCD),
                        ("outpaint", _OUTPAINT), ("pixel_files", _PIXEL_FILES)]:
        assert cases, f"image_ops.json has no {name} cases"
    assert "encode_vae_inpaint" in _DATA


# --- spec §12.1 sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", _SIZES, ids=_case_id)
def test_shape_ceil_and_set_image_shape_ceil(case: dict[str, Any]) -> None:
    assert get_shape_ceil(case["H"], case["W"]) == case["get_shape_ceil"]
    ceils = [int(m.group(1)) for key in case if (m := re.fullmatch(r"set_image_shape_ceil_(\d+)", key))]
    assert ceils
    for ceil in ceils:
        assert list(set_image_shape_ceil_hw(case["H"], case["W"], ceil)) == case[f"set_image_shape_ceil_{ceil}"]


@pytest.mark.parametrize("case", _SIZES, ids=_case_id)
def test_vary_size_and_latent_after_vae_crop(case: dict[str, Any]) -> None:
    h, w = vary_target_hw(case["H"], case["W"])
    assert [h, w] == case["vary_resized_HW"]
    top, bottom, left, right = vae_encode_crop_box(h, w)
    assert (bottom - top) % 8 == 0 and (right - left) % 8 == 0
    assert [(bottom - top) // 8, (right - left) // 8] == case["vary_latent_HW_after_vae_crop"]


@pytest.mark.parametrize("case", _SIZES, ids=_case_id)
def test_upscale_plan(case: dict[str, Any]) -> None:
    keys = _uov_keys(case)
    assert keys
    for key, factor in keys:
        expected = case[key]
        plan = upscale_plan(case["H"], case["W"], factor)
        assert plan.shape_ceil_px == expected["shape_ceil"], key
        assert expected["rule"] in _UOV_RULES, f"rule {expected['rule']!r} not understood"
        assert plan.rule == _UOV_RULES[expected["rule"]], key
        assert list(plan.result_hw) == expected["result_HW"], key
        assert plan.direct_return == expected["direct_return_without_diffusion"], key


@pytest.mark.parametrize("case", _RESIZES, ids=lambda c: f"{c['src_HW']}-m{c['resize_mode']}-{c['width']}x{c['height']}")
def test_resize_image_sizes(case: dict[str, Any]) -> None:
    src = np.random.default_rng(0).integers(0, 256, (*case["src_HW"], 3), dtype=np.uint8)
    out = resize_image(src, case["width"], case["height"], case["resize_mode"])
    assert list(out.shape[:2]) == case["out_HW"] and out.dtype == np.uint8


# --- spec §12.2 crop box ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", _ABCD, ids=lambda c: f"{c['H']}x{c['W']}-{c['mask']}")
def test_solve_abcd(case: dict[str, Any]) -> None:
    keys = _k_keys(case)
    assert keys
    for key, k in keys:
        assert list(solve_abcd(case["H"], case["W"], tuple(case["initial_abcd"]), k)) == case[key], key


@pytest.mark.parametrize("case", _ABCD, ids=lambda c: f"{c['H']}x{c['W']}-{c['mask']}")
def test_compute_initial_abcd(case: dict[str, Any]) -> None:
    assert case["mask"] in _ABCD_MASKS, f"mask {case['mask']!r} is not reconstructed in this test"
    mask = _ABCD_MASKS[case["mask"]](case["H"], case["W"])
    assert list(compute_initial_abcd(mask)) == case["initial_abcd"]


# --- spec §12.2 pixel files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(refdata: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = refdata / "image_ops"
    return _png(folder / _INPUT_IMAGE), _png(folder / _INPUT_MASK)


_OUTPUT_FILES = sorted(name for name in _PIXEL_FILES if name not in (_INPUT_IMAGE, _INPUT_MASK))


@pytest.mark.parametrize("output", _OUTPUT_FILES)
def test_pixel_ops_match_fooocus(output: str, inputs: tuple[np.ndarray, np.ndarray], refdata: Path) -> None:
    image, mask = inputs
    description = _PIXEL_FILES[output]
    expected = _png(refdata / "image_ops" / output)
    if m := re.fullmatch(r"erode_or_dilate\(mask, (-?\d+)\)", description):
        got = erode_or_dilate(mask, int(m.group(1)))
    elif description.startswith("morphological_open(mask)"):
        got = morphological_open(mask)
    elif description == "fooocus_fill(image, mask)":
        got = fooocus_fill(image, mask)
    elif m := re.match(r"InpaintWorker\.color_correction\(fg = all (\d+)\)", description):
        assert "mask=morphological_open(mask)" in description
        got = color_correction(image, np.full_like(image, int(m.group(1))), morphological_open(mask))
    else:
        pytest.fail(f"pixel case {output}: {description!r} not understood; extend this test")
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    assert not np.shares_memory(got, image) and not np.shares_memory(got, mask)


def _leading_pad(added: int, selections: list[str], leading: str, trailing: str) -> int:
    """Rows/columns added before the original: all of them, none, or half when both sides pad."""
    if leading not in selections:
        return 0
    return added // 2 if trailing in selections else added


@pytest.mark.parametrize("case", _OUTPAINT, ids=lambda c: "+".join(c["selections"]))
def test_outpaint_padding(case: dict[str, Any], inputs: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = inputs
    assert list(image.shape[:2]) == case["in_HW"]
    result = outpaint_pad(image, mask, case["selections"])
    assert list(result.image.shape[:2]) == case["out_HW"] and list(result.mask.shape) == case["out_HW"]
    assert result.denoise == case["inpaint_strength_after"]
    h, w = image.shape[:2]
    top = _leading_pad(result.image.shape[0] - h, case["selections"], "top", "bottom")
    left = _leading_pad(result.image.shape[1] - w, case["selections"], "left", "right")
    # The original sits unchanged where it was; every new mask pixel has the recorded value.
    np.testing.assert_array_equal(result.image[top:top + h, left:left + w], image)
    np.testing.assert_array_equal(result.mask[top:top + h, left:left + w], mask)
    new_area = np.ones(result.mask.shape, dtype=bool)
    new_area[top:top + h, left:left + w] = False
    assert new_area.any() and (result.mask[new_area] == case["mask_new_area_value"]).all()
    # Edge replication: a padded row/column repeats the nearest original one.
    if top:
        np.testing.assert_array_equal(result.image[0, left:left + w], image[0])
    if left:
        np.testing.assert_array_equal(result.image[top:top + h, 0], image[:, 0])


def test_encode_vae_inpaint_latent_mask_and_grey_fill(inputs: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = inputs
    expected = np.array(_DATA["encode_vae_inpaint"]["latent_mask_12x16"], dtype=np.float32)
    got = latent_mask(mask, expected.shape)
    assert tuple(got.shape) == (1, 1, *expected.shape)
    np.testing.assert_array_equal(got[0, 0].numpy(), expected)
    pixels = grey_filled_pixels(image, mask)[0].permute(1, 2, 0).numpy()
    inside = mask > 127
    assert _DATA["encode_vae_inpaint"]["pixels_fed_to_vae_equal_0.5_inside_mask"] is True
    assert (pixels[inside] == INPAINT_GREY).all()
    np.testing.assert_array_equal(pixels[~inside], image[~inside].astype(np.float32) / 255.0)


# --- parity runs e–g: the same operations on Fooocus's recorded intermediates ----------------------

def _uov_method(folder: Path) -> str | None:
    args = _load(folder / "params.json").get("async_task_args", [])
    methods = [a for a in args if isinstance(a, str) and re.fullmatch(r"(Vary|Upscale) \(.*\)", a)]
    assert len(methods) <= 1, methods
    return methods[0] if methods else None


def _is_vary(folder: Path) -> bool:
    return (_uov_method(folder) or "").startswith("Vary") and (folder / "uov_pixels_before_encode.png").is_file()


def _is_upscale(folder: Path) -> bool:
    return bool(re.fullmatch(r"Upscale \(([\d.]+)x\)", _uov_method(folder) or "")) and \
        (folder / "esrgan0_output.png").is_file() and (folder / "uov_pixels_before_encode.png").is_file()


def _is_inpaint(folder: Path) -> bool:
    return (folder / "inpaint_crop_image.png").is_file() and \
        "inpaint" in _load(folder / "params.json").get("derived", {})


@pytest.mark.parametrize("folder", parity_runs_where("vary", _is_vary))
def test_vary_pixels_matchparity_runs_where(folder: Path) -> None:
    source = _png(folder / "input_image.png")
    h, w = vary_target_hw(*source.shape[:2])
    np.testing.assert_array_equal(resample_image(source, w, h), _png(folder / "uov_pixels_before_encode.png"))


@pytest.mark.parametrize("folder", parity_runs_where("upscale", _is_upscale))
def test_upscale_pixels_matchparity_runs_where(folder: Path) -> None:
    method = _uov_method(folder)
    factor = float(re.fullmatch(r"Upscale \(([\d.]+)x\)", method).group(1))  # type: ignore[arg-type,union-attr]
    source, sr = _png(folder / "input_image.png"), _png(folder / "esrgan0_output.png")
    plan = upscale_plan(*source.shape[:2], factor, sr_scale=sr.shape[0] // source.shape[0])
    assert not plan.direct_return
    h, w = plan.result_hw
    np.testing.assert_array_equal(resample_image(sr, w, h), _png(folder / "uov_pixels_before_encode.png"))


def _default_respective_field(refdata: Path) -> float:
    controls = _load(refdata / "tables" / "webui_controls.json")
    items = controls if isinstance(controls, list) else next(v for v in controls.values() if isinstance(v, list))
    values = {c["value"] for c in items if isinstance(c, dict) and c.get("label") == "Inpaint Respective Field"}
    assert len(values) == 1, values
    return float(values.pop())


@pytest.mark.parametrize("run_g", parity_runs_where("inpaint", _is_inpaint))
def test_inpaint_chain_matchesparity_runs_where(run_g: Path, refdata: Path) -> None:
    """Crop box → ESRGAN crop resize → crop mask → fill → latent mask → paste-back + colour correction."""
    derived = _load(run_g / "params.json")["derived"]["inpaint"]
    image = _png(run_g / "input_image.png")
    mask = _png(run_g / "mask.png")[:, :, 0]  # three equal channels; Fooocus reads channel 0
    np.testing.assert_array_equal(_png(run_g / "inpaint_padded_image.png"), image)  # no outpaint here
    box = solve_abcd(*mask.shape, compute_initial_abcd(mask > 127), _default_respective_field(refdata))
    assert list(box) == derived["interested_area_abcd"]
    a, b, c, d = box
    sr = _png(run_g / "esrgan0_output.png")
    assert get_shape_ceil(b - a, d - c) < 1024 and sr.shape[0] == 4 * (b - a)
    h, w = set_image_shape_ceil_hw(*sr.shape[:2], 1024)
    assert [h, w] == derived["crop_hw_after_resize"]
    crop = resample_image(sr, w, h)
    np.testing.assert_array_equal(crop, _png(run_g / "inpaint_crop_image.png"))
    crop_mask = crop_mask_for_generation(mask[a:b, c:d], h, w)
    np.testing.assert_array_equal(crop_mask, _png(run_g / "inpaint_crop_mask.png"))
    np.testing.assert_array_equal(fooocus_fill(crop, crop_mask), _png(run_g / "inpaint_crop_fill.png"))
    recorded = load_file(str(run_g / "image_inputs.safetensors"))["encode_vae_inpaint0.latent_mask"]
    assert list(recorded.shape[-2:]) == derived["latent_hw"]
    np.testing.assert_array_equal(latent_mask(crop_mask, tuple(recorded.shape[-2:])).numpy(),
                                  recorded.reshape(1, 1, *recorded.shape[-2:]).numpy())
    soft = morphological_open(mask)
    np.testing.assert_array_equal(soft, _png(run_g / "inpaint_soft_mask.png"))
    final = color_correction(image, paste_back(image, _png(run_g / "decoded_crop.png"), box), soft)
    np.testing.assert_array_equal(final, _png(run_g / "image.png"))
