"""Art/Anime: the WD14 tagger ``wd-v1-4-moat-tagger-v2`` through onnxruntime (spec §12.5).

Preprocessing (:func:`tagger_input`), as Fooocus feeds the tagger: the RGB image is scaled so its
longer side is the model's input size (each side ``int(side · size / longer)``, LANCZOS), pasted
centred (offsets ``(size − side) // 2``) on a white square of that size, converted to float32 0..255
without normalisation, channels reversed to BGR, batch of one, NHWC. The input size is read from the
model (``inputs[0].shape[1]``; 448 for this model, spec §12.5 [guess]), so a tiny test model runs the
same code. The scores are the model's first output; the text rules are :mod:`engine.describe.text`.

ONNX files hold no pickle; the session is built with onnxruntime's own loader only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.errors import HooocusError, ModelInvalid, ModelMissing
from engine.describe.text import TagTable, parse_tag_csv, select_tags, tags_to_prompt

TAGGER_DIR = "describe/wd-v1-4-moat-tagger-v2"
TAGGER_MODEL_FILE = "model.onnx"
TAGGER_TAGS_FILE = "selected_tags.csv"
SETUP_COMMAND = "hooocus setup --only describe"
#: White padding (Fooocus pastes onto a white square).
PAD_RGB = (255, 255, 255)


def tagger_input(rgb: np.ndarray, size_px: int) -> np.ndarray:
    """H×W×3 uint8 RGB → 1×size×size×3 float32 BGR, aspect kept, white padding (module docstring)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")
    ratio = float(size_px) / max(image.size)
    new_size = tuple(max(1, int(side * ratio)) for side in image.size)
    image = image.resize(new_size, Image.LANCZOS)
    square = Image.new("RGB", (size_px, size_px), PAD_RGB)
    square.paste(image, ((size_px - new_size[0]) // 2, (size_px - new_size[1]) // 2))
    array = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(array[None])


def missing(path: Path) -> ModelMissing:
    return ModelMissing(f"describe (Art/Anime) needs {path.name} at {path}; run `{SETUP_COMMAND}` to install it",
                        details={"file": path.name, "path": str(path), "setup_command": SETUP_COMMAND})


@dataclass
class Tagger:
    """A loaded tagger: the onnxruntime session and its tag table."""

    session: object
    tags: TagTable
    input_name: str
    output_name: str
    size_px: int

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        batch = tagger_input(rgb, self.size_px)
        out = self.session.run([self.output_name], {self.input_name: batch})[0]  # type: ignore[attr-defined]
        return np.asarray(out, dtype=np.float32)[0]

    def describe(self, rgb: np.ndarray) -> str:
        return tags_to_prompt(select_tags(self.tags, self.scores(rgb).tolist()))


def load_tagger(folder: Path, *, use_cuda: bool = False) -> Tagger:
    """The tagger in ``folder`` (model.onnx + selected_tags.csv); missing → ``model_missing``."""
    model_path, tags_path = folder / TAGGER_MODEL_FILE, folder / TAGGER_TAGS_FILE
    for path in (model_path, tags_path):
        if not path.is_file():
            raise missing(path)
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise HooocusError(f"describe (Art/Anime) needs onnxruntime ({exc}); install the project's dependencies") from None
    try:
        tags = parse_tag_csv(tags_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelInvalid(f"{tags_path.name}: not a tagger tag file ({exc})") from None
    # CUDA only when the engine runs on CUDA and this onnxruntime build has it; else the CPU.
    providers = ["CPUExecutionProvider"]
    if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings would flood the log
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a broken file
        raise ModelInvalid(f"{model_path.name}: onnxruntime cannot load it ({str(exc)[:200]})") from None
    first_in, first_out = session.get_inputs()[0], session.get_outputs()[0]
    shape = first_in.shape
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
        raise ModelInvalid(f"{model_path.name}: expected an N×S×S×3 image input, got {shape}")
    width = first_out.shape[-1]
    if isinstance(width, int) and width != len(tags.names):
        raise ModelInvalid(f"{model_path.name} scores {width} tags but {tags_path.name} lists {len(tags.names)}")
    return Tagger(session=session, tags=tags, input_name=first_in.name, output_name=first_out.name,
                  size_px=int(shape[1]))


class TaggerCache:
    """The last loaded tagger (one: there is one such file), reloaded when the file changes."""

    def __init__(self, loader: Callable[..., Tagger] = load_tagger) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._key: tuple[str, int, int, bool] | None = None
        self._value: Tagger | None = None

    def get(self, folder: Path, *, use_cuda: bool = False) -> Tagger:
        model = folder / TAGGER_MODEL_FILE
        try:
            stat = model.stat()
        except OSError:
            with self._lock:
                self._key, self._value = None, None
            return self._loader(folder, use_cuda=use_cuda)  # raises model_missing
        key = (str(model.resolve()), stat.st_size, stat.st_mtime_ns, use_cuda)
        with self._lock:
            if self._key != key or self._value is None:
                self._key, self._value = None, None
                self._value = self._loader(folder, use_cuda=use_cuda)
                self._key = key
            return self._value
