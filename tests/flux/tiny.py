"""A tiny random FLUX.1 (transformer, VAE, CLIP-L, T5) built from small configs, and writers for the
file layouts the Flux loader reads: a diffusers folder, a BFL transformer file with separate
CLIP/T5/VAE files, and a ComfyUI all-in-one file. Tokenizers are built here, offline."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from engine.flux.loading import CONFIGS_METADATA_KEY, diffusers_to_bfl
from engine.sdxl.models.demo import _vae_to_ldm, build_demo_tokenizer, demo_vocab

Variant = Literal["schnell", "dev"]
#: T5's sentencepiece-style vocabulary: specials, the word-start mark, letters and digits, then
#: word-start letters; small enough for a 64-row embedding.
_T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581", *string.ascii_lowercase, *string.digits,
              *("\u2581" + c for c in string.ascii_lowercase)]


def tiny_configs(variant: Variant = "schnell") -> dict[str, dict[str, Any]]:
    """Small widths and depths, but FLUX.1's 16 latent channels (packed 2x2: 64 transformer inputs) and 8x
    VAE (four levels), so the same files also run through the runner as a real FLUX.1 would (its previews
    are per latent channel, its image size is 8 x the latent's)."""
    clip_vocab = demo_vocab()
    return {
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 24, "guidance_embeds": variant == "dev",
                        "axes_dims_rope": [2, 2, 4]},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [8, 8, 16, 16],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.3611,
                "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
                "force_upcast": True, "mid_block_add_attention": True},
        "text_encoder": {"vocab_size": len(clip_vocab), "hidden_size": 24, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "projection_dim": 24,
                         "bos_token_id": clip_vocab["<|startoftext|>"], "eos_token_id": clip_vocab["<|endoftext|>"],
                         "pad_token_id": clip_vocab["<|endoftext|>"]},
        "text_encoder_2": {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 1,
                           "num_heads": 2, "feed_forward_proj": "gated-gelu", "is_gated_act": True,
                           "dense_act_fn": "gelu_new", "relative_attention_num_buckets": 8,
                           "relative_attention_max_distance": 16, "tie_word_embeddings": False,
                           "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0},
        "scheduler": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": variant == "dev"},
    }


def build_tiny(variant: Variant = "schnell", seed: int = 0) -> dict[str, torch.nn.Module]:
    """The four modules with every parameter random (norm scales too), so a mixed-up key shows."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = tiny_configs(variant)
    generator = torch.Generator().manual_seed(seed)
    modules = {
        "transformer": FluxTransformer2DModel.from_config(configs["transformer"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        "text_encoder_2": T5EncoderModel(T5Config.from_dict(configs["text_encoder_2"])),
    }
    with torch.no_grad():
        for module in modules.values():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            module.eval().requires_grad_(False)
    return modules


def build_tokenizers() -> tuple[Any, Any]:
    """(CLIP tokenizer over the demo byte vocabulary, T5 unigram tokenizer), built without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram([(p, -1.0 if p.startswith("\u2581") else -2.0) for p in _T5_PIECES],
                                       unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    t5 = T5Tokenizer(tokenizer_object=unigram, extra_ids=0, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return build_demo_tokenizer(), t5


def save_tokenizers(folder: Path) -> Path:
    clip, t5 = build_tokenizers()
    clip.save_pretrained(folder / "tokenizer")
    t5.save_pretrained(folder / "tokenizer_2")
    return folder


def save_diffusers_folder(modules: dict[str, torch.nn.Module], folder: Path, variant: Variant) -> Path:
    for name, module in modules.items():
        module.save_pretrained(folder / name, safe_serialization=True)
    save_tokenizers(folder)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **tiny_configs(variant)["scheduler"]}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5Tokenizer"]}))
    return folder


def _metadata(variant: Variant) -> dict[str, str]:
    return {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(variant))}


def bfl_transformer_state(modules: dict[str, torch.nn.Module], variant: Variant) -> dict[str, torch.Tensor]:
    return diffusers_to_bfl(modules["transformer"].state_dict(), tiny_configs(variant)["transformer"])


def clip_file_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """CLIP-L as ``clip_l.safetensors`` names it (transformers 4 naming: ``text_model.`` first)."""
    state = modules["text_encoder"].state_dict()
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def t5_file_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """T5 as ComfyUI's ``t5xxl_fp16.safetensors`` names it: the tied embedding only as ``shared``."""
    return {k: v for k, v in modules["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}


def vae_ldm_state(modules: dict[str, torch.nn.Module], variant: Variant) -> dict[str, torch.Tensor]:
    """The VAE in LDM naming, as BFL's ``ae.safetensors`` stores it."""
    return _vae_to_ldm(modules["vae"].state_dict(), tiny_configs(variant)["vae"])


def save_bfl_files(modules: dict[str, torch.nn.Module], folder: Path, variant: Variant,
                   dtype: torch.dtype | None = None) -> dict[str, Path]:
    """flux1-*.safetensors (BFL transformer), clip_l, t5xxl, ae (LDM VAE) as separate files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"transformer": folder / f"flux1-{variant}.safetensors", "clip": folder / "clip_l.safetensors",
             "t5": folder / "t5xxl.safetensors", "vae": folder / "ae.safetensors"}
    transformer = bfl_transformer_state(modules, variant)
    if dtype is not None:
        transformer = {k: v.to(dtype) for k, v in transformer.items()}
    save_file({k: v.contiguous() for k, v in transformer.items()}, paths["transformer"], metadata=_metadata(variant))
    save_file(clip_file_state(modules), paths["clip"], metadata=_metadata(variant))
    save_file(t5_file_state(modules), paths["t5"], metadata=_metadata(variant))
    save_file({k: v.contiguous() for k, v in vae_ldm_state(modules, variant).items()}, paths["vae"],
              metadata=_metadata(variant))
    return paths


def save_all_in_one(modules: dict[str, torch.nn.Module], path: Path, variant: Variant) -> Path:
    """The ComfyUI checkpoint layout: every component in one file under its prefix."""
    state = {f"model.diffusion_model.{k}": v for k, v in bfl_transformer_state(modules, variant).items()}
    state |= {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_file_state(modules).items()}
    state |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_file_state(modules).items()}
    state |= {f"vae.{k}": v for k, v in vae_ldm_state(modules, variant).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=_metadata(variant))
    return path
