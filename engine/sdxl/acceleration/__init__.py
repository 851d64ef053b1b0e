"""Fast paths applied to loaded SDXL components, each one equal to the eager path within a stated
tolerance (tests/unit/test_acceleration.py) — never a silent trade of image quality for speed.

What :meth:`Accelerator.apply` does to one loaded model (``SDXLComponents``), per
:class:`AccelerationConfig` (spec/performance.md §2, §7 and the issue "GPU performance"):

* **SDPA everywhere**: diffusers ``AttnProcessor2_0`` on the UNet and VAE, ``sdpa`` on the CLIP
  encoders (already the library defaults; enforced so a config change cannot fall back to the
  eager ``softmax(QKᵀ)V`` path).
* **Fused QKV** (CUDA default): one GEMM for q/k/v (self-attention) and k/v (cross-attention).
  ``to_q``/``to_k``/``to_v`` are then re-pointed at *slices of the fused weight*, so LoRA merges
  (which write those weights in place) change the fused GEMM too, and no memory is duplicated.
* **channels_last** (CUDA default) for the UNet and VAE convolutions (same math, other layout).
* **torch.compile** (opt-in, ``settings.compile``) of ``unet.forward`` and ``vae.decode`` with
  ``dynamic=False`` except the text-context length (any number of 77-token chunks shares one
  graph), a persistent inductor cache under ``<data_dir>/compile_cache``, and a dispatcher that
  never stalls the worker for a compile: a shape (or any other guard change, e.g. FreeU hooks)
  that has no compiled graph yet runs eager while a background thread compiles it, and the
  aspect ratios listed in the config are compiled ahead once the first real call showed the input
  dtypes. ``policy="blocking"`` compiles on the worker instead (benchmarks, warm-up).
* **Low-VRAM mode** (opt-in, ``settings.low_vram``): weights live in (pinned) CPU memory; text
  encoders, UNet and VAE go to the GPU only while used (one at a time); the UNet keeps as many
  blocks resident as the VRAM budget allows (4 GiB, Fooocus's claim) and streams the others
  block by block, each prefetched on a side CUDA stream while the previous one computes.
* **Fast expansion decode**: GPT-2 ``generate`` with a static KV cache; on CUDA transformers then
  compiles the one-token decode step (CUDA graphs). Same tokens as the eager path.
* :meth:`Accelerator.guidance`: Fooocus's sharpness + CFG mimicking (spec §5, §6), the one
  implementation in engine/sdxl/sampling/guidance.py run with tensor scalars (no host sync),
  compiled behind the same dispatcher; the pipeline installs it as ``SDXLDenoiser.guide``.

Low-VRAM mode turns compile and fused QKV off (streamed weights change address every step).
State lives in the :class:`Accelerator` (one per runner); nothing happens at import time. Knobs
torch only offers process-wide (inductor cache dir, dynamo recompile limit, hook guards) are set
when a compile is set up, and logged.

One module per concern: config.py (what to apply), attention.py (SDPA, fused QKV, channels_last),
compile.py (torch.compile dispatcher), guidance.py (compiled guidance), lowvram.py (weight
residency and block streaming), expansion_decode.py (static-cache GPT-2), accelerator.py (the
runner's entry point). This package re-exports the names the pipeline, bench and tests use.
"""

from engine.sdxl.acceleration.accelerator import Acceleration, Accelerator
from engine.sdxl.acceleration.attention import fuse_qkv_views, to_channels_last, use_sdpa
from engine.sdxl.acceleration.compile import CompiledCall, configure_compile
from engine.sdxl.acceleration.config import AccelerationConfig, latent_size
from engine.sdxl.acceleration.expansion_decode import StaticCacheGenerator, fast_expansion
from engine.sdxl.acceleration.guidance import compiled_guidance, guidance_function
from engine.sdxl.acceleration.lowvram import plan_streaming, stream_units

__all__ = [
    "Acceleration", "AccelerationConfig", "Accelerator", "CompiledCall", "StaticCacheGenerator", "compiled_guidance",
    "configure_compile", "fast_expansion", "fuse_qkv_views", "guidance_function", "latent_size", "plan_streaming",
    "stream_units", "to_channels_last", "use_sdpa",
]
