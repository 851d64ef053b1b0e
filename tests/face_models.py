"""A tiny YuNet-shaped face detector for the tests and the demo model (issue 16), built from config with
the ``onnx`` helper API, so ``cv2.FaceDetectorYN`` runs its real code (load, pad, forward, decode, NMS).

The network has YuNet's input (``input``, 1×3×H×W BGR 0..255) and its 12 outputs (``cls``/``obj``/
``bbox``/``kps`` at strides 8, 16, 32, each ``[1, cells, channels]`` in row-major cell order). Every
head is an average pool over the stride's cell and a 1×1 convolution:

- ``cls`` at stride 32 is the cell's mean brightness (0..1); at strides 8 and 16 it is 0, and ``obj``
  is 1 everywhere, so a face's score is sqrt(brightness): only a 32-px cell (aligned to the 32-px grid)
  brighter than 0.81·255 ≈ 207 on average passes OpenCV's 0.9 threshold: a "face";
- ``kps`` puts the 5 landmarks at the FFHQ template shrunk into that cell (template / 512 of a cell),
  so the face crop maps the cell onto the whole 512² crop (16× up);
- ``bbox`` is the cell itself.

``python -m tests.face_models`` rewrites the demo model's copy (engine/sdxl/models/demo_data); a test
checks that copy is this graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.imaging.face_crop import FFHQ_TEMPLATE_512

STRIDES = (8, 16, 32)
FACE_STRIDE = 32
HEADS = (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10))
DEMO_COPY = Path(__file__).resolve().parents[1] / "engine" / "sdxl" / "models" / "demo_data" / "face_yunet_tiny.onnx"


def cell_landmarks(row: int, col: int) -> np.ndarray:
    """The 5 landmarks (x, y) the tiny detector gives for a face in 32-px cell (row, col)."""
    return ((FFHQ_TEMPLATE_512 / 512.0 + np.array([col, row], dtype=np.float32)) * FACE_STRIDE).astype(np.float32)


def build_tiny_yunet():  # noqa: ANN201 - an onnx.ModelProto
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes, inits, outputs = [], [], {}
    for stride in STRIDES:
        pooled = f"pool_{stride}"
        nodes.append(helper.make_node("AveragePool", ["input"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        for head, channels in HEADS:
            weight = np.zeros((channels, 3, 1, 1), np.float32)
            bias = np.zeros(channels, np.float32)
            if head == "cls" and stride == FACE_STRIDE:
                weight[:] = 1.0 / (3 * 255.0)
            elif head == "obj":
                bias[:] = 1.0
            elif head == "bbox":
                bias[:] = (0.5, 0.5, 0.0, 0.0)  # centre of the cell, exp(0)·stride wide and high
            elif head == "kps":
                bias[:] = (FFHQ_TEMPLATE_512 / 512.0).reshape(-1)
            name = f"{head}_{stride}"
            inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b"),
                      numpy_helper.from_array(np.array([1, -1, channels], np.int64), f"{name}_shape")]
            nodes += [helper.make_node("Conv", [pooled, f"{name}_w", f"{name}_b"], [f"{name}_conv"], kernel_shape=[1, 1]),
                      helper.make_node("Transpose", [f"{name}_conv"], [f"{name}_nhwc"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [f"{name}_nhwc", f"{name}_shape"], [name])]
            outputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, channels])
    order = [f"{head}_{stride}" for head, _ in HEADS for stride in STRIDES]
    graph = helper.make_graph(nodes, "tiny_yunet",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, None, None])],
                              [outputs[name] for name in order], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hooocus-tests",
                              producer_version="1")
    model.ir_version = 8
    checker.check_model(model)
    return model


def write_tiny_yunet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_tiny_yunet().SerializeToString())
    return path


def face_picture(height_px: int, width_px: int, *, cell: tuple[int, int] | None, background: int = 40) -> np.ndarray:
    """A dark picture with, when ``cell`` is given, one white 32-px cell (the tiny detector's face)."""
    image = np.full((height_px, width_px, 3), background, np.uint8)
    if cell is not None:
        row, col = cell
        image[row * FACE_STRIDE:(row + 1) * FACE_STRIDE, col * FACE_STRIDE:(col + 1) * FACE_STRIDE] = 255
    return image


if __name__ == "__main__":
    print(write_tiny_yunet(DEMO_COPY))
