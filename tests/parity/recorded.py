"""Reading the end-to-end parity folder (``$HOOOCUS_PARITY``, default ../shared/parity): its runs
(``runs/`` and ``runs-extra/``), their recorded Fooocus parameters as a public ``GenerationRequest``
(image inputs from the run folder as data URIs), the extra weights the runs name, and the README's
error measures."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.request import GenerationRequest
from tests.paths import parity_dir

#: The folders of recorded runs inside the parity folder (README "Contents"): text-to-image a–d and
#: the image-input / LoRA / FreeU runs e–h, same file layout.
RUN_FOLDERS = ("runs", "runs-extra")
#: Files of an image run (README "Extra files of image runs"): exactly the arrays given to Fooocus.
INPUT_IMAGE_FILE = "input_image.png"
MASK_FILE = "mask.png"
#: README "Image-input and LoRA/FreeU runs": unset inpaint options are the tab's defaults.
FOOOCUS_INPAINT_MODE_DEFAULT = "Inpaint or Outpaint (default)"
#: Positions in ``async_task_args`` (Fooocus 2.5.5 webui ``ctrls`` order) of overwrite_step, _width,
#: _height: runs e–h record the size only there ("how_set": "overwrite_width/height").
ARG_OVERWRITE_STEP, ARG_OVERWRITE_WIDTH, ARG_OVERWRITE_HEIGHT = 50, 52, 53


def run_folders() -> tuple[str, ...]:
    """The parity folder's subfolders to run: $HOOOCUS_PARITY_SETS (names separated by spaces or
    commas), default every one of RUN_FOLDERS. scripts/test narrows it while a set is not yet
    verified end to end on CI (see the comment there)."""
    given = os.environ.get("HOOOCUS_PARITY_SETS", "").replace(",", " ").split()
    unknown = sorted(set(given) - set(RUN_FOLDERS))
    if unknown:
        raise ValueError(f"HOOOCUS_PARITY_SETS names unknown run folders {unknown}; known: {list(RUN_FOLDERS)}")
    return tuple(given) or RUN_FOLDERS


def max_side_px_budget() -> int | None:
    """$HOOOCUS_PARITY_MAX_SIDE_PX: runs generating above this side length are skipped (None: run all).

    Why: a 1024² image run costs 13–26 min of job time on 2 cores (session 4: e 785 s, f 1,559 s,
    g 1,160 s), against ~2 min for a 256² run, so CI's time budget holds the 256² runs only; the
    skip names this variable, so nobody mistakes a skipped run for a passing one."""
    given = os.environ.get("HOOOCUS_PARITY_MAX_SIDE_PX", "").strip()
    if not given:
        return None
    if not given.isdigit() or int(given) <= 0:
        raise ValueError(f"HOOOCUS_PARITY_MAX_SIDE_PX must be a positive whole number of pixels, not {given!r}")
    return int(given)


def generation_side_px(run: Path) -> int:
    """The longer side of the image Fooocus sampled in this run (``params.json`` → ``derived``)."""
    derived = json.loads((run / "params.json").read_text(encoding="utf-8"))["derived"]
    return max(int(derived["width"]), int(derived["height"]))


def parity_runs() -> list[Path]:
    """Every ``runs/<name>/`` and ``runs-extra/<name>/`` (those of ``run_folders()``) holding a
    ``params.json``, sorted by name (read at collection time; no run is named, so another parity
    folder works unchanged)."""
    root = parity_dir()
    found = [p.parent for sub in run_folders() if (root / sub).is_dir() for p in (root / sub).glob("*/params.json")]
    return sorted(found, key=lambda p: p.name)


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` image reference (contract 14, "Image references")."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def lora_names(params: dict[str, Any]) -> list[str]:
    """The LoRA files a run's user parameters name (Fooocus's "None" slots left out)."""
    return [name for name, _weight in params["user_parameters"].get("loras", []) if name != "None"]


def _size(params: dict[str, Any]) -> tuple[int | None, int | None]:
    """The user's generation size: ``user_parameters`` width/height, else the AsyncTask's overwrite_width/
    height (> 0), else None (image tasks size from the image; README quirk 2)."""
    u, args = params["user_parameters"], params.get("async_task_args") or []
    if "width" in u:
        return u["width"], u["height"]
    if len(args) > ARG_OVERWRITE_HEIGHT:
        # the positions are checked on the one value user_parameters repeats, the steps
        assert args[ARG_OVERWRITE_STEP] == u["steps"], "async_task_args is not in Fooocus 2.5.5's ctrls order"
        width, height = args[ARG_OVERWRITE_WIDTH], args[ARG_OVERWRITE_HEIGHT]
        if width > 0 and height > 0 and u.get("input_image_tab") is None:
            return width, height
    return None, None


def request_for(params: dict[str, Any], base_model: str, run: Path) -> GenerationRequest:
    """The recorded Fooocus ``user_parameters`` of a run as a public request (metadata off, as recorded).

    Image runs: ``input_image`` / ``mask`` are the run folder's ``input_image.png`` / ``mask.png`` (the
    arrays Fooocus got; the drawn mask of the inpaint tab), sizes come from the image (Fooocus ignores
    width/height for image tasks, README quirk 2), ``overwrite_switch`` is the refiner switch step.
    """
    u = params["user_parameters"]
    width, height = _size(params)
    fields: dict[str, Any] = {
        "prompt": u["prompt"], "negative_prompt": u["negative_prompt"], "styles": list(u["style_selections"]),
        "performance": u["performance"], "steps": u["steps"], "width": width, "height": height,
        "seed": u["seed"], "cfg": u["cfg_scale"], "sharpness": u["sharpness"], "sampler": u["sampler"],
        "scheduler": u["scheduler"], "adm_scaler_positive": u["adm_scaler_positive"],
        "adm_scaler_negative": u["adm_scaler_negative"], "adm_scaler_end": u["adm_scaler_end"],
        "adaptive_cfg": u["adaptive_cfg"], "clip_skip": u["clip_skip"], "base_model": base_model,
        "refiner_model": None if u["refiner"] == "None" else u["refiner"],
        "refiner_swap_method": u.get("refiner_swap_method", "joint"),
        "loras": [{"name": name, "weight": weight} for name, weight in u.get("loras", []) if name != "None"],
        "vae": None if u["vae"] == "Default (model)" else u["vae"],
        "image_number": u["image_number"], "output_format": u["output_format"], "metadata_scheme": "none"}
    if u.get("freeu"):
        b1, b2, s1, s2 = u.get("freeu_b1_b2_s1_s2", (None,) * 4)
        fields["freeu"] = {"enabled": True} if b1 is None else {"enabled": True, "b1": b1, "b2": b2, "s1": s1, "s2": s2}
    if u.get("overwrite_switch", -1) > 0:
        fields["refiner_switch_step"] = u["overwrite_switch"]
    tab = u.get("input_image_tab")
    if tab is not None:
        fields["input_image"] = data_uri(run / INPUT_IMAGE_FILE)
    if tab == "uov":
        fields["uov_method"] = u["uov_method"]
        for ours, theirs in (("vary_strength", "overwrite_vary_strength"),
                             ("upscale_strength", "overwrite_upscale_strength")):
            if u.get(theirs, -1) > 0:
                fields[ours] = u[theirs]
    elif tab == "inpaint":
        if (run / MASK_FILE).is_file():
            fields["inpaint_mask"] = data_uri(run / MASK_FILE)
        fields["inpaint_mode"] = u.get("inpaint_mode", FOOOCUS_INPAINT_MODE_DEFAULT)
        for key in ("outpaint_selections", "inpaint_engine", "inpaint_strength", "inpaint_respective_field",
                    "inpaint_erode_or_dilate", "invert_mask", "inpaint_disable_initial_latent",
                    "inpaint_additional_prompt"):
            if key in u:
                fields[key] = u[key]
    elif tab is not None:
        raise AssertionError(f"{run.name}: input_image_tab {tab!r} has no mapping onto a request yet")
    return GenerationRequest(**fields)


def build_extra_weights(models_dir: Path, lora_files: list[str], *, upscaler: bool, inpaint: bool) -> None:
    """The runs' extra weights, written by the parity folder's own recipes (README "Extra weights") where
    the runtime looks for them under ``models_dir``: ``upscale_models/``, ``inpaint/``, ``loras/``.

    Deterministic bytes, a few seconds each; one LoRA recipe exists, so every LoRA name a run gives
    is that file."""
    folder = parity_dir()

    def recipe(script: str, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(folder / script), str(out)], check=True, stdout=subprocess.DEVNULL)

    if upscaler:
        from engine.imaging.upscaler import UPSCALE_MODELS_DIR, UPSCALER_FILE_NAME

        recipe("make_upscaler.py", models_dir / UPSCALE_MODELS_DIR / UPSCALER_FILE_NAME)
    if inpaint:
        (models_dir / "inpaint").mkdir(parents=True, exist_ok=True)
        recipe("make_inpaint.py", models_dir / "inpaint")  # writes head + patch under the README's names
    if lora_files:
        first = models_dir / "loras" / lora_files[0]
        recipe("make_lora.py", first)
        for name in lora_files[1:]:
            shutil.copyfile(first, models_dir / "loras" / name)


class Recorder:
    """The runner's trace: keeps the latest value recorded under each name."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def record(self, name: str, value: Any) -> None:
        self.values[name] = value


def rel(ours: Any, ref: Any) -> float:
    """Relative L2 error over the whole tensor, ``‖a − ref‖ / ‖ref‖`` (parity README, "Tolerances")."""
    a, b = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).norm() / b.norm())


def psnr_db(ours: Any, ref: Any, peak: float) -> float:
    mse = float(np.mean((np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def unet_rows(derived_calls: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """Fooocus's UNet evaluations as sorted (timestep, 0 positive / 1 negative) rows, batching aside."""
    return sorted((float(t), int(label)) for call in derived_calls
                  for t, label in zip(call["timestep"], call["cond_or_uncond"]))
