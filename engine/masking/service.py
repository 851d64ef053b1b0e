"""What a runner calls to make an Enhance mask: the files' places, a bounded model cache, and
``model_missing`` naming the file and the set-up command (spec §12.6, issue 16).

Files (installed by ``hooocus setup --only enhance``; engine/io/setup/catalogue.py ENHANCE_ASSETS),
relative to the models folder:

- ``enhance/grounding-dino-tiny/``: GroundingDINO (config, safetensors, tokenizer, preprocessor);
- ``enhance/sam-vit-base|sam-vit-large|sam-vit-huge/``: SAM vit_b / vit_l / vit_h;
- ``enhance/rembg/<model>.onnx``: the rembg models.

The cache holds at most :data:`MAX_CACHED_MODELS` loaded models (least recently used dropped
first): a job with 5 tabs on 5 different mask models does not keep them all in memory.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.errors import HooocusError, ModelInvalid, ModelMissing

ENHANCE_DIR = "enhance"
GROUNDING_DINO_DIR = f"{ENHANCE_DIR}/grounding-dino-tiny"
SAM_DIRS = {"vit_b": f"{ENHANCE_DIR}/sam-vit-base", "vit_l": f"{ENHANCE_DIR}/sam-vit-large",
            "vit_h": f"{ENHANCE_DIR}/sam-vit-huge"}
REMBG_DIR = f"{ENHANCE_DIR}/rembg"
#: What loading needs in each transformers folder, checked before a job queues (set-up installs these
#: and the processor's config, which transformers writes as preprocessor_config.json or, since 5.x,
#: processor_config.json: either is read, so neither is checked here by name).
GROUNDING_DINO_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
SAM_FILES = ("config.json", "model.safetensors")
SETUP_COMMAND = "hooocus setup --only enhance"
#: SAM vit_l / vit_h are their own set-up groups (1.2 GB / 2.5 GB; engine/io/setup/catalogue.py).
SAM_SETUP_COMMANDS = {"vit_b": SETUP_COMMAND, "vit_l": "hooocus setup --only enhance-sam-vit-l",
                      "vit_h": "hooocus setup --only enhance-sam-vit-h"}
MAX_CACHED_MODELS = 3


@dataclass(frozen=True)
class MaskResult:
    """The tab's raw mask (before erode/dilate/invert) and Fooocus's counts (``None`` for rembg)."""

    mask: np.ndarray  # H×W uint8 0..255
    boxes_found: int | None = None
    masks_made: int | None = None
    masks_applied: int | None = None

    @property
    def nothing_found(self) -> bool:
        """Fooocus skips a ``sam`` pass with no box found or no mask applied."""
        return self.boxes_found == 0 or self.masks_applied == 0


def required_files(models_dir: Path, mask_model: str, sam_model: str) -> list[Path]:
    """The files a tab with this mask model needs."""
    if mask_model == "sam":
        return ([models_dir / GROUNDING_DINO_DIR / name for name in GROUNDING_DINO_FILES]
                + [models_dir / SAM_DIRS[sam_model] / name for name in SAM_FILES])
    return [models_dir / REMBG_DIR / f"{mask_model}.onnx"]


def check_mask_files(models_dir: Path, tabs: list[Any], *, loc_prefix: tuple[str | int, ...] = ("enhance", "tabs")
                     ) -> None:
    """``model_missing`` (file, path, set-up command; loc = the tab's ``mask_model``) before anything queues."""
    for index, tab in enumerate(tabs):
        for path in required_files(models_dir, tab.mask_model, tab.sam_model):
            if not path.is_file():
                command = SAM_SETUP_COMMANDS[tab.sam_model] if path.parent.name.startswith("sam-") else SETUP_COMMAND
                raise ModelMissing(
                    f"enhance mask model {tab.mask_model!r}"
                    f"{' (' + tab.sam_model + ')' if tab.mask_model == 'sam' else ''} needs {path.name} at {path}; "
                    f"run `{command}` to install it",
                    loc=(*loc_prefix, index, "mask_model"),
                    details={"file": path.name, "path": str(path), "setup_command": command})


class MaskGenerator:
    """Loads the mask models on first use (bounded LRU cache) and makes a tab's mask."""

    def __init__(self, models_dir: Path, device: Any) -> None:
        self.models_dir = Path(models_dir)
        self.device = device
        self._cache: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _get(self, key: tuple[str, ...], load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            while len(self._cache) >= MAX_CACHED_MODELS:
                self._cache.popitem(last=False)  # free before loading the next one
        try:
            model = load()
        except HooocusError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types (plain Exceptions) for a broken file
            if type(exc).__name__ == "OutOfMemoryError":
                raise  # the engine's out-of-memory handling needs it as it is
            raise ModelInvalid(f"enhance mask model {key[-1]!r} could not be loaded: {exc}; re-run "
                               f"`{SETUP_COMMAND}`") from None
        with self._lock:
            self._cache[key] = model
        return model

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def make(self, rgb: np.ndarray, tab: Any, *, box_grow_px: int = 0) -> MaskResult:
        """The raw mask of one tab on the H×W×3 uint8 image (see the module docs)."""
        check_mask_files(self.models_dir, [tab])
        if tab.mask_model == "sam":
            from engine.masking.detect import detect_mask, load_grounding_dino, load_sam

            dino = self._get(("dino",), lambda: load_grounding_dino(self.models_dir / GROUNDING_DINO_DIR,
                                                                   self.device))
            sam = self._get(("sam", tab.sam_model), lambda: load_sam(self.models_dir / SAM_DIRS[tab.sam_model],
                                                                    self.device))
            found = detect_mask(rgb, dino, sam, tab.detection_prompt, box_threshold=tab.box_threshold,
                                text_threshold=tab.text_threshold, max_detections=tab.max_detections,
                                box_grow_px=box_grow_px)
            return MaskResult(found.mask, found.boxes_found, found.masks_made, found.masks_applied)
        from engine.masking.rembg import load_rembg, rembg_mask

        path = self.models_dir / REMBG_DIR / f"{tab.mask_model}.onnx"
        use_cuda = str(self.device).startswith("cuda")
        session = self._get(("rembg", tab.mask_model), lambda: load_rembg(path, use_cuda=use_cuda))
        return MaskResult(rembg_mask(session, rgb, tab.mask_model, cloth_category=tab.cloth_category))
