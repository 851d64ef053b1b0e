"""Photograph: BLIP base captioning through transformers (spec §12.5).

Fooocus runs the BLIP repository's caption model (``model_base_caption_capfilt_large.pth``, a
pickle). We run the same network as transformers' ``BlipForConditionalGeneration`` from the
safetensors of ``Salesforce/blip-image-captioning-base`` (transformers' conversion of BLIP's base
capfilt-large caption checkpoint), so no pickle is ever opened.

Preprocessing (:func:`blip_pixels`): uint8 RGB → float 0..1 → bicubic resize to 384×384 (the size is
the checkpoint's ``vision_config.image_size``, 384 for this model) → CLIP normalisation
(:data:`CLIP_MEAN`, :data:`CLIP_STD`). Fooocus resizes the *tensor* with torchvision, which at the
torchvision it shipped with (0.16) did not antialias tensors [guess: the spec says only "bicubic"];
no clamping after the resize.

Generation (:data:`GENERATE_KWARGS`), Fooocus's call ``generate(sample=True, num_beams=1,
max_length=75)`` with BLIP's own defaults for what it leaves out: the text prompt ``"a picture of "``
(its tokens start the decoder; the caption is what follows it), ``min_length=10``, nucleus sampling
``top_p=0.9`` (spec: [guess: top_p 0.9]) and the ``repetition_penalty=1.1`` BLIP's sampling branch
passes. Fooocus does not seed it, so a caption is not reproducible; neither is ours.

Cancel: a stopping criterion checks the cancel token after every generated token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.errors import HooocusError, ModelInvalid, ModelMissing

BLIP_DIR = "describe/blip-image-captioning-base"
#: What set-up installs into BLIP_DIR and loading needs (the tokenizer is BLIP's BERT vocabulary).
BLIP_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")
SETUP_COMMAND = "hooocus setup --only describe"
BLIP_IMAGE_SIZE_PX = 384
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_PROMPT = "a picture of "
GENERATE_KWARGS: dict[str, Any] = {
    "do_sample": True, "num_beams": 1, "max_length": 75, "min_length": 10, "top_p": 0.9,
    "repetition_penalty": 1.1,
}


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU (the engine's rule, engine/sdxl/models/loading.py)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def blip_pixels(rgb: np.ndarray, size_px: int = BLIP_IMAGE_SIZE_PX) -> torch.Tensor:
    """H×W×3 uint8 RGB → 1×3×size×size float32, bicubic (no antialias), CLIP-normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float().div(255.0)[None]
    tensor = torch.nn.functional.interpolate(tensor, size=(size_px, size_px), mode="bicubic", align_corners=False,
                                             antialias=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (tensor - mean) / std


def missing(path: Path) -> ModelMissing:
    return ModelMissing(f"describe (Photograph) needs {path.name} at {path}; run `{SETUP_COMMAND}` to install it",
                        details={"file": path.name, "path": str(path), "setup_command": SETUP_COMMAND})


class _StopOnCancel:
    """A transformers stopping criterion: True for every row once ``is_cancelled()``."""

    def __init__(self, is_cancelled: Callable[[], bool]) -> None:
        self.is_cancelled = is_cancelled
        self.tokens = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.tokens += 1
        return torch.full((input_ids.shape[0],), self.is_cancelled(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Captioner:
    """A loaded BLIP captioner."""

    model: Any
    tokenizer: Any
    device: torch.device
    size_px: int

    @torch.inference_mode()
    def describe(self, rgb: np.ndarray, *, is_cancelled: Callable[[], bool] = lambda: False) -> str:
        from transformers import StoppingCriteriaList

        pixels = blip_pixels(rgb, self.size_px).to(self.device, dtype=next(self.model.parameters()).dtype)
        prompt = self.tokenizer(CAPTION_PROMPT, return_tensors="pt").input_ids.to(self.device)
        stop = _StopOnCancel(is_cancelled)
        out = self.model.generate(pixel_values=pixels, input_ids=prompt,
                                  stopping_criteria=StoppingCriteriaList([stop]), **GENERATE_KWARGS)
        # generate drops the prompt's final [SEP]: the caption starts after the prompt's other tokens.
        caption = out[0, prompt.shape[1] - 1:]
        return str(self.tokenizer.decode(caption, skip_special_tokens=True)).strip()


def load_captioner(folder: Path, device: torch.device | str = "cpu") -> Captioner:
    """BLIP from ``folder`` (safetensors only); missing → ``model_missing`` naming the file."""
    for name in BLIP_FILES:
        if not (folder / name).is_file():
            raise missing(folder / name)
    from transformers import BertTokenizerFast, BlipForConditionalGeneration

    device = torch.device(device)
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(str(folder), local_files_only=True,
                                                             use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelInvalid(f"{folder.name}: not a loadable BLIP captioning model ({str(exc)[:200]})") from None
    except ImportError as exc:
        raise HooocusError(f"describe (Photograph) cannot import transformers' BLIP ({exc})") from None
    model.eval().requires_grad_(False).to(device)
    return Captioner(model=model, tokenizer=tokenizer, device=device,
                     size_px=int(model.config.vision_config.image_size))


class CaptionerCache:
    """The last loaded captioner, reloaded when the weights file or the device changes."""

    def __init__(self, loader: Callable[..., Captioner] = load_captioner) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._key: tuple[str, int, int, str] | None = None
        self._value: Captioner | None = None

    def get(self, folder: Path, device: torch.device | str = "cpu") -> Captioner:
        weights = folder / "model.safetensors"
        try:
            stat = weights.stat()
        except OSError:
            with self._lock:
                self._key, self._value = None, None
            return self._loader(folder, device)  # raises model_missing
        key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
        with self._lock:
            if self._key != key or self._value is None:
                self._key, self._value = None, None
                self._value = self._loader(folder, device)
                self._key = key
            return self._value
