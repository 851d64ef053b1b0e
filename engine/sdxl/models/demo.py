"""The demo model: a tiny random SDXL (base and refiner) built in memory, and writers for the
diffusers-folder and single-file layouts.

``--model demo`` lets the CLI, the websocket server and the MCP server run end to end with no
download. The weights are random, so images look like coloured noise; :attr:`SDXLComponents.is_demo`
is set so that metadata can label the output as demo output.

The architecture mirrors SDXL at toy size: UNet with a plain first level and cross-attention in the
second, ``text_time`` size conditioning (6 time ids for the base, 5 for the refiner, spec §4 and
§8), a KL-f8 VAE with 4 latent channels and SDXL's scaling factor 0.13025, CLIP-L and bigG-style
encoders of width 32 (cross-attention width 32 + 32 for the base, bigG only for the refiner). The
base and refiner share the VAE and the bigG encoder, as the real ones do.

Weights are a pure function of (component, parameter name): each tensor draws from its own
``torch.Generator`` seeded from a hash of its name, uniform (``torch.rand`` is bit-stable across
CPUs where the normal sampler is not), fan-in scaled. The global RNG is never touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from engine.core.constants import DEMO_MODEL
from engine.io.modules import rebuild_position_ids
from engine.sdxl.models.configs import scheduler_config
from engine.sdxl.models.loading import (
    CONFIGS_METADATA_KEY,
    LDM_PREFIXES,
    SDXL_VAE_SCALING_FACTOR,
    SDXLComponents,
    vae_decode_dtype,
)

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

DEMO_NAME = DEMO_MODEL
_SEED_TAG = "hooocus-demo-v1"
_CLIP_WIDTH = 32
_TIME_EMBED_DIM = 8
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


# -- tokenizer ----------------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP), in vocabulary order.

    Printable Latin-1 bytes stand for themselves ('!' first, so it gets id 0 as in CLIP); the other
    bytes map to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def demo_vocab() -> dict[str, int]:
    """256 byte symbols, their end-of-word forms, then start and end tokens: 514 entries."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def build_demo_tokenizer(*, pad_token: str | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer over :func:`demo_vocab` with no merges: every word becomes its characters.

    ``pad_token="!"`` gives the clip_g flavour (pads with id 0), set after construction so text
    tokenizes the same as without it (see :func:`engine.sdxl.models.loading.load_clip_tokenizer`).
    """
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=demo_vocab(), merges=[], model_max_length=77)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


# -- configs ------------------------------------------------------------------------------------


def demo_configs(kind: Literal["base", "refiner"] = "base") -> dict[str, dict[str, Any]]:
    """diffusers/transformers configs of the demo components (unet, vae, text_encoder(_2))."""
    vocab = demo_vocab()
    clip = {"vocab_size": len(vocab), "hidden_size": _CLIP_WIDTH, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
            "layer_norm_eps": 1e-5, "bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[EOS_TOKEN], "projection_dim": _CLIP_WIDTH}
    time_ids = 6 if kind == "base" else 5  # base: size, crop, target; refiner: size, crop, aesthetic score
    unet = {
        "sample_size": 32, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        # 2 layers per block (as SDXL) for the base; 1 for the refiner, so both index layouts are exercised
        "layers_per_block": 2 if kind == "base" else 1,
        "transformer_layers_per_block": 1 if kind == "base" else 2,
        "attention_head_dim": [2, 4], "norm_num_groups": 32, "use_linear_projection": True,
        "cross_attention_dim": 2 * _CLIP_WIDTH if kind == "base" else _CLIP_WIDTH,
        "addition_embed_type": "text_time", "addition_time_embed_dim": _TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": _CLIP_WIDTH + time_ids * _TIME_EMBED_DIM,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    }
    vae = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "act_fn": "silu", "sample_size": 64, "scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True,
    }
    configs = {"unet": unet, "vae": vae,
               "text_encoder_2": {**clip, "hidden_act": "gelu", "architectures": ["CLIPTextModelWithProjection"]}}
    if kind == "base":
        configs["text_encoder"] = {**clip, "hidden_act": "quick_gelu", "architectures": ["CLIPTextModel"]}
    return configs


# -- models -------------------------------------------------------------------------------------


def build_demo_sdxl(kind: Literal["base", "refiner"] = "base", *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> SDXLComponents:
    """The tiny random SDXL base or refiner; the same weights on every call (and machine).

    The VAE follows :func:`~engine.sdxl.models.loading.vae_decode_dtype` (float32 when ``dtype`` is
    float16, as its config says ``force_upcast`` like SDXL's).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("base", "refiner"):
        raise ValueError(f"kind must be 'base' or 'refiner', not {kind!r}")
    configs = demo_configs(kind)
    with torch.device("meta"):
        modules: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
        }
        if kind == "base":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    for part, module in modules.items():
        # The refiner's UNet differs from the base's; the VAE and bigG are shared, so their seeds are too.
        tag = f"{_SEED_TAG}/{kind}/{part}" if part == "unet" else f"{_SEED_TAG}/{part}"
        module.to_empty(device="cpu")
        _init_parameters(module, tag)
        rebuild_position_ids(module)
        part_dtype = vae_decode_dtype(dtype, configs["vae"]["force_upcast"]) if part == "vae" else dtype
        if part_dtype != torch.float32:  # (diffusers' .to(dtype=...) logs a spurious warning even for float32)
            module.to(dtype=part_dtype)
        module.to(device=device).eval().requires_grad_(False)
    return SDXLComponents(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules.get("text_encoder"),  # type: ignore[arg-type]
        text_encoder_2=modules["text_encoder_2"],  # type: ignore[arg-type]
        tokenizer=build_demo_tokenizer() if kind == "base" else None,
        tokenizer_2=build_demo_tokenizer(pad_token="!"), kind=kind, name=DEMO_NAME, source="demo",
        dtype=dtype, device=torch.device(device), is_demo=True, vae_scaling_factor=SDXL_VAE_SCALING_FACTOR)


@torch.no_grad()
def _init_parameters(module: torch.nn.Module, tag: str) -> None:
    """Fan-in scaled uniform weights, norm scales near 1, small biases; one generator per tensor."""
    for name, param in module.named_parameters():
        digest = hashlib.sha256(f"{tag}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        unit = torch.rand(param.shape, generator=generator, dtype=torch.float32) * 2 - 1  # uniform (-1, 1)
        if param.ndim >= 2:
            std = 1.0 / math.sqrt(math.prod(param.shape[1:]))
            param.copy_(unit * (std * math.sqrt(3)))
        elif name.endswith("weight"):  # LayerNorm/GroupNorm scales
            param.copy_(1 + 0.1 * unit)
        else:
            param.copy_(0.02 * unit)


# -- writers ------------------------------------------------------------------------------------


def save_diffusers(components: SDXLComponents, directory: str | os.PathLike[str]) -> Path:
    """Write ``components`` as a diffusers pipeline folder (safetensors weights only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = components.text_encoder is not None
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": base,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if base else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if base else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not base:
        index["requires_aesthetics_score"] = True
    components.unet.save_pretrained(directory / "unet", safe_serialization=True)
    components.vae.save_pretrained(directory / "vae", safe_serialization=True)
    components.text_encoder_2.save_pretrained(directory / "text_encoder_2")
    components.tokenizer_2.save_pretrained(directory / "tokenizer_2")
    if components.text_encoder is not None:
        components.text_encoder.save_pretrained(directory / "text_encoder")
    if components.tokenizer is not None:
        components.tokenizer.save_pretrained(directory / "tokenizer")
    (directory / "scheduler").mkdir(exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2))
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def save_demo_diffusers(directory: str | os.PathLike[str], kind: Literal["base", "refiner"] = "base") -> Path:
    """Write the demo model as a diffusers folder (about 7 MB)."""
    return save_diffusers(build_demo_sdxl(kind), directory)


def save_single_file(components: SDXLComponents, path: str | os.PathLike[str], *,
                     dtype: torch.dtype | None = None) -> Path:
    """Write ``components`` as a single-file checkpoint in the Stability/A1111 layout.

    The component configs go into the safetensors ``__metadata__`` (key ``hooocus.configs``), so
    the loader rebuilds non-SDXL-sized architectures such as the demo from the file alone; files
    without that key are read with the bundled SDXL configs. ``dtype`` converts float tensors
    (e.g. ``torch.float16`` as checkpoints are shipped).
    """
    from safetensors.torch import save_file

    tensors = to_ldm_state_dict(components)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    configs = {"unet": dict(components.unet.config), "vae": dict(components.vae.config),
               "text_encoder_2": components.text_encoder_2.config.to_dict()}
    if components.text_encoder is not None:
        configs["text_encoder"] = components.text_encoder.config.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", CONFIGS_METADATA_KEY: json.dumps(configs, default=str)})
    return path


def to_ldm_state_dict(components: SDXLComponents) -> dict[str, torch.Tensor]:
    """The single-file (Stability "sgm") state dict of ``components``: the inverse of diffusers'
    ``convert_ldm_unet_checkpoint``/``convert_ldm_vae_checkpoint``/``convert_ldm_clip_checkpoint``/
    ``convert_open_clip_checkpoint``, written for any UNet/VAE config (not only SDXL's sizes)."""
    arch = "base" if components.text_encoder is not None else "refiner"
    prefixes = LDM_PREFIXES[arch]
    out: dict[str, torch.Tensor] = {}
    for key, value in _unet_to_ldm(components.unet.state_dict(), components.unet.config).items():
        out[prefixes["unet"] + key] = value
    for key, value in _vae_to_ldm(components.vae.state_dict(), components.vae.config).items():
        out[prefixes["vae"] + key] = value
    if components.text_encoder is not None:
        for key, value in components.text_encoder.state_dict().items():
            if not key.endswith("position_ids"):
                out[prefixes["text_encoder"] + (key if key.startswith("text_model.") else "text_model." + key)] = value
    for key, value in _open_clip_to_ldm(components.text_encoder_2.state_dict()).items():
        out[prefixes["text_encoder_2"] + key] = value
    return out


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(head, head)}.{tail}"


def _unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet keys -> ``input_blocks``/``middle_block``/``output_blocks`` (LDM openaimodel).

    Down level i, layer j sits at input block (lpb+1)·i + j + 1 (block 0 is conv_in); its downsampler
    at (lpb+1)·(i+1). Up level i, layer j sits at output block (lpb+1)·i + j; its upsampler follows
    the last layer, at sub-index 2 when that level has attention, else 1.
    """
    step = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{step * i + j + 1}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{step * i + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv.{weight,bias}
                new = f"input_blocks.{step * (i + 1)}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = (f"middle_block.{2 * j}.{_resnet_key(rest)}" if parts[1] == "resnets"
                   else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{step * i + j}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{step * i + j}.1.{rest}"
            else:  # upsamplers.0.conv.{weight,bias}
                new = f"output_blocks.{step * i + step - 1}.{2 if up_has_attention[i] else 1}.conv.{parts[-1]}"
        else:
            module, _, leaf = key.rpartition(".")
            new = f"{_UNET_TOP_TO_LDM.get(module, module)}.{leaf}"
        out[new] = value
    return out


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM ``encoder.down.N.block.M``/``decoder.up.N``/``mid.attn_1``.

    The decoder's up levels are numbered in reverse in LDM; attention projections are 1x1 convs.
    """
    levels = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        coder, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
        parts = rest.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
            name = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] == "resnets":
                tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{name}.{level}.block.{parts[3]}.{tail}"
            else:  # downsamplers/upsamplers.0.conv.{weight,bias}
                new = f"{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            new = f"mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:])}"
        elif parts[0] == "mid_block":  # attentions.0.<module>.<leaf>
            module, leaf = ".".join(parts[3:-1]), parts[-1]
            new = f"mid.attn_1.{_VAE_ATTENTION_TO_LDM[module]}.{leaf}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif parts[0] == "conv_norm_out":
            new = f"norm_out.{parts[-1]}"
        else:
            new = rest
        out[f"{coder}.{new}" if coder else new] = value
    return out


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP (``transformer.resblocks.N``),
    q/k/v fused into ``in_proj``, the projection transposed, plus OpenCLIP's ``logit_scale``."""
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    layer_prefix = "text_model.encoder.layers."
    layers = sorted({int(k[len(layer_prefix):].split(".")[0]) for k in state if k.startswith(layer_prefix)})
    for n in layers:
        src, dst = f"{layer_prefix}{n}.", f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
    return out


#: The demo upscaler: an old-arch ESRGAN (4×, 3→3) small enough to build per process in milliseconds,
#: in Fooocus's key spelling so it goes through the same rename + spandrel path as the real file.
_DEMO_ESRGAN_NF, _DEMO_ESRGAN_GC, _DEMO_ESRGAN_BLOCKS = 8, 32, 1  # spandrel reads gc as 32
_DEMO_ESRGAN_SEED = 409985


def demo_upscaler_state_dict() -> dict[str, torch.Tensor]:
    """Random (seeded) weights of the tiny demo ESRGAN, keys as Fooocus's upscaler file spells them.

    The last bias is 0.5 so the output sits mid-grey rather than clipping (as the parity recipe does).
    """
    nf, gc = _DEMO_ESRGAN_NF, _DEMO_ESRGAN_GC
    generator = torch.Generator().manual_seed(_DEMO_ESRGAN_SEED)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, std: float) -> None:
        state[f"{name}.weight"] = torch.randn((out_ch, in_ch, 3, 3), generator=generator) * std
        state[f"{name}.bias"] = torch.zeros(out_ch)

    conv("model.0", nf, 3, 0.1)
    for block in range(_DEMO_ESRGAN_BLOCKS):
        for j in range(1, 4):
            for k in range(1, 6):
                conv(f"model.1.sub.{block}.residual_block_{j}.conv{k}.0", gc if k < 5 else nf, nf + (k - 1) * gc, 0.05)
    conv(f"model.1.sub.{_DEMO_ESRGAN_BLOCKS}", nf, nf, 0.05)
    for name in ("model.3", "model.6", "model.8"):
        conv(name, nf, nf, 0.1)
    conv("model.10", 3, nf, 0.05)
    state["model.10.bias"] = torch.full((3,), 0.5)
    return state


def build_demo_upscaler(device: str | torch.device = "cpu"):
    """The demo model's upscaler (an ``engine.imaging.upscaler.Upscaler``), built in memory."""
    from engine.imaging.upscaler import Upscaler, build_network, rename_fooocus_keys

    device = torch.device(device)
    network = build_network(rename_fooocus_keys(demo_upscaler_state_dict()))
    return Upscaler(network=network.to(device=device, dtype=torch.float32), device=device, path=Path("demo-upscaler"))


#: The demo inpaint engine: a seeded head and patch built in memory for the demo UNet, so every
#: inpaint mode runs in CI without Fooocus's weights (the real files come from set-up).
_DEMO_INPAINT_SEED = 2606
#: The demo patch's per-row diff range: small next to the demo UNet's weights (std ~0.02-0.2), so the
#: patched model still denoises, but large enough that a missing merge changes the output.
_DEMO_PATCH_RANGE = 0.01


def demo_inpaint_head(unet: torch.nn.Module) -> torch.Tensor:
    """The demo head weight ``[conv_in.out_channels, 5, 3, 3]`` (fan-in std, as the parity recipe)."""
    channels = int(unet.conv_in.out_channels)
    generator = torch.Generator().manual_seed(_DEMO_INPAINT_SEED)
    return torch.randn((channels, 5, 3, 3), generator=generator) / (5 * 9) ** 0.5


def demo_inpaint_patches(unet: torch.nn.Module, version: str = "v2.6") -> dict[str, Any]:
    """A ``.fooocus.patch`` for every conv/linear weight of the demo UNet, keyed in ldm naming
    (``diffusion_model.<ldm module>.weight``) like the real file, with per-row min/max (float16)."""
    from engine.sdxl.models.lora import unet_lora_key_map
    from engine.sdxl.models.patching import FooocusPatch

    params = dict(unet.named_parameters())
    generator = torch.Generator().manual_seed(_DEMO_INPAINT_SEED + sum(version.encode()))
    patches: dict[str, Any] = {}
    for key, (_component, module) in sorted(unet_lora_key_map(unet).items()):
        if not key.startswith("diffusion_model."):
            continue
        weight = params.get(f"{module}.weight")
        if weight is None or weight.dim() not in (2, 4):
            continue
        rows = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        w_uint8 = torch.randint(0, 256, tuple(weight.shape), generator=generator, dtype=torch.uint8)
        patches[f"{key}.weight"] = FooocusPatch(w_uint8, torch.full(rows, -_DEMO_PATCH_RANGE, dtype=torch.float16),
                                                torch.full(rows, _DEMO_PATCH_RANGE, dtype=torch.float16))
    return patches


# -- Image Prompt (issue 16): tiny deterministic IP-Adapter and Control-LoRA ControlNets --------------

_DEMO_IP_TAG = "hooocus-demo-ip-v1"
#: The demo ControlNets' zero-convs are scaled so a control visibly moves the demo image (a zero
#: init, as a fresh ControlNet has, would add nothing).
_DEMO_CONTROL_TAG = "hooocus-demo-control-v1"


def demo_ip_adapter(unet: torch.nn.Module, kind: str = "ImagePrompt"):
    """The demo's IP-Adapter plus of ``kind`` ("ImagePrompt" or "FaceSwap": two differently seeded
    adapters, as the real ones are two files) with CLIP vision, resampler, k/v per attn2 layer and
    negative tokens: tiny, random, seeded by name, for the demo UNet's attn2 widths."""
    from engine.sdxl.ip_adapter.model import build_tiny_ip_adapter

    return build_tiny_ip_adapter(unet, seed_tag=_DEMO_IP_TAG if kind == "ImagePrompt" else f"{_DEMO_IP_TAG}/{kind}")


#: The demo's face detector: a tiny YuNet-shaped ONNX graph (built by tests/face_models.py, which a
#: test keeps equal to this copy) that calls a 32-px grid cell brighter than about 207 a face.
DEMO_FACE_DETECTOR = Path(__file__).with_name("demo_data") / "face_yunet_tiny.onnx"


def demo_face_detector():
    """FaceSwap's detector for the demo model: the real OpenCV YuNet path over :data:`DEMO_FACE_DETECTOR`."""
    from engine.imaging.face_crop import YuNetDetector

    return YuNetDetector(DEMO_FACE_DETECTOR)


def demo_controlnet(unet: torch.nn.Module, control_type: str) -> torch.nn.Module:
    """A demo ControlNet for ``control_type`` ("PyraCanny" / "CPDS"): the UNet's encoder copy (what a
    Control-LoRA starts from) with seeded ControlNet-only layers (hint embedding, zero-convs)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)
    only = torch.nn.ModuleDict({name: module for name, module in controlnet.named_children()
                                if name.startswith("controlnet_")})
    with torch.no_grad():
        _init_parameters(only, f"{_DEMO_CONTROL_TAG}/{control_type}")
    if (controlnet.device, controlnet.dtype) != (unet.device, unet.dtype):  # from_unet copies on the CPU in float32
        controlnet = controlnet.to(device=unet.device, dtype=unet.dtype)
    return controlnet.eval().requires_grad_(False)
