"""engine/masking (issue 16, spec §12.6): the region rules, rembg's pre/post-processing on a tiny ONNX
model, GroundingDINO + SAM on tiny random transformers models, the bounded cache and model_missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.core.errors import HooocusError
from engine.core.request import EnhanceTab
from engine.masking.regions import SMALL_REGION_AREA_PX, grow_boxes, optimize_mask, remove_small_regions
from engine.masking.rembg import REMBG_MODELS, rembg_input
from engine.masking.service import MAX_CACHED_MODELS, REMBG_DIR, MaskGenerator, check_mask_files
from tests.enhance_models import install_tiny_enhance_models, write_tiny_rembg


def test_small_holes_are_filled_and_small_islands_removed() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:60, 10:60] = True  # 2500 px object
    mask[30:35, 30:35] = False  # a 25 px hole: filled
    mask[80:90, 80:90] = True  # a 100 px island: removed
    mask[0:25, 75:100] = True  # a 625 px island: kept
    out = optimize_mask(mask)
    assert out[30:35, 30:35].all() and not out[80:90, 80:90].any() and out[0:25, 75:100].all()
    assert out.sum() == 2500 + 625
    # every island small: the largest is kept (segment-anything's rule)
    tiny = np.zeros((50, 50), dtype=bool)
    tiny[0:5, 0:5] = True
    tiny[20:30, 20:30] = True
    kept = remove_small_regions(tiny, SMALL_REGION_AREA_PX, "islands")
    assert kept.sum() == 100 and kept[20:30, 20:30].all()
    with pytest.raises(ValueError):
        remove_small_regions(tiny, 400, "edges")


def test_boxes_grow_and_clip_to_the_image() -> None:
    boxes = np.array([[5.0, 5.0, 20.0, 20.0]], dtype=np.float32)
    assert grow_boxes(boxes, 10, 25, 30).tolist() == [[0.0, 0.0, 25.0, 30.0]]
    assert grow_boxes(boxes, -2, 25, 30).tolist() == [[7.0, 7.0, 18.0, 18.0]]


def test_rembg_input_is_max_scaled_and_normalised() -> None:
    rgb = np.full((10, 20, 3), 100, dtype=np.uint8)
    rgb[..., 2] = 200
    spec = REMBG_MODELS["u2net"]
    x = rembg_input(rgb, spec)
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    # divided by the image's max (200), then ImageNet mean/std per channel
    assert np.allclose(x[0, 0], (0.5 - 0.485) / 0.229, atol=1e-5)
    assert np.allclose(x[0, 2], (1.0 - 0.406) / 0.225, atol=1e-5)
    assert REMBG_MODELS["isnet-general-use"].size_px == 1024 and REMBG_MODELS["u2net_cloth_seg"].cloth


def test_rembg_mask_follows_the_model_output(tmp_path: Path) -> None:
    write_tiny_rembg(tmp_path / REMBG_DIR / "u2net.onnx")
    masks = MaskGenerator(tmp_path, "cpu")
    rgb = np.zeros((48, 64, 3), dtype=np.uint8)
    rgb[:, :32, 0] = 255
    rgb[:, 32:, 2] = 255
    mask = masks.make(rgb, EnhanceTab(mask_model="u2net")).mask
    assert mask.shape == (48, 64) and mask.dtype == np.uint8
    # min-max normalised blue − red: 0 on the red half, 255 on the blue half (LANCZOS rings near the edge)
    assert mask[:, :28].max() <= 5 and mask[:, 36:].min() >= 250


def test_sam_path_finds_boxes_at_threshold_zero_and_none_at_one(tmp_path: Path) -> None:
    install_tiny_enhance_models(tmp_path, rembg_models=())
    masks = MaskGenerator(tmp_path, "cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    found = masks.make(rgb, EnhanceTab(detection_prompt="Face", box_threshold=0.0))
    # the tiny model has 4 queries; a sigmoid score is > 0, so every query is a box and gets a SAM mask
    assert found.boxes_found == 4 and found.masks_made == 4 and found.masks_applied == 4
    assert found.mask.shape == (40, 52) and set(np.unique(found.mask)) <= {0, 255}
    limited = masks.make(rgb, EnhanceTab(detection_prompt="face", box_threshold=0.0, max_detections=1))
    assert limited.masks_applied == 1 and limited.masks_made == 4
    none = masks.make(rgb, EnhanceTab(detection_prompt="face", box_threshold=1.0))
    assert none.boxes_found == 0 and none.nothing_found and not none.mask.any()


def test_missing_files_are_model_missing_with_the_setup_command(tmp_path: Path) -> None:
    tabs = [EnhanceTab(mask_model="u2netp"), EnhanceTab(mask_model="isnet-anime")]
    write_tiny_rembg(tmp_path / REMBG_DIR / "u2netp.onnx")
    with pytest.raises(HooocusError) as caught:
        check_mask_files(tmp_path, tabs)
    err = caught.value
    assert err.code == "model_missing" and err.loc == ("enhance", "tabs", 1, "mask_model")
    assert err.details["file"] == "isnet-anime.onnx" and "hooocus setup --only enhance" in err.message


def test_an_unreadable_model_is_model_invalid(tmp_path: Path) -> None:
    path = tmp_path / REMBG_DIR / "u2netp.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx file")
    with pytest.raises(HooocusError) as caught:
        MaskGenerator(tmp_path, "cpu").make(np.zeros((8, 8, 3), np.uint8), EnhanceTab(mask_model="u2netp"))
    assert caught.value.code == "model_invalid"


def test_the_model_cache_is_bounded(tmp_path: Path) -> None:
    names = ["u2net", "u2netp", "silueta", "u2net_human_seg"]
    assert len(names) > MAX_CACHED_MODELS
    for name in names:
        write_tiny_rembg(tmp_path / REMBG_DIR / f"{name}.onnx")
    masks = MaskGenerator(tmp_path, "cpu")
    rgb = np.zeros((8, 8, 3), np.uint8)
    for name in names:
        masks.make(rgb, EnhanceTab(mask_model=name))
    assert len(masks._cache) == MAX_CACHED_MODELS and ("rembg", "u2net") not in masks._cache


class _FakeSession:
    """An onnxruntime-like session returning fixed outputs (the post-processing is what is tested)."""

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        self.fed: dict[str, np.ndarray] = {}

    def get_inputs(self) -> list[object]:
        return [type("Input", (), {"name": "input.1"})()]

    def run(self, names: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.fed = feed
        return [self.out]


def test_cloth_segmentation_picks_the_category_class() -> None:
    from engine.masking.rembg import rembg_mask

    size = REMBG_MODELS["u2net_cloth_seg"].size_px
    logits = np.zeros((1, 4, size, size), np.float32)
    logits[0, 1, : size // 2] = 5.0  # upper half: class 1 (upper)
    logits[0, 2, size // 2:] = 5.0  # lower half: class 2 (lower)
    session = _FakeSession(logits)
    rgb = np.zeros((40, 30, 3), np.uint8)
    upper = rembg_mask(session, rgb, "u2net_cloth_seg", cloth_category="upper")
    lower = rembg_mask(session, rgb, "u2net_cloth_seg", cloth_category="lower")
    full = rembg_mask(session, rgb, "u2net_cloth_seg", cloth_category="full")
    assert session.fed["input.1"].shape == (1, 3, 768, 768)
    assert upper.shape == (40, 30) and set(np.unique(upper)) <= {0, 255}
    assert (upper[:18] == 255).all() and (upper[22:] == 0).all()
    assert (lower[22:] == 255).all() and (lower[:18] == 0).all() and not full.any()
