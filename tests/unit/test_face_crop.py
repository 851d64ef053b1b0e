"""Unit: FaceSwap's face crop (engine/imaging/face_crop.py; spec §12.3, issue 16).

The alignment maps the 5 landmarks onto facexlib's FFHQ template; the padding is Fooocus's border
value in the right channel order; no face leaves the image as it is; and the real
``cv2.FaceDetectorYN`` path runs on a tiny YuNet-shaped ONNX graph built here (tests/face_models.py),
including the shrink for large images and a broken model file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.core.errors import HooocusError
from engine.imaging.face_crop import (
    BORDER_RGB,
    DETECT_MAX_SIDE_PX,
    FACE_SIZE_PX,
    FFHQ_TEMPLATE_512,
    Face,
    YuNetDetector,
    align_face,
    crop_face,
    decode_yunet,
)
from tests.face_models import DEMO_COPY, FACE_STRIDE, build_tiny_yunet, cell_landmarks, face_picture, write_tiny_yunet

#: Landmark residual bound for landmarks that ARE a similarity transform of the template: the fit is
#: exact up to float32 rounding of coordinates below ~1000 px (2^-24·1000 ≈ 6e-5 px per coordinate);
#: measured 1.5e-5 px for the transform below, so 1e-3 px leaves a 60× margin and still fails for any
#: wrong point order or template (errors of tens of pixels).
EXACT_FIT_PX = 1e-3


def _similar(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    return ((FFHQ_TEMPLATE_512 - 256.0) @ rotation.T + np.asarray(shift)).astype(np.float32)


class Fixed:
    """A detector that returns given faces (the no-face and several-faces paths)."""

    def __init__(self, faces: list[Face]) -> None:
        self.faces = faces
        self.calls = 0

    def detect(self, image: np.ndarray) -> list[Face]:
        self.calls += 1
        return self.faces


def test_landmarks_land_on_the_template() -> None:
    landmarks = _similar(20.0, 0.3, (400.0, 300.0))
    matrix, _ = cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
    mapped = landmarks.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - FFHQ_TEMPLATE_512).max() < EXACT_FIT_PX
    # The warp itself: a coloured dot at each landmark ends up at that template point of the crop.
    image = np.zeros((600, 800, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(np.rint(landmarks).astype(int), colours, strict=True):
        image[y - 3:y + 4, x - 3:x + 4] = colour  # 7 px here, ~23 px in the crop (scale 1/0.3)
    crop = align_face(image, landmarks)
    assert crop is not None and crop.shape == (FACE_SIZE_PX, FACE_SIZE_PX, 3) and crop.dtype == np.uint8
    for (x, y), colour in zip(np.rint(FFHQ_TEMPLATE_512).astype(int), colours, strict=True):
        assert tuple(crop[y, x]) == colour


def test_border_value_is_fooocus_bgr_value_in_rgb_order() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    landmarks = _similar(0.0, 0.25, (20.0, 20.0))  # a face at the corner: most of the crop is padding
    crop = align_face(image, landmarks)
    assert crop is not None
    assert tuple(crop[0, 0]) == BORDER_RGB == (132, 133, 135)
    # the crop spans image x, y in [-44, 84): 1 - (84/128)² ≈ 57 % of it lies off the image
    assert (crop.reshape(-1, 3) == BORDER_RGB).all(axis=1).mean() > 0.5
    # Fooocus warps the BGR image with (135, 133, 132) and flips back: the very same pixels.
    matrix, _ = cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
    fooocus = cv2.warpAffine(np.ascontiguousarray(image[:, :, ::-1]), matrix, (FACE_SIZE_PX, FACE_SIZE_PX),
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))[:, :, ::-1]
    assert np.array_equal(crop, fooocus)


def test_degenerate_landmarks_give_no_crop() -> None:
    assert align_face(np.zeros((64, 64, 3), np.uint8), np.full((5, 2), 10.0, np.float32)) is None
    assert align_face(np.zeros((64, 64, 3), np.uint8), np.full((5, 2), np.nan, np.float32)) is None


def test_no_face_returns_the_input_and_the_first_face_wins() -> None:
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert np.array_equal(crop_face(image, Fixed([])), image)
    gray = image[:, :, 0]
    assert np.array_equal(crop_face(gray, Fixed([])), np.repeat(gray[:, :, None], 3, axis=2))  # HWC3 first
    first, second = _similar(0.0, 0.1, (20.0, 25.0)), _similar(90.0, 0.1, (50.0, 25.0))
    out = crop_face(image, Fixed([Face(0.95, first), Face(0.91, second)]))
    assert np.array_equal(out, align_face(image, first))
    assert not np.array_equal(out, align_face(image, second))
    # A first face whose landmarks give no transform: the whole image, as with no face.
    assert np.array_equal(crop_face(image, Fixed([Face(0.99, np.zeros((5, 2), np.float32))])), image)


def test_decode_sorts_by_score_scales_back_and_drops_broken_rows() -> None:
    assert decode_yunet(None) == []
    rows = np.zeros((3, 15), np.float32)
    rows[:, 4:14] = np.arange(10, dtype=np.float32)
    rows[:, 14] = (0.91, 0.99, 0.95)
    rows[2, 5] = np.nan
    faces = decode_yunet(rows, scale=0.5)
    assert [f.score for f in faces] == pytest.approx([0.99, 0.91])
    assert np.array_equal(faces[0].landmarks, (np.arange(10, dtype=np.float32) * 2).reshape(5, 2))


@pytest.fixture(scope="module")
def tiny_detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_yunet(tmp_path_factory.mktemp("yunet") / "face_detection_yunet_2023mar.onnx")


def test_real_yunet_path_finds_the_tiny_face(tiny_detector_file: Path) -> None:
    detector = YuNetDetector(tiny_detector_file)
    assert detector.detect(face_picture(100, 130, cell=None)) == []
    (face,) = detector.detect(face_picture(100, 130, cell=(1, 2)))  # not multiples of 32: OpenCV pads
    assert face.score == pytest.approx(1.0)
    # float32 sums over one 32-px cell: the landmarks are the graph's constants to ~1e-5 px.
    assert np.abs(face.landmarks - cell_landmarks(1, 2)).max() < 1e-3
    crop = crop_face(face_picture(100, 130, cell=(1, 2)), detector)
    assert crop.shape == (FACE_SIZE_PX, FACE_SIZE_PX, 3)
    # The white cell fills the template's 16× enlargement: the crop centre is white, the border grey.
    assert tuple(crop[FACE_SIZE_PX // 2, FACE_SIZE_PX // 2]) == (255, 255, 255)


def test_large_images_are_shrunk_for_the_detector_and_landmarks_scaled_back(tiny_detector_file: Path) -> None:
    # 1280×960 is shrunk by exactly 1/2 (to DETECT_MAX_SIDE_PX): a white 64-px block on the 64-px grid
    # becomes the tiny detector's 32-px face cell.
    assert DETECT_MAX_SIDE_PX == 640
    image = face_picture(960, 1280, cell=None)
    image[128:192, 320:384] = 255  # 64-px cell (row 2, col 5)
    (face,) = YuNetDetector(tiny_detector_file).detect(image)
    # INTER_AREA averages whole 2×2 blocks here, so the shrunk cell is exact; the bound is float32 as above.
    assert np.abs(face.landmarks - 2 * cell_landmarks(2, 5)).max() < 1e-3


def test_a_broken_model_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "face_detection_yunet_2023mar.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(HooocusError) as info:
        YuNetDetector(broken).detect(face_picture(64, 64, cell=None))
    assert info.value.code == "model_invalid" and broken.name in info.value.message


def test_the_demo_models_detector_is_the_tiny_graph() -> None:
    import onnx

    assert onnx.load(str(DEMO_COPY)).graph == build_tiny_yunet().graph, "run python -m tests.face_models"
    assert FACE_STRIDE == 32
