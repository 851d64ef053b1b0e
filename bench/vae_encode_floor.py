"""How much of parity run e's VAE-encode difference is the float32 floor of the random encoder itself?

Encodes run e's ``uov_pixels_before_encode.png`` with the checkpoint's VAE three ways — ours in float32,
ours in float64 (a reference with ~1e-16 rounding) and float32 with a plain bmm/softmax mid-block
attention (the "normal attention" formula ComfyUI's VAE uses on CPU, instead of SDPA) — and reports each
posterior mean's relative distance to the others and to the recorded Fooocus mean (``posterior00.mean``).

Usage: python bench/vae_encode_floor.py CHECKPOINT RUN_DIR [--out bench/results/vae_encode_floor-cpu.json]
About 3 min and 6 GB RAM on 2 cores (one 1024² encode at float64 dominates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm())


class _BmmAttention:
    """softmax(q·kᵀ)·scale applied after the product, as one bmm each: the formula, not any project's code."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        x = attn.group_norm(hidden_states.view(batch, channels, height * width)).transpose(1, 2)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * channels ** -0.5, dim=-1)
        out = attn.to_out[1](attn.to_out[0](torch.bmm(weights, v)))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return (out + residual) / attn.rescale_output_factor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vae_encode_floor-cpu.json"))
    args = parser.parse_args()

    from engine.sdxl.models.loading import load_ldm_component, single_file_configs

    with safe_open(str(args.checkpoint), "pt") as handle:
        keys = [k for k in handle.keys() if k.startswith("first_stage_model.")]
        tensors = {k: handle.get_tensor(k).float() for k in keys}
    vae = load_ldm_component("vae", tensors, single_file_configs("base")["vae"])
    pixels = torch.from_numpy(np.array(Image.open(args.run_dir / "uov_pixels_before_encode.png").convert("RGB")))
    x = (pixels.permute(2, 0, 1)[None].float() / 255.0) * 2.0 - 1.0
    recorded = load_file(str(args.run_dir / "image_inputs.safetensors"))
    recorded_mean = next(v for k, v in recorded.items() if k.startswith("posterior") and k.endswith(".mean"))

    def mean_of(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            moments = model.to(dtype).encoder(x.to(dtype))
            moments = model.quant_conv(moments)
        return torch.chunk(moments, 2, dim=1)[0].double()

    ours32 = mean_of(vae, torch.float32)
    ours64 = mean_of(vae, torch.float64)
    vae.to(torch.float32).set_attn_processor(_BmmAttention())
    bmm32 = mean_of(vae, torch.float32)
    result = {
        "what": "posterior mean of run e's encode (1024x1024), relative L2 distances",
        "ours_f32_vs_f64": _rel(ours32, ours64),
        "bmm_attention_f32_vs_f64": _rel(bmm32, ours64),
        "ours_f32_vs_bmm_f32": _rel(ours32, bmm32),
        "fooocus_recorded_vs_f64": _rel(recorded_mean, ours64),
        "fooocus_recorded_vs_ours_f32": _rel(recorded_mean, ours32),
        "fooocus_recorded_vs_bmm_f32": _rel(recorded_mean, bmm32),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
