"""Fooocus's guidance (spec §5 sharpness, §6 CFG mimicking) compiled: the tensor-scalar form of
the one implementation in engine/sdxl/sampling/guidance.py behind ``sharpness_sampling_function``'s
signature, so ``SDXLDenoiser.guide`` can be either."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from engine.sdxl.sampling.guidance import guidance_tensors, sharpness_sampling_function


def compiled_guidance(*, backend: str | Callable[..., Any] = "inductor", mode: str | None = None) -> Callable[..., Any]:
    """A drop-in for ``sharpness_sampling_function(x, x0_pos, x0_neg, *, cfg, sharpness,
    adaptive_cfg, timestep)`` that runs :func:`guidance_tensors` compiled (one fused kernel chain,
    no host sync). Falls back to the reference for cfg ≈ 1 and sharpness 0 (no filter at all)."""
    return guidance_function(torch.compile(guidance_tensors, dynamic=False, fullgraph=True, backend=backend,
                                           mode=mode))


def guidance_function(graph: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """``sharpness_sampling_function``'s signature over a tensor-only ``graph`` (see above)."""
    def guide(x: torch.Tensor, x0_pos: torch.Tensor, x0_neg: torch.Tensor | None, *, cfg: float, sharpness: float,
              adaptive_cfg: float, timestep: torch.Tensor | float) -> torch.Tensor:
        if math.isclose(cfg, 1.0) or sharpness == 0.0 or x0_neg is None:
            return sharpness_sampling_function(x, x0_pos, x0_neg, cfg=cfg, sharpness=sharpness,
                                               adaptive_cfg=adaptive_cfg, timestep=timestep)

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.float32, device=x.device)

        t = torch.as_tensor(timestep, device=x.device)
        return graph(x, x0_pos, x0_neg, t, scalar(cfg), scalar(adaptive_cfg), scalar(sharpness))

    return guide


class _GuidanceGraph:
    """Owner of the guidance graph, so :class:`CompiledCall` can install its dispatcher on it."""

    graph = staticmethod(guidance_tensors)
