"""Load FLUX.1 [schnell] / [dev] weights into diffusers/transformers modules (issue 17).

Sources (see :func:`load_flux`):

* a diffusers folder (``model_index.json`` with a ``FluxPipeline``; an HF-cache snapshot is one):
  one ``from_pretrained(local_files_only=True, use_safetensors=True)`` per component;
* a single ``.safetensors`` transformer in the Black Forest Labs layout (``flux1-schnell.safetensors``:
  ``double_blocks.*`` / ``single_blocks.*``) or saved by diffusers, plus separate CLIP-L, T5-XXL and VAE
  files or folders (``clip_path``, ``t5_path``, ``vae_path``);
* a ComfyUI all-in-one file: the transformer under ``model.diffusion_model.``, CLIP-L under
  ``text_encoders.clip_l.transformer.``, T5 under ``text_encoders.t5xxl.transformer.``, the VAE (LDM
  layout, like BFL's ``ae.safetensors``) under ``vae.`` or ``first_stage_model.``.

Single files use the configs bundled in :mod:`engine.flux.configs` (or a ``config_dir`` in diffusers
folder layout, or configs stored in the file's ``hooocus.configs`` metadata, which is how a tiny test
model of another size loads through the same path); nothing is fetched. Pickles are refused
(:func:`engine.io.safety.check_weight_file`).

Memory: like the SDXL loader, each module is built on the meta device and its tensors are read one by
one from a ``safe_open`` handle, converted and *assigned*, so a file never sits in memory next to the
model. float8: a transformer stored in ``float8_e4m3fn``/``float8_e5m2`` stays in float8 in memory;
diffusers' layerwise casting (``apply_layerwise_casting``) upcasts each layer's weights to the compute
dtype for its forward pass only. Layers diffusers skips (norms, embeddings: its default skip patterns)
are upcast once at load, as they would be in a plain load.

The BFL <-> diffusers key mapping is written here from the FLUX.1 architecture rather than taken from
diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, because that converter hard-codes the
full-size width (3072) and so cannot load a smaller model; the test checks that both agree on the
full-size shapes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import AssetsMissing, HooocusError, InvalidRequest, ModelInvalid, UnknownModel, UnsafeFile
from engine.flux.components import FluxComponents, FluxVariant
from engine.flux.configs import bundled_config
from engine.io.family import WeightsFamily, classify_keys, detect_family, inspect_weights, read_json_object
from engine.io.modules import assign_state
from engine.io.safety import PICKLE_SUFFIXES, check_weight_file, open_safetensors_checked

if TYPE_CHECKING:
    from engine.core.settings import Settings

__all__ = ["detect_family", "inspect_weights", "load_flux", "bfl_to_diffusers", "diffusers_to_bfl"]

log = logging.getLogger(__name__)

#: safetensors ``__metadata__`` key holding ``{"transformer": {...}, "vae": {...}, ...}`` configs; the same
#: key the SDXL single-file loader reads, so one convention covers both families.
CONFIGS_METADATA_KEY = "hooocus.configs"
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_l.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.")
VAE_PREFIXES = ("vae.", "first_stage_model.")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: diffusers' FluxSingleTransformerBlock widens its MLP by this factor (its ``mlp_ratio`` default).
MLP_RATIO = 4
#: Repos whose cached download supplies tokenizer/ + tokenizer_2/ for a single-file model.
TOKENIZER_REPOS = ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
#: component -> the load_flux argument that supplies it for a transformer-only file.
_OPTION_OF = {"text_encoder": "clip_path", "text_encoder_2": "t5_path", "vae": "vae_path"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Checkpoint entries that are not parameters of our modules (CLIP's position ids is a rebuilt buffer,
#: its ``text_projection``/``logit_scale`` belong to the contrastive head Flux does not use).
_NOT_PARAMETERS = ("position_ids", "logit_scale", "text_projection.weight")
#: ComfyUI "scaled fp8" files store per-tensor scales that plain float8 storage cannot honour.
_SCALED_FP8_MARKS = ("scale_weight", "scaled_fp8")


# -- dtype ----------------------------------------------------------------------------------------


def choose_dtype(device: torch.device, requested: str | torch.dtype | None = None) -> torch.dtype:
    """An explicit request wins; otherwise bfloat16 on CUDA (FLUX.1 is trained in bf16 and T5 overflows
    in float16) and float32 elsewhere."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        if requested not in _DTYPES:
            raise InvalidRequest(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# -- entry point ----------------------------------------------------------------------------------


def load_flux(path_or_folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = None, clip_path: str | os.PathLike[str] | None = None,
              t5_path: str | os.PathLike[str] | None = None, vae_path: str | os.PathLike[str] | None = None,
              tokenizer_dir: str | os.PathLike[str] | None = None,
              config_dir: str | os.PathLike[str] | None = None, keep_float8: bool = True,
              hf_cache_dir: str | os.PathLike[str] | None = None, name: str | None = None,
              settings: Settings | None = None) -> FluxComponents:
    """Load a FLUX.1 model from a diffusers folder or a single ``.safetensors`` file.

    ``clip_path`` / ``t5_path`` / ``vae_path``: a component as a ``.safetensors`` file or a diffusers
    component folder; required for a transformer-only file, and they override the all-in-one file's
    or folder's own. ``tokenizer_dir``: a folder with ``tokenizer/`` (CLIP BPE) and ``tokenizer_2/``
    (T5 sentencepiece) subfolders, e.g. an existing FLUX.1 diffusers download; a diffusers folder
    brings its own. ``config_dir``: a diffusers-layout folder whose ``<component>/config.json`` replace
    the bundled configs for a single file. ``keep_float8``: keep a float8 transformer in float8 with
    per-layer upcast (else it is upcast once to ``dtype``).

    ``path_or_folder`` is an operator-given location, or a Hugging Face repo id ``org/name`` (optionally
    ``org/name/file.safetensors``) found in the local HF cache (``hf_cache_dir``, default the HF default;
    never the network). A name a *client* sent must be resolved through the model registry first.
    Without ``tokenizer_dir``, a single file takes its tokenizers from a cached FLUX.1 repo.

    ``settings`` (the runtime's): fills what was not given from where ``hooocus setup --only flux-schnell``
    installs (see :func:`companion_files`) and ``settings.hf_cache_dir``.
    """
    if settings is not None:
        hf_cache_dir = hf_cache_dir if hf_cache_dir is not None else settings.hf_cache_dir
    location = Path(path_or_folder)
    if not location.exists():
        cached = find_in_hf_cache(str(path_or_folder), cache_dir=hf_cache_dir)
        if cached is None:
            raise UnknownModel(f"no model at {str(path_or_folder)[:200]} (nor in the Hugging Face cache)")
        location = cached
    label = name or (str(path_or_folder) if location != Path(path_or_folder) else location.name)
    device = torch.device(device)
    dtype = choose_dtype(device, dtype)
    if location.is_dir():
        found = inspect_weights(location)
        if found.family != "flux":
            raise ModelInvalid(f"{label}: not a FLUX.1 diffusers folder (model_index.json names no FluxPipeline)")
        parts = _load_folder(location, found, label=label, device=device, dtype=dtype, keep_float8=keep_float8)
        own_tokenizers: Path | None = location
    else:
        parts = _load_file(location, label=label, device=device, dtype=dtype, config_dir=config_dir,
                           keep_float8=keep_float8)
        own_tokenizers = None
    if settings is not None and own_tokenizers is None:
        found = companion_files(location, settings)
        clip_path = clip_path if clip_path is not None or parts["text_encoder"] is not None else found.get("clip_path")
        t5_path = t5_path if t5_path is not None or parts["text_encoder_2"] is not None else found.get("t5_path")
        vae_path = vae_path if vae_path is not None or parts["vae"] is not None else found.get("vae_path")
        tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else found.get("tokenizer_dir")
    for key, override in (("text_encoder", clip_path), ("text_encoder_2", t5_path), ("vae", vae_path)):
        if override is not None:
            parts[key] = load_component(key, Path(override), device=device, dtype=dtype,
                                        config=_config_for(key, parts["variant"], config_dir, {}))
    missing = [option for key, option in _OPTION_OF.items() if parts.get(key) is None]
    if missing:
        options = ", ".join(missing)
        raise AssetsMissing(f"{label} holds only the FLUX.1 transformer; give {options} "
                            "(CLIP-L, T5-XXL and VAE files or folders)")
    if tokenizer_dir is not None:
        own_tokenizers = Path(tokenizer_dir)
    elif own_tokenizers is None:
        own_tokenizers = next(filter(None, (find_in_hf_cache(repo, cache_dir=hf_cache_dir)
                                            for repo in TOKENIZER_REPOS)), None)
    tokenizer, tokenizer_2 = load_flux_tokenizers(own_tokenizers)
    return FluxComponents(
        transformer=parts["transformer"], vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer,
        text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizer_2, scheduler_config=parts["scheduler_config"],
        variant=parts["variant"], name=label)


# -- companion files of a transformer-only file ------------------------------------------------------

#: File names tried for each companion, best first (a float8 T5 is upcast at load; "scaled" ones are refused).
COMPANION_NAMES = {"clip_path": ("clip_l.safetensors",),
                   "t5_path": ("t5xxl_fp16.safetensors", "t5xxl.safetensors", "t5xxl_fp8_e4m3fn.safetensors"),
                   "vae_path": ("ae.safetensors",)}


def companion_files(transformer: Path, settings: Settings) -> dict[str, Path]:
    """CLIP-L / T5 / VAE files and the tokenizer folder for a transformer-only file: where the flux-schnell
    set-up group installs them (``settings.data_dir``), the VAE folders (``settings.vae_dirs``), and the
    ComfyUI folders next to the file's own ``models/`` folder (``text_encoders``, ``clip``, ``vae``), so a
    file inside a ComfyUI tree finds its encoders. Only the keys found are returned."""
    from engine.io.setup.catalogue import flux_schnell_paths

    installed = flux_schnell_paths(settings.data_dir)
    comfy_models = transformer.resolve().parent.parent
    folders = {
        "clip_path": [installed["clip_path"].parent, comfy_models / "text_encoders", comfy_models / "clip"],
        "t5_path": [installed["t5_path"].parent, comfy_models / "text_encoders", comfy_models / "clip"],
        "vae_path": [installed["vae_path"].parent, *settings.vae_dirs, comfy_models / "vae"],
    }
    found: dict[str, Path] = {}
    for key, names in COMPANION_NAMES.items():
        hit = next((folder / n for n in names for folder in folders[key] if (folder / n).is_file()), None)
        if hit is not None:
            found[key] = hit
    if (installed["tokenizer_dir"] / "tokenizer_2").is_dir():
        found["tokenizer_dir"] = installed["tokenizer_dir"]
    return found


# -- the Hugging Face cache --------------------------------------------------------------------------


def find_in_hf_cache(spec: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached snapshot folder of ``org/name`` or the cached ``org/name/path/file.safetensors``; None
    when not cached. Never downloads (``local_files_only``)."""
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
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # hub "not cached" errors are OSErrors; a bad id is a ValueError
        return None


# -- tokenizers -----------------------------------------------------------------------------------


def load_flux_tokenizers(folder: Path | None) -> tuple[Any, Any]:
    """(CLIP tokenizer, T5 tokenizer) from ``folder/tokenizer`` and ``folder/tokenizer_2`` (local files only)."""
    from transformers import CLIPTokenizer, T5Tokenizer

    if folder is None:
        raise AssetsMissing("FLUX.1 tokenizer files not found: set the tokenizer folder to a FLUX.1 diffusers "
                            "download (it has tokenizer/ and tokenizer_2/)")
    loaded = []
    for sub, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5Tokenizer)):
        try:
            loaded.append(cls.from_pretrained(folder / sub, local_files_only=True))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise AssetsMissing(f"{folder.name}/{sub}: tokenizer files cannot be read ({type(exc).__name__})") from None
    return loaded[0], loaded[1]


# -- diffusers folders ----------------------------------------------------------------------------


def _component_class(component: str) -> type:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    return {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel}[component]


def check_component_weights(folder: Path) -> None:
    """Refuse a component folder without safetensors weights (pickles never load); check each weight file."""
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


def _load_folder(folder: Path, found: WeightsFamily, *, label: str, device: torch.device, dtype: torch.dtype,
                 keep_float8: bool) -> dict[str, Any]:
    variant: FluxVariant = found.variant or "schnell"
    parts: dict[str, Any] = {"variant": variant}
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        parts[component] = _from_pretrained(component, folder / component, label=label, device=device,
                                            dtype=dtype)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    parts["scheduler_config"] = read_json_object(scheduler, label) if scheduler.is_file() else bundled_config(
        "scheduler", variant)
    return parts


def _from_pretrained(component: str, folder: Path, *, label: str, device: torch.device,
                     dtype: torch.dtype) -> torch.nn.Module:
    check_component_weights(folder)
    cls = _component_class(component)
    # diffusers takes torch_dtype, transformers 5 takes dtype
    dtype_arg = {"torch_dtype": dtype} if component in ("transformer", "vae") else {"dtype": dtype}
    try:
        module = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **dtype_arg)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        log.warning("loading %s of %s failed", component, folder, exc_info=True)
        raise ModelInvalid(f"{label}: the {component} weights cannot be loaded ({type(exc).__name__})") from None
    return _own_memory(module, device).eval().requires_grad_(False)


@torch.no_grad()
def _own_memory(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``module`` to ``device`` so no tensor still points into a memory-mapped weight file (a
    rewritten file would change it under us; see the SDXL loader for the same step)."""
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


# -- single files ---------------------------------------------------------------------------------


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors under one key prefix of an open safetensors file, read on access with the prefix
    removed, converted to ``dtype`` at once (float8 tensors are left in float8 when ``keep_float8``)."""

    def __init__(self, handle: Any, keys: list[str], prefix: str, *, dtype: torch.dtype, device: torch.device,
                 label: str, keep_float8: bool = False) -> None:
        self._handle, self._prefix = handle, prefix
        self._keys = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        self._dtype, self._device, self._label, self._keep_float8 = dtype, device, label, keep_float8

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            tensor = self._handle.get_tensor(self._keys[key])
        except KeyError:
            raise KeyError(key) from None
        except (SafetensorError, OSError) as exc:
            raise ModelInvalid(f"{self._label}: tensor {key!r} cannot be read ({str(exc)[:100]})") from None
        if not tensor.is_floating_point() or (self._keep_float8 and tensor.dtype in FLOAT8_DTYPES):
            return tensor.to(device=self._device)
        return tensor.to(device=self._device, dtype=self._dtype)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load_file(path: Path, *, label: str, device: torch.device, dtype: torch.dtype,
               config_dir: str | os.PathLike[str] | None, keep_float8: bool) -> dict[str, Any]:
    info = check_weight_file(path)
    found = classify_keys(info.tensors)
    if found.family != "flux":
        what = "an SDXL checkpoint" if found.family == "sdxl" else "not a FLUX.1 checkpoint"
        raise ModelInvalid(f"{label}: {what}; expected a FLUX.1 transformer or all-in-one file")
    if any(k.endswith(_SCALED_FP8_MARKS) for k in info.tensors):
        raise ModelInvalid(f"{label}: a 'scaled fp8' file (per-tensor scale_weight); use a plain float8, bf16 "
                           "or fp16 copy")
    variant: FluxVariant = found.variant or "schnell"
    stored = _stored_configs(info.metadata, label)
    parts: dict[str, Any] = {"variant": variant,
                             "scheduler_config": _config_for("scheduler", variant, config_dir, stored)}
    prefix = found.prefix or ""
    transformer_config = _config_for("transformer", variant, config_dir, stored)
    with open_safetensors_checked(path) as handle:  # one handle per component: its memory map goes with it
        tensors = _LazyTensors(handle, list(info.tensors), prefix, dtype=dtype, device=device, label=label,
                               keep_float8=keep_float8)
        bfl = found.layout != "diffusers_transformer"
        parts["transformer"] = build_transformer(tensors, transformer_config, bfl_layout=bfl, compute_dtype=dtype)
    for component, prefixes in (("text_encoder", CLIP_PREFIXES), ("text_encoder_2", T5_PREFIXES),
                                ("vae", VAE_PREFIXES)):
        inner = next((p for p in prefixes if any(k.startswith(p) for k in info.tensors)), None)
        if inner is None:
            parts[component] = None
            continue
        with open_safetensors_checked(path) as handle:
            tensors = _LazyTensors(handle, list(info.tensors), inner, dtype=dtype, device=device, label=label)
            parts[component] = build_component(component, tensors, _config_for(component, variant, config_dir,
                                                                                 stored))
    return parts


def load_component(component: str, path: Path, *, device: torch.device, dtype: torch.dtype,
                   config: Mapping[str, Any]) -> torch.nn.Module:
    """One of CLIP-L / T5 / VAE from a diffusers component folder or a ``.safetensors`` file (keys bare,
    or under the ComfyUI prefixes; a VAE in diffusers or LDM/BFL ``ae.safetensors`` layout)."""
    if path.is_dir():
        return _from_pretrained(component, path, label=path.name, device=device, dtype=dtype)
    info = check_weight_file(path)
    stored = _stored_configs(info.metadata, path.name).get(component)
    prefixes = {"text_encoder": CLIP_PREFIXES, "text_encoder_2": T5_PREFIXES, "vae": VAE_PREFIXES}[component]
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in info.tensors)), "")
    with open_safetensors_checked(path) as handle:
        tensors = _LazyTensors(handle, list(info.tensors), prefix, dtype=dtype, device=device, label=path.name)
        return build_component(component, tensors, stored if isinstance(stored, dict) else config)


def _stored_configs(metadata: Mapping[str, str], label: str) -> dict[str, Any]:
    stored = metadata.get(CONFIGS_METADATA_KEY)
    if stored is None:
        return {}
    try:
        configs = json.loads(stored)
    except ValueError:
        configs = None
    if not isinstance(configs, dict):
        raise ModelInvalid(f"{label}: the {CONFIGS_METADATA_KEY} metadata is malformed")
    return configs


def _config_for(component: str, variant: FluxVariant, config_dir: str | os.PathLike[str] | None,
                stored: Mapping[str, Any]) -> dict[str, Any]:
    if config_dir is not None:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return read_json_object(Path(config_dir) / component / name, component)
    if isinstance(stored.get(component), dict):
        return dict(stored[component])
    return bundled_config(component, variant)


# -- building modules from tensors ----------------------------------------------------------------


def build_transformer(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, bfl_layout: bool,
                      compute_dtype: torch.dtype) -> torch.nn.Module:
    """A ``FluxTransformer2DModel`` from tensors in BFL (``bfl_layout``) or diffusers naming.

    float8 tensors stay float8 in the layers diffusers' layerwise casting handles; the rest are
    upcast to ``compute_dtype`` here.
    """
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        state = bfl_to_diffusers(tensors, config) if bfl_layout else {k: tensors[k] for k in tensors}
    except HooocusError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelInvalid(f"the transformer tensors do not fit the FLUX.1 architecture "
                           f"({type(exc).__name__}: {str(exc)[:160]})") from None
    has_float8 = any(t.dtype in FLOAT8_DTYPES for t in state.values())
    assign_state(model, state, "transformer")
    if has_float8:
        storage = next(t.dtype for t in state.values() if t.dtype in FLOAT8_DTYPES)
        keep_float8_storage(model, storage_dtype=storage, compute_dtype=compute_dtype)
    return model


@torch.no_grad()
def keep_float8_storage(model: torch.nn.Module, *, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    """Per-layer upcast (diffusers' ``apply_layerwise_casting``) for a model holding float8 weights.

    Exactly the Linear/Conv layers whose weight is float8 get the hook (their weights are cast to
    ``compute_dtype`` for their own forward only). ``enable_layerwise_casting`` would also skip every
    module named ``*norm*``; diffusers does that so as not to *downcast* the Flux modulation linears
    (``norm1.linear``, ~3.2B of the 11.9B parameters), but here their weights are float8 in the file
    already, so hooking them loses nothing and keeps them in float8. Any other float8 tensor (a norm
    scale) is upcast once here, since nothing would upcast it later. Note: the hook stores a hooked
    layer's bias in float8 too (a bf16 bias next to a float8 weight is rounded to float8).
    """
    from diffusers.hooks import apply_layerwise_casting

    plain = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and module.weight.dtype not in FLOAT8_DTYPES]
    # "(?!)" never matches: with no pattern (None) diffusers would hook the root module as one layer.
    skip = tuple(f"^{re.escape(name)}$" for name in plain) or ("(?!)",)
    apply_layerwise_casting(model, storage_dtype, compute_dtype, skip_modules_pattern=skip)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in FLOAT8_DTYPES:
                setattr(module, name, torch.nn.Parameter(param.data.to(compute_dtype), requires_grad=False))


def build_component(component: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> torch.nn.Module:
    """CLIP-L (``text_encoder``), T5 (``text_encoder_2``) or the VAE from tensors with their prefix removed."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = _empty_module(component, config)
        state = {k: tensors[k] for k in tensors if not k.endswith(_NOT_PARAMETERS)}
        if component == "text_encoder" and not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIP
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        elif component == "text_encoder_2":
            # T5 ties the input embedding: files hold either name (ComfyUI's t5xxl files only ``shared``).
            for a, b in (("shared.weight", "encoder.embed_tokens.weight"),
                         ("encoder.embed_tokens.weight", "shared.weight")):
                if a in state and b not in state:
                    state[b] = state[a]
        elif component == "vae" and not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks."))
                                            for k in state):
            state = convert_ldm_vae_checkpoint(state, config)  # BFL ae.safetensors / LDM naming
    except HooocusError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise ModelInvalid(f"the {component} tensors do not fit the expected architecture "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None
    assign_state(model, state, component)
    return model


def _empty_module(component: str, config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):  # parameters without storage; the file supplies every value
        if component == "vae":
            return AutoencoderKL.from_config(config)
        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig.from_dict(config))
        if component == "text_encoder_2":
            return T5EncoderModel(T5Config.from_dict(config))
    raise ValueError(f"unknown component {component!r}")


# -- the BFL <-> diffusers transformer key mapping --------------------------------------------------

#: One mapping row: BFL key, the diffusers keys it holds (several when BFL fuses them along dim 0),
#: and whether the two halves are swapped (BFL's final AdaLN is (shift, scale), diffusers' (scale, shift)).
_Row = tuple[str, tuple[str, ...], bool]


def _linear(bfl: str, diffusers: str | tuple[str, ...], swap: bool = False) -> list[_Row]:
    names = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [(f"{bfl}.{p}", tuple(f"{d}.{p}" for d in names), swap) for p in ("weight", "bias")]


def transformer_key_rows(config: Mapping[str, Any]) -> list[_Row]:
    """Every BFL tensor name of a FLUX.1 transformer of ``config`` with its diffusers counterpart(s)."""
    rows: list[_Row] = [
        *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        *_linear("txt_in", "context_embedder"),
        *_linear("img_in", "x_embedder"),
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True),
    ]
    if config.get("guidance_embeds"):
        rows += [*_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                 *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    for i in range(int(config.get("num_layers", 19))):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        rows += [
            *_linear(f"{b}.img_mod.lin", f"{d}.norm1.linear"),
            *_linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear"),
            *_linear(f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            *_linear(f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            *_linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0"),
            *_linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out"),
            *_linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj"),
            *_linear(f"{b}.img_mlp.2", f"{d}.ff.net.2"),
            *_linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *_linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2"),
            (f"{b}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), False),
            (f"{b}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), False),
            (f"{b}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",), False),
            (f"{b}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",), False),
        ]
    for i in range(int(config.get("num_single_layers", 38))):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rows += [
            *_linear(f"{b}.modulation.lin", f"{d}.norm.linear"),
            *_linear(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")),
            *_linear(f"{b}.linear2", f"{d}.proj_out"),
            (f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), False),
            (f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), False),
        ]
    return rows


def split_sizes(config: Mapping[str, Any], parts: int) -> list[int]:
    """Row counts of the pieces of a BFL fused tensor: q, k, v (, the single block's MLP)."""
    inner = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
    return [inner] * 3 + ([inner * MLP_RATIO] if parts == 4 else [])


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def bfl_to_diffusers(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A BFL-layout transformer state dict (prefix removed) in diffusers naming. Raises :class:`ModelInvalid`
    naming the first missing tensor, or when the file has more blocks than ``config``."""
    out: dict[str, torch.Tensor] = {}
    rows = transformer_key_rows(config)
    for bfl, names, swap in rows:
        if bfl not in tensors:
            raise ModelInvalid(f"the transformer lacks {bfl!r} (a FLUX.1 file with a different architecture?)")
        tensor = tensors[bfl]
        if swap:
            tensor = _swap_halves(tensor)
        pieces = torch.split(tensor, split_sizes(config, len(names)), dim=0) if len(names) > 1 else (tensor,)
        if len(names) > 1 and sum(p.shape[0] for p in pieces) != tensor.shape[0]:
            raise ModelInvalid(f"the transformer tensor {bfl!r} has {tensor.shape[0]} rows, "
                               "not what the config says")
        out.update(zip(names, pieces, strict=True))
    known = {bfl for bfl, _, _ in rows}
    extra_blocks = sorted({m.group(0) for k in tensors if k not in known and (m := _BLOCK_INDEX.match(k))})
    if extra_blocks:
        raise ModelInvalid(f"the transformer has blocks the config lacks (e.g. {extra_blocks[0]!r}); "
                           "wrong config for this file")
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`bfl_to_diffusers`: a diffusers ``FluxTransformer2DModel`` state dict in BFL naming
    (how ``flux1-schnell.safetensors`` names its tensors)."""
    out: dict[str, torch.Tensor] = {}
    for bfl, names, swap in transformer_key_rows(config):
        tensor = torch.cat([state[n] for n in names], dim=0) if len(names) > 1 else state[names[0]]
        out[bfl] = (_swap_halves(tensor) if swap else tensor).contiguous()
    return out
