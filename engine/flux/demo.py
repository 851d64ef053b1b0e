"""The demo-flux model: a tiny random FLUX.1 built in memory (``--model demo-flux``), no files.

Like the SDXL ``demo`` it lets every door run end to end with no download, and paints coloured noise.
The architecture is FLUX.1 at toy size: a FluxTransformer2DModel with one double-stream and one
single-stream block (64 input channels = 16 latent channels × 2×2 patches, rotary axes 4+6+6 over a
head of 16), a T5 encoder of width 32, CLIP-L-style text model of width 32 (the pooled vector), and a
16-channel KL-f8 VAE with FLUX.1's scaling 0.3611 and shift 0.1159 and no quant convs.
``variant="dev"`` adds the guidance embedder (guidance-distilled, dynamic shifting); ``"schnell"``
has none and a fixed shift of 1.

Weights are a pure function of (component, parameter name): each tensor is uniform from its own
``torch.Generator`` seeded by a hash of its name (``torch.rand`` is bit-stable across CPUs), fan-in
scaled; the global RNG is never touched. Tokenizers are built here from small vocabularies: CLIP's
byte-level BPE with no merges (every word becomes its characters) and a T5 unigram over ASCII.
"""

from __future__ import annotations

import hashlib
import math
import string
from typing import TYPE_CHECKING, Any

import torch

from engine.core.constants import DEMO_FLUX_MODEL
from engine.flux.components import FluxComponents, FluxVariant
from engine.io.modules import rebuild_position_ids

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_SEED_TAG = "hooocus-demo-flux-v1"
_WIDTH = 32
#: FLUX.1's VAE latent normalisation (ae.safetensors config; diffusers AutoencoderKL scaling/shift).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_T5_CHARS = string.ascii_letters + string.digits + string.punctuation


# -- tokenizers ---------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2/CLIP) uses for bytes, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [256 + i for i in range(256 - len(printable))]
    others = iter(extra)
    return [chr(b) for b in printable] + [chr(next(others)) for b in range(256) if b not in printable]


def clip_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


def build_clip_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=77)


def t5_pieces() -> list[tuple[str, float]]:
    """A unigram vocabulary: pad, eos, unk first (T5's ids 0, 1, 2), then ASCII with and without '▁'."""
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _T5_CHARS] + [("▁" + c, -2.5) for c in _T5_CHARS]
    return pieces


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer (appends ``</s>``, pads with ``<pad>``) over :func:`t5_pieces`, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(t5_pieces(), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=backend, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD,
                           extra_ids=0)


# -- configs ------------------------------------------------------------------------------------


def scheduler_config(variant: FluxVariant) -> dict[str, Any]:
    """FLUX.1's FlowMatchEulerDiscreteScheduler configs: dev shifts with the resolution, schnell does not."""
    if variant == "dev":
        return {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    return {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def demo_flux_configs(variant: FluxVariant = "schnell") -> dict[str, dict[str, Any]]:
    """diffusers/transformers configs of the tiny components (transformer, vae, text_encoder(_2))."""
    vocab = clip_vocab()
    transformer = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
                   "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": _WIDTH,
                   "pooled_projection_dim": _WIDTH, "guidance_embeds": variant == "dev",
                   "axes_dims_rope": [4, 6, 6]}
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
           "sample_size": 64, "scaling_factor": FLUX_VAE_SCALING_FACTOR, "shift_factor": FLUX_VAE_SHIFT_FACTOR,
           "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
    clip = {"vocab_size": len(vocab), "hidden_size": _WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
            "bos_token_id": vocab[CLIP_BOS], "eos_token_id": vocab[CLIP_EOS], "pad_token_id": vocab[CLIP_EOS],
            "projection_dim": _WIDTH, "hidden_act": "quick_gelu"}
    t5 = {"vocab_size": len(t5_pieces()), "d_model": _WIDTH, "d_kv": 8, "d_ff": 64, "num_layers": 2,
          "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
          "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
          "pad_token_id": 0, "eos_token_id": 1, "layer_norm_epsilon": 1e-6}
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


# -- model --------------------------------------------------------------------------------------


def build_demo_flux(variant: FluxVariant = "schnell", *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed_tag: str = _SEED_TAG,
                    name: str = DEMO_FLUX_MODEL) -> FluxComponents:
    """The tiny random FLUX.1; the same weights on every call and machine for the same ``seed_tag``
    (tests pass another tag to get a second, independent random model)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = demo_flux_configs(variant)
    with torch.device("meta"):
        modules: dict[str, torch.nn.Module] = {
            "transformer": FluxTransformer2DModel.from_config(configs["transformer"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
            "text_encoder_2": T5EncoderModel(T5Config.from_dict(configs["text_encoder_2"])),
        }
    for part, module in modules.items():
        module.to_empty(device="cpu")
        _init_parameters(module, f"{seed_tag}/{variant if part == 'transformer' else 'shared'}/{part}")
        rebuild_position_ids(module)
        part_dtype = torch.float32 if part == "vae" and dtype == torch.float16 else dtype  # VAE force_upcast
        if part_dtype != torch.float32:
            module.to(dtype=part_dtype)
        module.to(device=device).eval().requires_grad_(False)
    return FluxComponents(transformer=modules["transformer"], vae=modules["vae"],
                          text_encoder=modules["text_encoder"], tokenizer=build_clip_tokenizer(),
                          text_encoder_2=modules["text_encoder_2"], tokenizer_2=build_t5_tokenizer(),
                          scheduler_config=scheduler_config(variant), variant=variant, name=name)


@torch.no_grad()
def _init_parameters(module: torch.nn.Module, tag: str) -> None:
    """Fan-in scaled uniform weights, norm scales near 1, small biases; one generator per tensor."""
    for name, param in module.named_parameters():
        digest = hashlib.sha256(f"{tag}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        unit = torch.rand(param.shape, generator=generator, dtype=torch.float32) * 2 - 1  # uniform (-1, 1)
        if param.ndim >= 2:
            param.copy_(unit * (math.sqrt(3) / math.sqrt(math.prod(param.shape[1:]))))
        elif name.endswith("weight"):  # LayerNorm / GroupNorm / RMSNorm scales
            param.copy_(1 + 0.1 * unit)
        else:
            param.copy_(0.02 * unit)
