"""Load SDXL base and refiner models into diffusers/transformers modules.

Sources (see :func:`load_sdxl`):

* ``"demo"``: the tiny random model of :mod:`engine.sdxl.models.demo` (no files at all);
* a diffusers folder (``model_index.json``), one ``from_pretrained`` per component with
  ``use_safetensors=True, local_files_only=True``; pickle weights are refused;
* a single-file ``.safetensors`` checkpoint in the Stability/A1111/Civitai layout, converted with
  diffusers' own converters and the SDXL configs bundled in :mod:`engine.sdxl.models.configs`;
* a Hugging Face repo id, looked up in the local HF cache only (never the network).

Spec §11.1: only an SDXL base checkpoint can be the base model. Spec §8: the refiner may be an SDXL
refiner or an SDXL base; Fooocus keeps only the refiner's UNet, so the refiner role here drops the
CLIP-L encoder (it still loads VAE and bigG; see :class:`SDXLComponents`).

Memory (issue "End-to-end parity"): a 6.9 GB fp16 checkpoint must load into float32 models on a
24 GB machine. Each component is built on the meta device and its tensors are read one by one from
a fresh ``safe_open`` handle, converted to the target dtype/device at once and *assigned*
(``load_state_dict(assign=True)``), so the file is never held in memory next to the models and no
random initialisation is ever computed. The UNet (the largest part) is loaded first.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from engine.core.errors import AssetsMissing, HooocusError, InvalidRequest, ModelInvalid, UnknownModel, UnsafeFile
from engine.io.family import read_json_object
from engine.io.modules import assign_state
from engine.io.registry import ModelRegistry, detect_checkpoint_kind, has_component
from engine.io.safety import PICKLE_SUFFIXES, check_weight_file, open_safetensors_checked
from engine.sdxl.models.configs import COMPONENTS, component_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

log = logging.getLogger(__name__)

Role = Literal["base", "refiner"]
SDXL_VAE_SCALING_FACTOR = 0.13025  # sdxl-configs/base/vae/config.json; SD 1.x used 0.18215
CLIP_MAX_TOKENS = 77
#: Where each component lives in a single-file SDXL checkpoint (Stability "sgm" layout).
LDM_PREFIXES: dict[str, dict[str, str]] = {
    "base": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "refiner": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder_2": "conditioner.embedders.0.model.",
    },
}
#: safetensors ``__metadata__`` key under which :func:`engine.sdxl.models.demo.save_single_file` stores
#: the component configs, so a checkpoint of a non-SDXL-sized architecture (the tiny demo) loads
#: through the same path. Files without it use the bundled SDXL configs.
CONFIGS_METADATA_KEY = "hooocus.configs"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SDXLComponents:
    """The modules of one loaded SDXL model, in eval mode with gradients off.

    ``kind`` is what the weights are ("base" or "refiner"): an SDXL base loaded for the refiner role
    keeps ``kind="base"`` (its conditioning is used unchanged, spec §8) but has no CLIP-L.
    ``dtype`` is the compute dtype of the UNet and text encoders. The VAE may be float32 where the
    compute dtype is float16 (see :func:`vae_decode_dtype`): decode with ``latents.to(vae.dtype)``.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    #: CLIP-L; None for a refiner (SDXL refiners have no CLIP-L; Fooocus drops it from a base used as refiner).
    text_encoder: CLIPTextModel | None
    #: OpenCLIP bigG with projection.
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer | None
    #: The same BPE as ``tokenizer``; pads with "!" (id 0) like Fooocus's clip_g (spec §3.2).
    tokenizer_2: CLIPTokenizer
    kind: Literal["base", "refiner"]
    name: str
    #: "demo", "diffusers" or "single_file".
    source: str
    dtype: torch.dtype
    device: torch.device
    is_demo: bool = False
    vae_scaling_factor: float = SDXL_VAE_SCALING_FACTOR
    #: The file or folder the weights came from (None for the demo).
    path: Path | None = None


# -- dtype and device ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bind_thread_to_device(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device (a no-op elsewhere). The current device is
    per thread: with one worker thread per GPU, whatever a library allocates on "the current
    device" (streams, events, cudagraph pools, empty_cache) then lands on the worker's own GPU."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def expand_devices(devices: Sequence[str], device: str = "auto") -> list[str]:
    """One device name per worker for the ``devices`` setting. ``("auto",)`` is every visible CUDA
    GPU (``cuda:0``, ``cuda:1`` ...), else the CPU; when the older single ``device`` setting names
    a device, auto means that one device, so ``--device cuda:1`` alone still runs one worker there."""
    if tuple(devices) != ("auto",):
        return list(devices)
    if device != "auto":
        return [device]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def choose_dtype(device: str | torch.device, requested: str | torch.dtype | None = "auto") -> torch.dtype:
    """Compute dtype: an explicit request wins; ``auto`` is bf16 on CUDA when the GPU has native
    bf16 (no overflow, no VAE upcast needed), else fp16; float32 on CPU and everything else."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        if requested not in _DTYPES:
            raise InvalidRequest(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[requested]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def vae_decode_dtype(compute_dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The dtype to run the VAE in.

    The SDXL VAE overflows in fp16 (NaN/black images); its config says ``force_upcast: true`` and
    diffusers then decodes in float32. The fp16-fix VAE (``force_upcast: false``) is safe in fp16.
    bf16 has float32's range, so it never needs the upcast (sdxl-configs README, "Notes").
    """
    return torch.float32 if compute_dtype == torch.float16 and force_upcast else compute_dtype


# -- entry point --------------------------------------------------------------------------------


def load_sdxl(spec: str | os.PathLike[str], *, kind: Role = "base", device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None, registry: ModelRegistry | None = None,
              tokenizer_dir: str | os.PathLike[str] | None = None,
              hf_cache_dir: str | os.PathLike[str] | None = None,
              vae_path: str | os.PathLike[str] | None = None,
              config_dir: str | os.PathLike[str] | None = None) -> SDXLComponents:
    """Load the model ``spec`` for the ``kind`` role ("base" or "refiner").

    ``spec`` as a ``str`` is a *name* (safe to take from a client): ``"demo"``, a checkpoint name
    from ``registry`` (a ``.safetensors`` file or a diffusers folder inside a checkpoints folder),
    or a Hugging Face repo id ``org/name`` (optionally ``org/name/file.safetensors``) found in the HF
    cache. ``spec`` as a ``Path`` is an operator-given location (CLI), used as is.

    ``tokenizer_dir``: CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json) for
    single-file checkpoints; without it the HF cache is searched. ``vae_path``: a VAE override (a
    ``.safetensors`` file in diffusers or LDM layout, a diffusers VAE folder, or a registry ``vae``
    name). ``config_dir``: a folder of ``<component>/config.json`` to use instead of the bundled
    SDXL configs (or of the configs stored in the file's metadata) for a single-file checkpoint.
    """
    from engine.sdxl.models.demo import build_demo_sdxl

    if kind not in ("base", "refiner"):
        raise ValueError(f"kind must be 'base' or 'refiner', not {kind!r}")
    device = resolve_device(device)
    dtype = choose_dtype(device, dtype)
    if isinstance(spec, str) and spec == "demo":
        components = build_demo_sdxl(kind, device=device, dtype=dtype)
        if kind == "refiner":
            components.text_encoder = components.tokenizer = None
    else:
        name, location = _locate(spec, registry=registry, hf_cache_dir=hf_cache_dir)
        if location.is_dir():
            components = _load_diffusers_folder(location, name=name, role=kind, device=device, dtype=dtype,
                                                tokenizer_dir=tokenizer_dir, hf_cache_dir=hf_cache_dir)
        else:
            components = _load_single_file(location, name=name, role=kind, device=device, dtype=dtype,
                                           tokenizer_dir=tokenizer_dir, hf_cache_dir=hf_cache_dir,
                                           config_dir=config_dir)
    if vae_path is not None:
        if isinstance(vae_path, str):  # a name: resolve inside the vae folders only
            if registry is None:
                raise UnknownModel(f"unknown VAE {vae_path[:100]!r}; no VAE folders are configured")
            vae_path = registry.resolve("vae", vae_path)
        components.vae = load_vae(Path(vae_path), device=device, dtype=dtype)
        components.vae_scaling_factor = float(components.vae.config.scaling_factor)
    return components


def _locate(spec: str | os.PathLike[str], *, registry: ModelRegistry | None,
            hf_cache_dir: str | os.PathLike[str] | None) -> tuple[str, Path]:
    if not isinstance(spec, str):
        path = Path(spec)
        if not path.exists():
            raise UnknownModel(f"no model at {path}")
        return path.name, path
    if registry is not None:
        try:
            return spec, registry.resolve("checkpoints", spec)
        except UnknownModel:
            pass
    found = find_in_hf_cache(spec, cache_dir=hf_cache_dir)
    if found is not None:
        return spec, found
    if registry is not None:
        raise registry.unknown("checkpoints", spec)
    raise UnknownModel(f"unknown model {spec[:100]!r}; available: demo")


def find_in_hf_cache(spec: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached snapshot folder (diffusers layout) or ``.safetensors`` file for ``org/name`` or
    ``org/name/path/file.safetensors``; None when it is not in the cache. Never downloads."""
    parts = spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO_ID.match(repo_id) or ".." in parts or (filename and not filename.endswith(".safetensors")):
        return None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    try:
        if filename:
            hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
            return Path(hit) if isinstance(hit, str) else None
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # hub "not cached" errors are OSErrors; a bad id is a ValueError
        return None
    if (folder / "model_index.json").is_file():
        return folder
    checkpoints = sorted(folder.glob("*.safetensors"))
    if len(checkpoints) == 1:
        return checkpoints[0]
    if checkpoints:
        choices = ", ".join(f"{repo_id}/{p.name}" for p in checkpoints)
        raise InvalidRequest(f"{repo_id} holds several checkpoints; name one of: {choices}")
    return None


# -- tokenizers ---------------------------------------------------------------------------------


def load_clip_tokenizer(folder: str | os.PathLike[str], *, pad_token: str | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``).

    Special tokens follow CLIP (bos ``<|startoftext|>``, eos/unk/pad ``<|endoftext|>``, 77 tokens)
    whatever the folder's tokenizer_config says. ``pad_token`` is set *after* construction: passing
    "!" to the constructor (as diffusers' SDXL tokenizer_2 config does) makes it a special token and
    splits "cat!" differently from Fooocus, which tokenizes both encoders' text identically and only
    pads clip_g with id 0 (spec §3.2).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    try:
        if vocab.is_file() and merges.is_file():
            tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=CLIP_MAX_TOKENS)
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            tokenizer = CLIPTokenizer(vocab=model["vocab"], merges=pairs, model_max_length=CLIP_MAX_TOKENS)
        else:
            raise AssetsMissing(f"no CLIP tokenizer files (vocab.json + merges.txt) in {folder}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetsMissing(f"CLIP tokenizer files in {folder} cannot be read ({type(exc).__name__})") from None
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer


def load_clip_tokenizers(folder: str | os.PathLike[str]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer, tokenizer_2): the same BPE; the second pads with "!" (id 0)."""
    return load_clip_tokenizer(folder), load_clip_tokenizer(folder, pad_token="!")


def find_clip_tokenizer_dir(tokenizer_dir: str | os.PathLike[str] | None,
                            hf_cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The configured tokenizer folder, else one found in the HF cache, else :class:`AssetsMissing`."""
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    from huggingface_hub import try_to_load_from_cache

    cache = os.fspath(hf_cache_dir) if hf_cache_dir is not None else None
    for repo_id, sub in (("openai/clip-vit-large-patch14", ""), ("stabilityai/stable-diffusion-xl-base-1.0",
                                                                   "tokenizer/")):
        hits = [try_to_load_from_cache(repo_id, sub + f, cache_dir=cache) for f in ("vocab.json", "merges.txt")]
        if all(isinstance(hit, str) for hit in hits):
            return Path(hits[0]).parent  # type: ignore[arg-type]
    raise AssetsMissing("CLIP tokenizer files not found: set clip_tokenizer_dir to a folder with vocab.json "
                        "and merges.txt (from openai/clip-vit-large-patch14)")


# -- diffusers folders --------------------------------------------------------------------------


def check_component_weights(folder: Path) -> str | None:
    """Refuse a diffusers component folder without safetensors weights; check every weight file.

    Returns the weights ``variant`` to ask ``from_pretrained`` for ("fp16" when only
    ``*.fp16.safetensors`` files exist), else None.
    """
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        raise ModelInvalid(f"{folder.name}: component folder is missing") from None
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        if any(p.suffix.lower() in PICKLE_SUFFIXES for p in files):
            raise UnsafeFile(f"{folder.name}: only pickle weights (.bin/.pt) found; they are refused, "
                             "use a safetensors copy of the model")
        raise ModelInvalid(f"{folder.name}: no .safetensors weights")
    for path in weights:
        check_weight_file(path)
    plain = [p for p in weights if not p.name.endswith(".fp16.safetensors")]
    return None if plain else "fp16"


def _load_diffusers_folder(folder: Path, *, name: str, role: Role, device: torch.device, dtype: torch.dtype,
                           tokenizer_dir: str | os.PathLike[str] | None,
                           hf_cache_dir: str | os.PathLike[str] | None) -> SDXLComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = read_json_object(folder / "model_index.json", name)
    arch: Literal["base", "refiner"] = "base" if has_component(index, "text_encoder") else "refiner"
    _check_role(name, role, arch)
    vae_config = read_json_object(folder / "vae" / "config.json", name)
    vae_dtype = vae_decode_dtype(dtype, bool(vae_config.get("force_upcast", True)))
    want = {"unet": (UNet2DConditionModel, dtype), "vae": (AutoencoderKL, vae_dtype),
            "text_encoder_2": (CLIPTextModelWithProjection, dtype)}
    if role == "base":
        want["text_encoder"] = (CLIPTextModel, dtype)
    modules: dict[str, Any] = {}
    for part, (cls, part_dtype) in want.items():
        variant = check_component_weights(folder / part)
        # diffusers takes torch_dtype, transformers 5 takes dtype
        dtype_arg = {"torch_dtype": part_dtype} if part in ("unet", "vae") else {"dtype": part_dtype}
        try:
            module = cls.from_pretrained(folder, subfolder=part, use_safetensors=True, local_files_only=True,
                                         variant=variant, **dtype_arg)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            log.warning("loading %s of %s failed", part, folder, exc_info=True)
            raise ModelInvalid(f"{name}: the {part} weights cannot be loaded ({type(exc).__name__})") from None
        modules[part] = _own_memory(module, device).eval().requires_grad_(False)
    tokenizer, tokenizer_2 = _diffusers_tokenizers(folder, role, tokenizer_dir, hf_cache_dir)
    return SDXLComponents(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules.get("text_encoder"),
        text_encoder_2=modules["text_encoder_2"], tokenizer=tokenizer, tokenizer_2=tokenizer_2, kind=arch,
        name=name, source="diffusers", dtype=dtype, device=device,
        vae_scaling_factor=float(modules["vae"].config.scaling_factor), path=folder)


@torch.no_grad()
def _own_memory(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``module`` to ``device`` so that no tensor still points into a weight file.

    ``from_pretrained`` may hand back views into the memory-mapped safetensors file. Those would
    change (or fault with SIGBUS) if the file is rewritten while loaded, and their unaligned
    addresses make CPU kernels round differently from a copy of the same weights. Moving to a
    GPU copies anyway; on the CPU each tensor is copied once.
    """
    if device.type != "cpu":
        return module.to(device)
    for sub in module.modules():
        for _name, param in sub._parameters.items():
            if param is not None:
                param.data = param.data.clone()
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.clone()
    return module


def _diffusers_tokenizers(folder: Path, role: Role, tokenizer_dir: str | os.PathLike[str] | None,
                          hf_cache_dir: str | os.PathLike[str] | None) -> tuple[CLIPTokenizer | None, CLIPTokenizer]:
    """The folder's own vocabulary (tokenizer_2/ of a refiner, else tokenizer/); the configured
    tokenizer folder only when the model folder has none."""
    candidates = [folder / "tokenizer", folder / "tokenizer_2"]
    own = next((c for c in candidates if (c / "vocab.json").is_file() or (c / "tokenizer.json").is_file()), None)
    source = own if own is not None else find_clip_tokenizer_dir(tokenizer_dir, hf_cache_dir)
    tokenizer = load_clip_tokenizer(source) if role == "base" else None
    return tokenizer, load_clip_tokenizer(source, pad_token="!")


# -- single-file checkpoints --------------------------------------------------------------------


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors under one key prefix of an open safetensors file, read on access.

    diffusers' converters take a state dict; handing them this instead means each tensor is read
    only when the converter asks for it and is converted to the target dtype and device at once, so
    the fp16 file never sits in memory next to the float32 models.
    """

    def __init__(self, handle: Any, keys: list[str], *, dtype: torch.dtype, device: torch.device,
                 label: str) -> None:
        self._handle, self._keys = handle, dict.fromkeys(keys)
        self._dtype, self._device, self._label = dtype, device, label

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        if key not in self._keys:
            raise KeyError(key)
        try:
            tensor = self._handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelInvalid(f"{self._label}: tensor {key!r} cannot be read ({str(exc)[:100]})") from None
        if tensor.is_floating_point():
            return tensor.to(device=self._device, dtype=self._dtype)
        return tensor.to(device=self._device)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load_single_file(path: Path, *, name: str, role: Role, device: torch.device, dtype: torch.dtype,
                      tokenizer_dir: str | os.PathLike[str] | None, hf_cache_dir: str | os.PathLike[str] | None,
                      config_dir: str | os.PathLike[str] | None) -> SDXLComponents:
    info = check_weight_file(path)
    detected = detect_checkpoint_kind(info.tensors)
    if detected not in ("sdxl_base", "sdxl_refiner"):
        what = "an SD 1.5 checkpoint" if detected == "sd15" else "not an SDXL checkpoint"
        raise ModelInvalid(f"{name}: {what}; only SDXL base and refiner checkpoints are supported")
    arch: Literal["base", "refiner"] = "base" if detected == "sdxl_base" else "refiner"
    _check_role(name, role, arch)
    configs = single_file_configs(arch, metadata=info.metadata, config_dir=config_dir)
    tokenizer_folder = find_clip_tokenizer_dir(tokenizer_dir, hf_cache_dir)  # fail before the long load
    vae_dtype = vae_decode_dtype(dtype, bool(configs["vae"].get("force_upcast", True)))
    parts = ["unet", "text_encoder_2", "vae"] + (["text_encoder"] if role == "base" else [])
    modules: dict[str, torch.nn.Module] = {}
    for part in parts:
        prefix = LDM_PREFIXES[arch][part]
        # A fresh handle per component: its memory map (and the page cache it pins) goes away with it.
        with open_safetensors_checked(path) as handle:
            tensors = _LazyTensors(handle, [k for k in info.tensors if k.startswith(prefix)],
                                   dtype=vae_dtype if part == "vae" else dtype, device=device, label=name)
            modules[part] = load_ldm_component(part, tensors, configs[part], arch=arch)
    tokenizer, tokenizer_2 = load_clip_tokenizers(tokenizer_folder)
    return SDXLComponents(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules.get("text_encoder"),  # type: ignore[arg-type]
        text_encoder_2=modules["text_encoder_2"], tokenizer=tokenizer if role == "base" else None,  # type: ignore[arg-type]
        tokenizer_2=tokenizer_2, kind=arch, name=name, source="single_file", dtype=dtype, device=device,
        vae_scaling_factor=float(configs["vae"].get("scaling_factor", SDXL_VAE_SCALING_FACTOR)), path=path)


def single_file_configs(arch: Literal["base", "refiner"], *, metadata: Mapping[str, str] | None = None,
                        config_dir: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Component configs for a single-file checkpoint: ``config_dir`` if given, else the configs
    stored in the file's metadata (written by ``save_single_file``), else the bundled SDXL ones."""
    parts = [c for c in COMPONENTS if c in LDM_PREFIXES[arch]]
    if config_dir is not None:
        return {part: read_json_object(Path(config_dir) / part / "config.json", part) for part in parts}
    stored = (metadata or {}).get(CONFIGS_METADATA_KEY)
    if stored is not None:
        try:
            configs = json.loads(stored)
            if all(isinstance(configs.get(part), dict) for part in parts):
                return {part: configs[part] for part in parts}
        except (ValueError, AttributeError):
            pass
        raise ModelInvalid(f"the {CONFIGS_METADATA_KEY} metadata of this checkpoint is malformed")
    return {part: component_config(arch, part) for part in parts}


def load_ldm_component(component: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                       arch: Literal["base", "refiner"] = "base") -> torch.nn.Module:
    """Build one component on the meta device and assign it the converted checkpoint tensors.

    ``tensors`` holds the component's keys in the single-file layout (full names, e.g.
    ``model.diffusion_model.input_blocks.0.0.weight``), already in the target dtype and device.
    The result is in eval mode with gradients off. Raises :class:`ModelInvalid` when tensors are
    missing or have the wrong shape. With meta tensors in, the module stays on meta (used to
    prove the key mapping of a full-size checkpoint without the file).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    config = dict(config)
    try:
        model = _empty_module(component, config)
        if component == "unet":
            state = convert_ldm_unet_checkpoint(tensors, config)
        elif component == "vae":
            state = convert_ldm_vae_checkpoint(tensors, config)
        elif component == "text_encoder":
            state = convert_ldm_clip_checkpoint(tensors)
            if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
        elif component == "text_encoder_2":
            state = convert_open_clip_checkpoint(model, tensors, prefix=LDM_PREFIXES[arch]["text_encoder_2"])
        else:
            raise ValueError(f"unknown component {component!r}")
    except HooocusError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        log.warning("converting %s failed", component, exc_info=True)
        raise ModelInvalid(f"the {component} tensors do not fit the expected architecture "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None
    _assign_state(model, state, component)
    return model


def _empty_module(component: str, config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):  # parameters without storage; the checkpoint supplies every value
        if component == "unet":
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        clip_config = CLIPTextConfig.from_dict(config)
        if component == "text_encoder":
            return CLIPTextModel(clip_config)
        return CLIPTextModelWithProjection(clip_config)


#: Checkpoint entries that are not parameters of our modules: CLIP's position ids (a buffer we
#: rebuild) and OpenCLIP's logit_scale (used only for image-text contrast, not by SDXL).
_NOT_PARAMETERS = ("position_ids", "logit_scale")


def _assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], component: str) -> None:
    assign_state(model, {k: v for k, v in state.items() if not k.endswith(_NOT_PARAMETERS)}, component,
                 source="checkpoint")


# -- VAE override (spec §11.3) ------------------------------------------------------------------


def load_vae(path: Path, *, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE from a diffusers VAE folder (config.json + safetensors) or a single ``.safetensors``
    file in diffusers or LDM layout, read with the VAE config stored in its metadata (see
    ``save_single_file``) or else the bundled SDXL VAE config."""
    from diffusers import AutoencoderKL

    label = path.name
    if path.is_dir():
        variant = check_component_weights(path)
        config = read_json_object(path / "config.json", label)
        vae_dtype = vae_decode_dtype(dtype, bool(config.get("force_upcast", True)))
        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True, variant=variant,
                                                torch_dtype=vae_dtype)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise ModelInvalid(f"{label}: the VAE cannot be loaded ({type(exc).__name__})") from None
        return _own_memory(vae, device).eval().requires_grad_(False)
    info = check_weight_file(path)
    stored = info.metadata.get(CONFIGS_METADATA_KEY)
    config = _stored_vae_config(stored, label) if stored is not None else component_config("base", "vae")
    vae_dtype = vae_decode_dtype(dtype, bool(config["force_upcast"]))
    diffusers_layout = any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for k in info.tensors)
    with open_safetensors_checked(path) as handle:
        tensors = _LazyTensors(handle, list(info.tensors), dtype=vae_dtype, device=device, label=label)
        if diffusers_layout:
            vae = _empty_module("vae", config)
            _assign_state(vae, dict(tensors), "vae")
            return vae  # type: ignore[return-value]
        return load_ldm_component("vae", tensors, config)  # type: ignore[return-value]


def _stored_vae_config(stored: str, label: str) -> dict[str, Any]:
    try:
        config = json.loads(stored)["vae"]
    except (ValueError, KeyError, TypeError):
        config = None
    if not isinstance(config, dict):
        raise ModelInvalid(f"{label}: the {CONFIGS_METADATA_KEY} metadata has no VAE config")
    return config


# -- helpers ------------------------------------------------------------------------------------


def _check_role(name: str, role: Role, arch: Literal["base", "refiner"]) -> None:
    if role == "base" and arch == "refiner":
        raise ModelInvalid(f"{name} is an SDXL refiner; the base model must be an SDXL base model")
