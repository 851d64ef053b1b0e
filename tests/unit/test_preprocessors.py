"""Unit: the control-map preprocessors' contract (engine/imaging/preprocessors.py); the pixel values
are checked against Fooocus in tests/golden/test_preprocessors.py."""

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
