"""FaceSwap's face crop (spec §12.3; issue 16): find the first face, align it to the FFHQ template.

What Fooocus 2.5.5 does (extras/face_crop.py over facexlib's FaceRestoreHelper; facts, not code):
its RetinaFace (resnet50) gives each face's 5 landmarks (the eye on the image's left, the other eye,
the nose tip, the mouth corner on the image's left, the other corner), sorted by confidence; the
first face's landmarks are matched to facexlib's 512×512 FFHQ 5-point template by a partial
(similarity) affine, ``cv2.estimateAffinePartial2D(..., method=LMEDS)``, and the image is warped to
512² with ``cv2.warpAffine`` (bilinear), ``BORDER_CONSTANT`` with the value (135, 133, 132). Fooocus
warps the *BGR* image, so that value is B=135, G=133, R=132: grey-blue (132, 133, 135) in RGB. No face:
the image is used as it is ("No face detected"). The crop then goes on to the usual 224² stretch.

Our detector is OpenCV's YuNet (``cv2.FaceDetectorYN``, the opencv_zoo
``face_detection_yunet_2023mar.onnx``, MIT): OpenCV is already a dependency, the model is a 230 KB
ONNX file (no pickle, nothing executed on load), and it gives the same 5 landmarks in the same order
(its "right eye" is the subject's right, the one on the image's left). What differs from Fooocus:

- the landmarks come from another network, so they sit a few pixels from RetinaFace's, and the crop
  moves with them (a similarity transform: shift, scale, rotation only);
- YuNet is trained for faces of about 10–300 px, so the image is first shrunk (INTER_AREA) to at
  most :data:`DETECT_MAX_SIDE_PX` on its longer side, and the landmarks are scaled back; the warp reads
  the full-resolution image as Fooocus's does;
- a face counts at YuNet's own default score threshold 0.9 (RetinaFace's 0.97 is on another scale).

Pure pixel operations plus a lazily built, thread-safe detector; no torch, nothing on any GPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.core.errors import ModelInvalid
from engine.imaging.convert import hwc3

__all__ = [
    "BORDER_RGB",
    "DETECT_MAX_SIDE_PX",
    "FACE_SIZE_PX",
    "FFHQ_TEMPLATE_512",
    "Face",
    "FaceDetector",
    "YuNetDetector",
    "align_face",
    "crop_face",
    "decode_yunet",
]

log = logging.getLogger(__name__)

#: facexlib's FaceRestoreHelper with upscale_factor 1: a 512×512 crop.
FACE_SIZE_PX = 512
#: facexlib's "standard 5 landmarks for FFHQ faces with 512 x 512" (x, y), in landmark order.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
#: Fooocus's border value (135, 133, 132) is given to a BGR image; the same pixels in RGB order.
BORDER_RGB = (132, 133, 135)
#: The longer side the detector sees (YuNet finds faces of about 10–300 px; see the module docstring).
DETECT_MAX_SIDE_PX = 640
#: YuNet's defaults in OpenCV (score threshold, NMS IoU); the face count is bounded by TOP_K.
SCORE_THRESHOLD = 0.9
NMS_THRESHOLD = 0.3
TOP_K = 50


@dataclass(frozen=True)
class Face:
    """One detected face: its score and 5 landmarks (x, y) in the input image's pixels, in
    :data:`FFHQ_TEMPLATE_512` order."""

    score: float
    landmarks: np.ndarray  # [5, 2] float32


class FaceDetector(Protocol):
    def detect(self, image: np.ndarray) -> list[Face]:
        """The faces of an H×W×3 ``uint8`` RGB image, best score first."""
        ...


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
    """The :data:`FACE_SIZE_PX`² RGB crop of ``image`` whose 5 ``landmarks`` land on the FFHQ template
    (partial affine by LMEDS, bilinear warp, constant border :data:`BORDER_RGB`); None when the landmarks
    determine no transform (e.g. all in one point)."""
    import cv2

    points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    if not np.isfinite(points).all():
        return None
    matrix, _inliers = cv2.estimateAffinePartial2D(points, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
    if matrix is None or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        return None
    # Warping RGB with the border reversed gives the same pixels as Fooocus's BGR warp then flip: the
    # bilinear interpolation works on each channel alone.
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (FACE_SIZE_PX, FACE_SIZE_PX),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


def decode_yunet(rows: np.ndarray | None, *, scale: float = 1.0) -> list[Face]:
    """``cv2.FaceDetectorYN.detect``'s rows (x, y, w, h, 5 landmark pairs, score; None for no face) →
    faces, landmarks divided by ``scale`` (the detection image's size over the input's), best first."""
    if rows is None:
        return []
    table = np.asarray(rows, dtype=np.float32).reshape(-1, 15)
    faces = [Face(score=float(row[14]), landmarks=(row[4:14].reshape(5, 2) / scale).astype(np.float32))
             for row in table if np.isfinite(row).all()]
    return sorted(faces, key=lambda face: -face.score)  # stable: ties keep the detector's order


class YuNetDetector:
    """``cv2.FaceDetectorYN`` over a YuNet ONNX file, built on first use (thread-safe; one OpenCV net,
    whose input size is set per call, so calls take a lock)."""

    def __init__(self, model_path: Path, *, max_side_px: int = DETECT_MAX_SIDE_PX,
                 score_threshold: float = SCORE_THRESHOLD) -> None:
        self.model_path = Path(model_path)
        self.max_side_px = max_side_px
        self.score_threshold = score_threshold
        self._net: object | None = None
        self._lock = threading.Lock()

    def _load(self):  # noqa: ANN202 - a cv2.FaceDetectorYN
        import cv2

        if self._net is None:
            # Read the bytes ourselves: OpenCV's own file reader fails on some non-ASCII paths.
            data = np.frombuffer(self.model_path.read_bytes(), dtype=np.uint8)
            try:
                self._net = cv2.FaceDetectorYN.create("onnx", data, np.zeros(0, np.uint8), (320, 320),
                                                      self.score_threshold, NMS_THRESHOLD, TOP_K)
            except cv2.error as exc:
                raise ModelInvalid(f"{self.model_path.name} is not a YuNet face detector OpenCV can load: "
                                   f"{str(exc).strip().splitlines()[-1][:200]}") from None
        return self._net

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        height, width = image.shape[:2]
        scale = min(1.0, self.max_side_px / max(height, width))
        small = image
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            scale = size[0] / width  # the actual factor after rounding (x; y differs by < 1 px)
        bgr = np.ascontiguousarray(small[:, :, ::-1])  # YuNet, like Fooocus's detector, reads BGR
        with self._lock:
            net = self._load()
            net.setInputSize((bgr.shape[1], bgr.shape[0]))
            try:
                _ok, rows = net.detect(bgr)
            except cv2.error as exc:
                raise ModelInvalid(f"{self.model_path.name} failed on a {width}×{height} image: "
                                   f"{str(exc).strip().splitlines()[-1][:200]}") from None
        return decode_yunet(rows, scale=scale)


def crop_face(image: np.ndarray, detector: FaceDetector, *, loc: tuple[str | int, ...] = ()) -> np.ndarray:
    """FaceSwap's preprocessing before the 224² stretch: HWC3, then the aligned crop of the best face,
    or the image unchanged when there is none (as Fooocus does)."""
    rgb = hwc3(image, loc=loc)
    for face in detector.detect(rgb)[:1]:
        crop = align_face(rgb, face.landmarks)
        if crop is not None:
            return crop
    log.info("FaceSwap: no face detected in %s, using the whole image", ".".join(map(str, loc)) or "the image")
    return rgb
