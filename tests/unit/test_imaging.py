"""Unit: engine/imaging and engine/sdxl/models/inpaint behaviour the golden data do not cover.

Input normalisation (palette, CMYK, 16-bit, alpha), invert/merge/empty masks, resize-mode geometry,
argument checks and the patch-file loader's refusals. Expected values here follow from the rule
under test (stated per test), not from Fooocus data.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core.errors import InvalidRequest
from engine.imaging.convert import hwc3, mask_to_2d, pil_to_rgb, uint16_to_uint8
from engine.imaging.inpaint import color_correction, compute_initial_abcd, paste_back, solve_abcd
from engine.imaging.latent_mask import grey_filled_pixels, latent_mask
from engine.imaging.masks import (
    erode_or_dilate,
    invert_mask,
    merge_masks,
    morphological_open,
    needs_inpaint,
    outpaint_pad,
)
from engine.imaging.resize import RESIZE_CROP, RESIZE_FILL, RESIZE_JUST, resample_image, resize_image
from engine.imaging.sizes import set_image_shape_ceil_hw, upscale_plan, vae_encode_crop_box
from engine.sdxl.models.inpaint import (
    InpaintDenoiser,
    energy_seed,
    fooocus_patches_from_state_dict,
    inpaint_head_feature,
)


def _roundtrip(image: Image.Image, fmt: str = "PNG") -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return Image.open(io.BytesIO(buffer.getvalue()))


# --- HWC3 / decoding ---------------------------------------------------------------------------

def test_hwc3_greyscale_and_single_channel_repeat() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for given in (grey, grey[:, :, None]):
        out = hwc3(given)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        assert (out == grey[:, :, None]).all()


def test_hwc3_rgb_is_a_copy() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = hwc3(rgb)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


def test_hwc3_alpha_composites_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 100, 200, 128]]], dtype=np.uint8)
    out = hwc3(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent → white
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque → its colour
    a = np.float32(128) / np.float32(255)
    expected = [int(np.float32(c) * a + np.float32(255) * (np.float32(1) - a)) for c in (0, 100, 200)]
    assert out[0, 2].tolist() == expected  # float32 blend, truncated


def test_hwc3_sixteen_bit_scales_instead_of_clipping() -> None:
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert hwc3(wide)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert uint16_to_uint8(np.array([128, 129], dtype=np.uint16)).tolist() == [0, 1]  # round half up at 128.5/257


def test_hwc3_bool_mask_becomes_0_255() -> None:
    assert hwc3(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize("bad", [np.zeros((2, 2), np.float32), np.zeros((2, 2, 2), np.uint8),
                                 np.zeros((0, 3, 3), np.uint8), np.zeros((2, 2, 3, 1), np.uint8)])
def test_hwc3_rejects_with_field_path(bad: np.ndarray) -> None:
    with pytest.raises(InvalidRequest) as info:
        hwc3(bad, loc=("image", "input_image"))
    assert info.value.code == "invalid_request" and info.value.loc == ("image", "input_image")


def test_pil_palette_with_transparency_is_composited_over_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    out = pil_to_rgb(_roundtrip(palette))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    del palette.info["transparency"]
    assert pil_to_rgb(_roundtrip(palette))[0, 1].tolist() == [0, 0, 255]


def test_pil_cmyk_uses_pillows_rgb_conversion() -> None:
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = pil_to_rgb(_roundtrip(cmyk, "JPEG"))
    expected = np.asarray(_roundtrip(cmyk, "JPEG").convert("RGB"))
    np.testing.assert_array_equal(out, expected)
    assert out.shape == (2, 3, 3)


def test_pil_sixteen_bit_png_is_scaled() -> None:
    wide = Image.fromarray(np.array([[0, 1000, 40000, 65535]], dtype=np.uint16))
    decoded = _roundtrip(wide)
    assert decoded.mode.startswith("I")
    out = pil_to_rgb(decoded)
    assert out[0, :, 0].tolist() == [0, 4, 156, 255]  # round(v / 257); a plain convert would clip to 255
    assert (out[:, :, 0] == out[:, :, 2]).all()


def test_pil_grey_alpha_and_one_bit() -> None:
    la = Image.new("LA", (1, 1), (50, 0))
    assert pil_to_rgb(_roundtrip(la)).tolist() == [[[255, 255, 255]]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert pil_to_rgb(_roundtrip(one))[0, :, 0].tolist() == [0, 255]


def test_pil_unsupported_mode_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="unsupported image mode"):
        pil_to_rgb(Image.new("F", (2, 2)), loc=("input_image",))


def test_mask_to_2d_drops_alpha_before_reading_channel_0() -> None:
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = [255, 255, 255, 255]  # a white stroke; the rest is transparent black
    assert mask_to_2d(rgba).tolist() == [[0, 255]]  # HWC3 would have turned the transparent pixel white
    assert mask_to_2d(np.array([[[9, 1, 2]]], dtype=np.uint8)).tolist() == [[9]]


# --- masks ---------------------------------------------------------------------------------------

def test_invert_mask() -> None:
    mask = np.array([[0, 100, 255]], dtype=np.uint8)
    assert invert_mask(mask).tolist() == [[255, 155, 0]]
    np.testing.assert_array_equal(invert_mask(invert_mask(mask)), mask)


def test_merge_masks_thresholds_only_the_upload() -> None:
    drawn = np.array([[0, 60, 0, 200]], dtype=np.uint8)
    upload = np.array([[127, 0, 128, 0]], dtype=np.uint8)
    assert merge_masks(drawn, upload).tolist() == [[0, 60, 255, 200]]
    assert merge_masks(drawn, None).tolist() == drawn.tolist()
    with pytest.raises(ValueError, match="shapes differ"):
        merge_masks(drawn, upload[:, :2])


def test_empty_mask_paths() -> None:
    empty = np.zeros((6, 8), dtype=np.uint8)
    assert not needs_inpaint(empty)
    assert needs_inpaint(empty, ["left"])
    assert needs_inpaint(np.full((1, 1), 128, np.uint8)) and not needs_inpaint(np.full((1, 1), 127, np.uint8))
    assert (morphological_open(empty) == 0).all()
    assert compute_initial_abcd(empty) == (0, 6, 0, 8)
    np.testing.assert_array_equal(erode_or_dilate(empty, 0), empty)


def test_morphological_open_falls_off_by_8_per_pixel() -> None:
    mask = np.zeros((1, 80), dtype=np.uint8)
    mask[0, 0] = 255
    soft = morphological_open(mask)
    # 256 at the mask, minus 8 per 3×3 dilation step, clipped to 255; 32 steps reach distance 32.
    assert soft[0, :4].tolist() == [255, 248, 240, 232] and soft[0, 32] == 0 and soft[0, 31] == 8


def test_outpaint_rejects_unknown_direction_and_size_mismatch() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown outpaint"):
        outpaint_pad(image, np.zeros((10, 10), np.uint8), ["up"])
    with pytest.raises(ValueError, match="sizes differ"):
        outpaint_pad(image, np.zeros((9, 10), np.uint8), ["left"])
    unchanged = outpaint_pad(image, np.zeros((10, 10), np.uint8), [])
    assert unchanged.image.shape == (10, 10, 3) and not unchanged.mask.any()


# --- crop box, paste-back, colour correction -------------------------------------------------------

def test_solve_abcd_checks_k_and_keeps_a_box_that_fits() -> None:
    with pytest.raises(ValueError):
        solve_abcd(10, 10, (0, 5, 0, 5), 1.5)
    assert solve_abcd(10, 10, (2, 7, 2, 7), 0.0) == (2, 7, 2, 7)
    assert solve_abcd(10, 20, (2, 7, 2, 7), 1.0) == (0, 10, 0, 20)


def test_paste_back_touches_only_the_box_and_color_correction_weights() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    out = paste_back(image, np.full((16, 16, 3), 200, np.uint8), (2, 6, 1, 5))
    assert (out[2:6, 1:5] == 200).all() and out.sum() == 200 * 16 * 3 and not image.any()
    soft = np.zeros((8, 8), np.uint8)
    soft[0, 0], soft[0, 1] = 255, 0
    blended = color_correction(image, np.full_like(image, 90), soft)
    assert blended[0, 0].tolist() == [90, 90, 90] and blended[0, 1].tolist() == [0, 0, 0]


# --- sizes and resize modes ------------------------------------------------------------------------

def test_size_argument_checks() -> None:
    with pytest.raises(ValueError):
        set_image_shape_ceil_hw(0, 10, 1024)
    with pytest.raises(ValueError):
        upscale_plan(10, 10, 0)
    with pytest.raises(ValueError):
        resample_image(np.zeros((2, 2, 3), np.uint8), 0, 2)
    with pytest.raises(ValueError):
        resize_image(np.zeros((2, 2, 3), np.uint8), 2, 2, 3)
    assert vae_encode_crop_box(13, 21) == (2, 10, 2, 18)  # offsets (13 % 8)//2 and (21 % 8)//2


def _halves(height: int, width: int) -> np.ndarray:
    """Left half black, right half white, with a distinct top and bottom row."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2:] = 255
    image[0], image[-1] = 60, 120
    return image


def test_resize_modes_geometry() -> None:
    image = _halves(20, 40)
    assert resize_image(image, 10, 10, RESIZE_JUST).shape == (10, 10, 3)
    # Crop: scale to cover (10×20) and keep the centre 10×10, so both halves stay visible.
    crop = resize_image(image, 10, 10, RESIZE_CROP)
    assert crop.shape == (10, 10, 3)
    assert crop[5, 1].max() < 40 and crop[5, 8].min() > 215
    # Fill: fit to 20×10, centred with 5-row bands above and below that repeat the edge rows.
    fill = resize_image(image, 20, 20, RESIZE_FILL)
    fitted = resample_image(image, 20, 10)
    np.testing.assert_array_equal(fill[5:15], fitted)
    assert (fill[:5] == fitted[0]).all() and (fill[15:] == fitted[-1]).all()
    tall = resize_image(image.transpose(1, 0, 2).copy(), 20, 20, RESIZE_FILL)
    assert (tall[:, :5] == tall[:, 5:6]).all()


# --- latent side ---------------------------------------------------------------------------------

def test_latent_mask_resizes_odd_sizes_and_grey_fill_threshold() -> None:
    mask = np.zeros((20, 36), np.uint8)
    mask[0:3, 0:3] = 255
    got = latent_mask(mask, (2, 4))
    assert tuple(got.shape) == (1, 1, 2, 4) and got[0, 0, 0, 0] == 1 and got.sum() == 1
    pixels = grey_filled_pixels(np.full((1, 2, 3), 255, np.uint8), np.array([[127, 128]], np.uint8))
    assert pixels[0, :, 0, 0].tolist() == [1.0] * 3 and pixels[0, :, 0, 1].tolist() == [0.5] * 3


# --- engine.sdxl.models.inpaint ----------------------------------------------------------------------

def test_energy_seed_wraps_at_max_seed() -> None:
    assert energy_seed(2**63 - 2) == 0 and energy_seed(0) == 1


def test_denoiser_accepts_scalar_and_batch_sigma() -> None:
    known = torch.zeros(2, 4, 2, 2)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1
    x = torch.ones(2, 4, 2, 2)
    a = InpaintDenoiser(known, mask, 7, scaling_factor=0.5)(lambda v: v, x, torch.tensor([2.0, 2.0]))
    b = InpaintDenoiser(known, mask, 7, scaling_factor=0.5)(lambda v: v, x, 2.0)
    torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)
    assert (a[..., 0, 0] == 1).all() and (a[..., 1, 1] == 0).all()


def test_inpaint_head_feature_pads_by_replication() -> None:
    feed = torch.full((1, 5, 3, 4), 2.0)
    weight = torch.randn(320, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    feature = inpaint_head_feature(feed, weight)
    assert feature.shape == (1, 320, 3, 4)
    # A constant input stays constant at the border only with replicate padding (zeros would dim it).
    expected = (2.0 * weight.sum(dim=(1, 2, 3)))[None, :, None, None].expand_as(feature)
    torch.testing.assert_close(feature, expected, atol=1e-4, rtol=1e-5)


def test_fooocus_patch_loader_refuses_partial_files() -> None:
    w = torch.zeros(2, 2, dtype=torch.uint8)
    lo, hi = torch.zeros(2, 1), torch.ones(2, 1)
    with pytest.raises(ValueError, match="lacks"):
        fooocus_patches_from_state_dict({"k::w": w, "k::min": lo})
    with pytest.raises(ValueError, match="not a fooocus patch"):
        fooocus_patches_from_state_dict({"k.weight": w})
    with pytest.raises(ValueError, match="uint8"):
        fooocus_patches_from_state_dict({"k::w": w.float(), "k::min": lo, "k::max": hi})
    assert set(fooocus_patches_from_state_dict({"a::w": w, "a::min": lo, "a::max": hi})) == {"a"}
