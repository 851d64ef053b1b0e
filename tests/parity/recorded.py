"""Reading the end-to-end parity folder (``$HOOOCUS_PARITY``, default ../shared/parity): its runs,
their recorded Fooocus parameters as a public ``GenerationRequest``, and the README's error measures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.request import GenerationRequest
from tests.paths import parity_dir


def parity_runs() -> list[Path]:
    """Every ``runs/<name>/`` holding a ``params.json``, sorted by name (read at collection time)."""
    root = parity_dir() / "runs"
    return sorted(p for p in root.iterdir() if (p / "params.json").is_file()) if root.is_dir() else []


def request_for(params: dict[str, Any], base_model: str) -> GenerationRequest:
    """The recorded Fooocus ``user_parameters`` of a run as a public request (metadata off, as recorded)."""
    u = params["user_parameters"]
    return GenerationRequest(
        prompt=u["prompt"], negative_prompt=u["negative_prompt"], styles=list(u["style_selections"]),
        performance=u["performance"], steps=u["steps"], width=u["width"], height=u["height"], seed=u["seed"],
        cfg=u["cfg_scale"], sharpness=u["sharpness"], sampler=u["sampler"], scheduler=u["scheduler"],
        adm_scaler_positive=u["adm_scaler_positive"], adm_scaler_negative=u["adm_scaler_negative"],
        adm_scaler_end=u["adm_scaler_end"], adaptive_cfg=u["adaptive_cfg"], clip_skip=u["clip_skip"],
        base_model=base_model, refiner_model=None if u["refiner"] == "None" else u["refiner"],
        refiner_swap_method=u["refiner_swap_method"],
        loras=[{"name": name, "weight": weight} for name, weight in u["loras"]],
        vae=None if u["vae"] == "Default (model)" else u["vae"], freeu={"enabled": True} if u["freeu"] else None,
        image_number=u["image_number"], output_format=u["output_format"], metadata_scheme="none")


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
