"""Unit: the control-map preprocessors' contract (engine/imaging/preprocessors.py) and the Image Prompt
input preparation (engine/imaging/image_prompt.py); the preprocessor pixel values are checked against Fooocus in tests/golden/test_preprocessors.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from engine.imaging.preprocessors import canny_pyramid, cpds


@pytest.mark.parametrize("fn", [canny_pyramid, cpds])
@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32)], ids=["2d", "rgba", "float"])
def test_rejects_non_rgb_uint8(fn: object, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        fn(bad)  # type: ignore[operator]


@pytest.mark.parametrize("fn", [canny_pyramid, cpds])
def test_flat_image_gives_zero_map_without_nan_warning(fn: object) -> None:
    # A flat image has equal percentiles: the stretch would divide by zero.
    flat = np.full((40, 50, 3), 120, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(flat)  # type: ignore[operator]
    assert out.shape == (40, 50) and out.dtype == np.uint8 and not out.any()


def test_canny_pyramid_finds_an_edge_and_spans_full_range() -> None:
    image = np.zeros((64, 80, 3), np.uint8)
    image[:, 40:] = 255
    out = canny_pyramid(image)
    assert out.shape == (64, 80)
    # The edge is at column 40; away from it there is nothing.
    assert out[:, 36:44].max() == 255 and out[:, :30].max() == 0 and out[:, 50:].max() == 0


def test_ip_adapter_input_is_stretched_to_224() -> None:
    from engine.imaging.convert import hwc3
    from engine.imaging.image_prompt import IP_ADAPTER_SIZE_PX, ip_adapter_input
    from engine.imaging.resize import resample_image

    image = np.random.default_rng(1).integers(0, 256, (90, 300, 4), dtype=np.uint8)
    out = ip_adapter_input(image)
    assert out.shape == (IP_ADAPTER_SIZE_PX, IP_ADAPTER_SIZE_PX, 3)
    # Stretched (mode 0), not cropped: the same as resampling the whole HWC3 image.
    assert np.array_equal(out, resample_image(hwc3(image), IP_ADAPTER_SIZE_PX, IP_ADAPTER_SIZE_PX))


@pytest.mark.parametrize("control_type", ["PyraCanny", "CPDS"])
def test_control_map_fits_generation_size_then_preprocesses(control_type: str) -> None:
    from engine.imaging.image_prompt import control_map
    from engine.imaging.resize import RESIZE_CROP, resize_image

    image = np.random.default_rng(2).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    out = control_map(image, control_type, 96, 64)  # type: ignore[arg-type]
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    fn = canny_pyramid if control_type == "PyraCanny" else cpds
    expected = fn(resize_image(image, 96, 64, RESIZE_CROP))
    assert all(np.array_equal(out[..., c], expected) for c in range(3))
    with pytest.raises(ValueError):
        control_map(image, "Canny", 96, 64)  # type: ignore[arg-type]
