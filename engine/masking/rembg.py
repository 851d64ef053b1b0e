"""The rembg mask models through onnxruntime (spec §12.6; Fooocus calls ``rembg.remove(image,
session=new_session(model), only_mask=True)``, rembg 2.0.x).

What rembg's sessions do (``rembg/sessions/base.py`` ``normalize``, ``u2net.py``, ``isnet.py``,
``u2net_cloth_seg.py``), and what :func:`rembg_mask` does the same way:

- input: the RGB image resized to the model's square size with LANCZOS, divided by its own maximum
  value, then ``(x − mean) / std`` per channel; NCHW float32 batch of one, fed to the first input;
- u2net, u2netp, u2net_human_seg, silueta: 320 px, ImageNet mean/std; isnet-general-use,
  isnet-anime: 1024 px, mean 0.5, std 1.0; output ``[0][:, 0]`` min-max normalised to 0..1, × 255 to
  uint8, resized back to the image size with LANCZOS;
- u2net_cloth_seg: 768 px, ImageNet mean/std; output ``[0]`` has 4 class planes (background, upper,
  lower, full): log-softmax over classes, argmax, the class map (0..3 as uint8) resized back with
  LANCZOS, then the category's class (upper 1, lower 2, full 3) becomes 255 (rembg maps the resized
  class map through a palette, so the edges follow the resampled class values).

ONNX files hold no pickle; a session is built with onnxruntime's own loader only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RembgSpec:
    size_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cloth: bool = False


REMBG_MODELS: dict[str, RembgSpec] = {
    "u2net": RembgSpec(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2netp": RembgSpec(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2net_human_seg": RembgSpec(320, IMAGENET_MEAN, IMAGENET_STD),
    "silueta": RembgSpec(320, IMAGENET_MEAN, IMAGENET_STD),
    "u2net_cloth_seg": RembgSpec(768, IMAGENET_MEAN, IMAGENET_STD, cloth=True),
    "isnet-general-use": RembgSpec(1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
    "isnet-anime": RembgSpec(1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
}
CLOTH_CLASSES = {"upper": 1, "lower": 2, "full": 3}


def rembg_input(rgb: np.ndarray, spec: RembgSpec) -> np.ndarray:
    """H×W×3 uint8 → 1×3×S×S float32 as rembg's ``normalize``."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")
    array = np.asarray(image.resize((spec.size_px, spec.size_px), Image.LANCZOS), dtype=np.float64)
    array = array / max(float(np.max(array)), 1e-12)  # rembg divides by the max (an all-black image: no NaN)
    out = (array - np.array(spec.mean)) / np.array(spec.std)
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None].astype(np.float32))


def _to_image_size(plane: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(plane, mode="L").resize((width_px, height_px), Image.LANCZOS), dtype=np.uint8)


def rembg_mask(session: Any, rgb: np.ndarray, model_name: str, *, cloth_category: str = "full") -> np.ndarray:
    """H×W uint8 mask (0..255) of ``model_name`` on the image."""
    spec = REMBG_MODELS[model_name]
    height, width = rgb.shape[:2]
    input_name = session.get_inputs()[0].name
    out = np.asarray(session.run(None, {input_name: rembg_input(rgb, spec)})[0], dtype=np.float32)
    if spec.cloth:
        shifted = out[0] - out[0].max(axis=0, keepdims=True)  # log-softmax keeps the argmax; shown for parity
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
        classes = _to_image_size(np.argmax(log_prob, axis=0).astype(np.uint8), width, height)
        return (classes == CLOTH_CLASSES[cloth_category]).astype(np.uint8) * 255
    else:
        pred = out[:, 0, :, :]
        low, high = float(pred.min()), float(pred.max())
        pred = (pred - low) / (high - low) if high > low else np.zeros_like(pred)
        plane = (pred[0] * 255).astype(np.uint8)
    return _to_image_size(plane, width, height)


def load_rembg(path: Path, *, use_cuda: bool = False) -> Any:
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    return ort.InferenceSession(str(path),
                                providers=[p for p in providers if p in available] or ["CPUExecutionProvider"])
