"""Which fast paths to apply to a loaded model, derived from the operator's Settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from engine.core.settings import Settings

GiB = 2**30
#: Fooocus's claim: SDXL at 1024² on a 4 GB card (spec/performance.md §4).
DEFAULT_VRAM_BUDGET_BYTES = 4 * GiB

CompilePolicy = Literal["background", "blocking"]


@dataclass(frozen=True)
class AccelerationConfig:
    """Which fast paths to apply. ``device`` is where the models compute."""

    device: torch.device
    sdpa: bool = True
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = "reduce-overhead"
    compile_backend: str | Callable[..., Any] = "inductor"
    compile_vae: bool = True
    compile_policy: CompilePolicy = "background"
    #: Latent sizes (height/8, width/8) to compile ahead, in order, once the first call is seen.
    compile_ahead_latents: tuple[tuple[int, int], ...] = ()
    #: Persistent inductor cache (None: torch's default under /tmp).
    cache_dir: Path | None = None
    low_vram: bool = False
    vram_budget_bytes: int = DEFAULT_VRAM_BUDGET_BYTES
    #: Streamed UNet blocks copied ahead of use (memory: (1 + prefetch) blocks in flight).
    prefetch_blocks: int = 2
    fast_expansion: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device, *,
                      compile_ahead: Sequence[str] = ()) -> AccelerationConfig:
        """The defaults for a device: layout/fusion fast paths on CUDA; compile and low-VRAM as the
        operator set them (low-VRAM turns compile and fusion off: streamed weights move)."""
        cuda = device.type == "cuda"
        low_vram = bool(settings.low_vram)
        return cls(device=device, fuse_qkv=cuda and not low_vram, channels_last=cuda and not low_vram,
                   compile=bool(settings.compile) and not low_vram,
                   compile_ahead_latents=tuple(latent_size(text) for text in compile_ahead),
                   cache_dir=Path(settings.data_dir) / "compile_cache", low_vram=low_vram, fast_expansion=cuda)

    @property
    def load_device(self) -> torch.device:
        """Where to load weights: CPU in low-VRAM mode (moved to ``device`` while used)."""
        return torch.device("cpu") if self.low_vram else self.device


def latent_size(aspect_ratio: str) -> tuple[int, int]:
    """'1152*896' (width*height px) → latent (height/8, width/8)."""
    from engine.core.request import parse_aspect_ratio

    width, height = parse_aspect_ratio(aspect_ratio)
    return height // 8, width // 8
