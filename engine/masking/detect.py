"""GroundingDINO boxes + SAM masks through transformers (spec §12.6 mask model ``sam``).

Fooocus 2.5.5 (``extras/inpaint_mask.py`` ``generate_mask_from_image``, ``extras/GroundingDINO``,
``extras/sam``) runs its vendored GroundingDINO Swin-T OGC and segment-anything from pickles. We run
the same networks as transformers ports them, from safetensors:

- **GroundingDINO** (``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``, the
  ``IDEA-Research/grounding-dino-tiny`` checkpoint = Swin-T OGC): the caption is lower-cased,
  stripped and ends with ``"."`` (GroundingDINO's ``preprocess_caption``); a query is kept when its
  best token score (sigmoid) is above the box threshold, and its phrase is built from the tokens
  above the text threshold (the processor's ``post_process_grounded_object_detection`` does both);
  boxes come back as xyxy pixels of the image. The processor's own resize/normalisation
  (shortest side 800, longest 1333, ImageNet mean/std) is GroundingDINO's transform.
- optional box grow/shrink (Fooocus's ``dino_erode_or_dilate``), clipped to the image;
- **SAM** (``SamModel`` + ``SamProcessor``; ``facebook/sam-vit-base|large|huge`` for vit_b/l/h): all
  boxes as prompts of the one image, ``multimask_output=False``, logits > 0 at the image's size
  (``post_process_masks``); each mask gets small holes and islands (< 400 px) removed
  (:func:`engine.masking.regions.optimize_mask`); the first ``max_detections`` masks (0 = all) are
  united.

Counts as Fooocus reports them: boxes found, SAM masks made, masks applied. Fooocus skips the pass
when no box was found or no mask was applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.masking.regions import grow_boxes, optimize_mask, union_to_uint8


@dataclass(frozen=True)
class Detection:
    """One mask and what made it (Fooocus logs the three counts)."""

    mask: np.ndarray  # H×W uint8, 0/255
    boxes_found: int
    masks_made: int
    masks_applied: int


def dino_caption(text: str) -> str:
    """GroundingDINO's caption rule: lower case, stripped, ending with '.'."""
    caption = text.lower().strip()
    return caption if caption.endswith(".") else caption + "."


@dataclass
class GroundingDino:
    model: Any
    processor: Any
    device: Any

    def boxes(self, rgb: np.ndarray, text: str, *, box_threshold: float, text_threshold: float) -> np.ndarray:
        """xyxy pixel boxes (N×4 float32) of what ``text`` names in the image."""
        import torch
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")
        inputs = self.processor(images=image, text=dino_caption(text), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
            target_sizes=[(rgb.shape[0], rgb.shape[1])])[0]
        return result["boxes"].detach().float().cpu().numpy().reshape(-1, 4)


@dataclass
class Sam:
    model: Any
    processor: Any
    device: Any

    def masks(self, rgb: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """One bool H×W mask per xyxy box."""
        import torch

        if len(boxes) == 0:
            return []
        inputs = self.processor(images=np.ascontiguousarray(rgb[..., :3]), input_boxes=[boxes.tolist()],
                                return_tensors="pt")
        original_sizes, reshaped = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs, multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.float().cpu(), original_sizes, reshaped, mask_threshold=0.0, binarize=True)[0]
        return [masks[i, 0].numpy().astype(bool) for i in range(masks.shape[0])]


def detect_mask(rgb: np.ndarray, dino: GroundingDino, sam: Sam, text: str, *, box_threshold: float,
                text_threshold: float, max_detections: int, box_grow_px: int = 0) -> Detection:
    """The module docstring's steps on one H×W×3 uint8 image."""
    height, width = rgb.shape[:2]
    boxes = dino.boxes(rgb, text, box_threshold=box_threshold, text_threshold=text_threshold)
    boxes = grow_boxes(boxes, box_grow_px, width, height)
    masks = [optimize_mask(mask) for mask in sam.masks(rgb, boxes)]
    keep = len(masks) if max_detections == 0 else min(len(masks), max_detections)
    applied = masks[:keep]
    return Detection(mask=union_to_uint8(applied, height, width), boxes_found=len(boxes),
                     masks_made=len(masks), masks_applied=len(applied))


def load_grounding_dino(folder: Path, device: Any, dtype: Any = None) -> GroundingDino:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    processor = GroundingDinoProcessor.from_pretrained(str(folder), local_files_only=True)
    model = GroundingDinoForObjectDetection.from_pretrained(str(folder), local_files_only=True,
                                                            use_safetensors=True)
    return GroundingDino(model=model.to(device).eval(), processor=processor, device=device)


def load_sam(folder: Path, device: Any) -> Sam:
    from transformers import SamModel, SamProcessor

    processor = SamProcessor.from_pretrained(str(folder), local_files_only=True)
    model = SamModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return Sam(model=model.to(device).eval(), processor=processor, device=device)
