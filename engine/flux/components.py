"""The parts of a FLUX.1 model the Flux runner needs, however they were loaded (issue 17)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FluxVariant = Literal["schnell", "dev"]


@dataclass(frozen=True)
class FluxComponents:
    """diffusers modules of one FLUX.1 model; ``variant`` decides the request defaults (spec: issue 17)."""

    transformer: Any  # diffusers.FluxTransformer2DModel
    vae: Any  # diffusers.AutoencoderKL (16 latent channels)
    text_encoder: Any  # transformers.CLIPTextModel (CLIP-L)
    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder_2: Any  # transformers.T5EncoderModel
    tokenizer_2: Any  # transformers.T5TokenizerFast or T5Tokenizer
    scheduler_config: dict[str, Any]  # FlowMatchEulerDiscreteScheduler config (shift, use_dynamic_shifting, ...)
    variant: FluxVariant
    name: str = "flux"
