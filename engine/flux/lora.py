"""FLUX.1 LoRA files: read (safetensors only), convert to diffusers naming, merge into the weights (issue 17).

Like the SDXL LoRA code (:mod:`engine.sdxl.models.lora`), LoRAs are *merged* into the weights when the
model is set up, and the original values of exactly the touched weights are kept so a different
LoRA set can be merged later from the untouched model (bit for bit). No PEFT layers: the transformer
keeps its plain modules, so float8 layerwise casting, previews and the runner see no difference.

Layouts (each covered at full size, every target module, in tests/flux/test_flux_lora_layouts.py):

- kohya (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``: BFL module names
  with ``_`` for ``.``; ``lora_te1_``/``lora_te_`` for CLIP-L; also ``lora_transformer_`` + diffusers
  module names): mapped here from the model's own module names and the BFL key table of
  :mod:`engine.flux.loading`, a fused up-projection split into q/k/v(/mlp) pieces that share the
  down-projection. diffusers' ``_convert_kohya_flux_lora_to_diffusers`` does the same but hard-codes
  the full-size widths (3072/12288), so it cannot serve a model of another width.
- BFL / ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` / ``lora_B`` / ``.alpha``,
  also without the prefix, with ``model.diffusion_model.`` or fal's ``base_model.model.``, and ComfyUI's
  ``text_encoders.clip_l.transformer.`` for CLIP-L): the same BFL module names as kohya, so they are renamed
  to kohya's and matched as above. diffusers' loader would pass these keys through unconverted (it only
  converts BFL names for Control LoRAs and fal Kontext files, with the full-size widths hard-coded).
- everything else (diffusers/PEFT ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` with an
  optional ``<module>.alpha``, also with kohya's ``lora_down``/``lora_up`` endings, XLabs
  ``double_blocks.0.processor.qkv_lora1.down.weight``): diffusers' own
  ``FluxLoraLoaderMixin.lora_state_dict`` converts to diffusers naming first.
- FLUX.1 Control LoRAs (Canny/Depth: BFL names plus ``query_norm.scale`` norm weights and a widened
  ``img_in``) need a control image input Hooocus does not have: refused with a clear
  :class:`ModelInvalid`, not half-applied; so are DoRA files (``dora_scale``), whose update is not a plain sum.

A file that leaves more than :data:`MAX_UNMATCHED_KEYS` keys unmatched is skipped with a warning (the
rule Fooocus applies to SDXL LoRAs, spec §11.1, kept for the same reason: a LoRA for another model
family must not half-apply).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.core.errors import ModelInvalid
from engine.flux.loading import split_sizes, transformer_key_rows
from engine.io.safety import check_weight_file, open_safetensors_checked

log = logging.getLogger(__name__)

MAX_UNMATCHED_KEYS = 12
TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
_COMPONENTS = (TRANSFORMER, TEXT_ENCODER)
#: safetensors header dtype names of the float tensors a LoRA holds (stand-in shapes for the fit check).
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_A, _B = ".lora_A.weight", ".lora_B.weight"
_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_KOHYA_PREFIXES = {"lora_unet_": TRANSFORMER, "lora_transformer_": TRANSFORMER, "lora_te1_": TEXT_ENCODER,
                   "lora_te_": TEXT_ENCODER}

#: The top-level module names of a BFL FLUX.1 transformer: a LoRA key naming one of them (after one of
#: :data:`_BFL_PREFIXES`) is in the BFL / ComfyUI layout.
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")
#: The bare BFL names (no prefix) last, so a prefixed key is never read as an unknown bare one.
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "")
_COMFY_CLIP_L = "text_encoders.clip_l.transformer."
#: BFL/ComfyUI key endings -> kohya's (PEFT's lora_A is kohya's down-projection, lora_B its up).
_TO_KOHYA_SUFFIX = {_A: _KOHYA_DOWN, _B: _KOHYA_UP, _KOHYA_DOWN: _KOHYA_DOWN, _KOHYA_UP: _KOHYA_UP,
                    _KOHYA_ALPHA: _KOHYA_ALPHA}
#: A key only FLUX.1 Control LoRAs have (their q/k norm scales are trained in full, not low-rank).
_CONTROL_MARK = "query_norm.scale"
#: DoRA's per-output magnitudes: a DoRA update is re-normalised per column, not ``W + s·up@down``.
_DORA_MARK = "dora_scale"

ParamRef = tuple[str, str]  # (component, parameter name), e.g. ("transformer", "x_embedder.weight")


@dataclass(frozen=True)
class LoraDelta:
    """One low-rank update ``scale * up @ down`` of a weight (``up``: out x r, ``down``: r x in)."""

    up: Tensor
    down: Tensor
    scale: float


@dataclass(frozen=True)
class FluxLoraMatch:
    """How one LoRA file maps onto a Flux model; ``skipped`` files are not merged."""

    name: str
    deltas: Mapping[ParamRef, LoraDelta]
    unmatched_keys: tuple[str, ...] = ()

    @property
    def skipped(self) -> bool:
        return len(self.unmatched_keys) > MAX_UNMATCHED_KEYS


@dataclass
class MergedFluxLoras:
    """CPU copies of exactly the weights a merge changed, so they can be put back."""

    originals: dict[ParamRef, Tensor] = field(default_factory=dict)


def load_flux_lora(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` LoRA file on the CPU (pickles refused, never unpickled)."""
    from safetensors import SafetensorError

    path = Path(path)
    try:
        with open_safetensors_checked(path) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as exc:
        raise ModelInvalid(f"LoRA {path.name!r} cannot be read: {str(exc)[:200]}") from None


def to_diffusers_lora(tensors: Mapping[str, Tensor], name: str = "lora") -> tuple[dict[str, Tensor], dict[str, float]]:
    """(``lora_A``/``lora_B`` state dict in diffusers naming, alpha per module) for any layout diffusers'
    Flux LoRA loader reads. Raises :class:`ModelInvalid` when it cannot convert the file."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        # the converters pop from the dict they get: hand them a copy
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(tensors), return_alphas=True)
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError, AssertionError) as exc:
        raise ModelInvalid(f"LoRA {name!r} is not a FLUX.1 LoRA diffusers can read "
                           f"({type(exc).__name__}: {str(exc)[:160]})") from None
    module_alphas = {key.removesuffix(".alpha"): float(value) for key, value in (alphas or {}).items()}
    return dict(state), module_alphas


def match_flux_lora(tensors: Mapping[str, Tensor], models: Mapping[str, nn.Module], *,
                    name: str = "lora") -> FluxLoraMatch:
    """Map a LoRA file's tensors onto ``models`` (``transformer`` and optionally ``text_encoder``).
    Raises :class:`ModelInvalid` for a layout that cannot apply (a Control LoRA, a file diffusers' converters
    reject)."""
    if any(k.endswith(_CONTROL_MARK) for k in tensors):
        raise ModelInvalid(f"LoRA {name!r} is a FLUX.1 Control LoRA (Canny/Depth: it trains the norm scales and "
                           "widens the image input for a control image); Hooocus has no FLUX.1 control input, "
                           "so it cannot apply")
    if any(k.endswith(_DORA_MARK) for k in tensors):
        # diffusers' loader drops these with a warning, which would merge a different (plain LoRA) update
        raise ModelInvalid(f"LoRA {name!r} is a DoRA (it has {_DORA_MARK} tensors); DoRA weights are not "
                           "supported on FLUX.1: use a plain LoRA")
    renamed = {key: _bfl_to_kohya_key(key) or _peft_key(key) for key in tensors}
    if any(renamed.values()):
        tensors = {renamed[key] or key: value for key, value in tensors.items()}
    if any(k.endswith(_KOHYA_DOWN) for k in tensors):
        return _match_kohya(tensors, models, name)
    state, alphas = to_diffusers_lora(tensors, name)
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    deltas: dict[ParamRef, LoraDelta] = {}
    unmatched = [k for k in state if not k.endswith((_A, _B))]
    for key in (k for k in state if k.endswith(_A)):
        module = key.removesuffix(_A)
        up_key = module + _B
        ref = _param_ref(module, models, params)
        down, up = state[key], state.get(up_key)
        if ref is None or up is None or up.shape[1] != down.shape[0]:
            unmatched += [key] + ([up_key] if up is not None else [])
            continue
        weight = params[ref[0]][ref[1]]
        if weight.ndim != 2 or (up.shape[0], down.shape[1]) != tuple(weight.shape):
            unmatched += [key, up_key]
            continue
        rank = down.shape[0]
        alpha = alphas.get(module, alphas.get(module.split(".", 1)[-1]))
        deltas[ref] = LoraDelta(up=up, down=down, scale=1.0 if alpha is None else alpha / rank)
    unmatched += [k for k in state if k.endswith(_B) and (k.removesuffix(_B) + _A) not in state]
    if unmatched:
        log.info("LoRA %s: %d keys do not match the model (e.g. %s)", name, len(unmatched),
                 ", ".join(sorted(unmatched)[:3]))
    return FluxLoraMatch(name=name, deltas=deltas, unmatched_keys=tuple(sorted(set(unmatched))))


def _bfl_to_kohya_key(key: str) -> str | None:
    """kohya's name for a BFL / ComfyUI layout LoRA key (``diffusion_model.single_blocks.3.linear1.lora_A.weight``
    -> ``lora_unet_single_blocks_3_linear1.lora_down.weight``), None for a key of another layout."""
    if ".processor." in key:  # XLabs (``double_blocks.N.processor.qkv_lora1``): diffusers converts it
        return None
    suffix = next((s for s in _TO_KOHYA_SUFFIX if key.endswith(s)), None)
    if suffix is None:
        return None
    module = key.removesuffix(suffix)
    if module.startswith(_COMFY_CLIP_L):
        head, module = "lora_te1_", module.removeprefix(_COMFY_CLIP_L)
    else:
        prefix = next((p for p in _BFL_PREFIXES if (module + ".").startswith(p)
                       and (module[len(p):] + ".").startswith(_BFL_ROOTS)),
                      None)
        if prefix is None:
            return None
        head, module = "lora_unet_", module[len(prefix):]
    return head + module.replace(".", "_") + _TO_KOHYA_SUFFIX[suffix]


def _peft_key(key: str) -> str | None:
    """diffusers naming with kohya's endings (``transformer.<module>.lora_down.weight``, seen in files that
    mix both) -> PEFT's ``lora_A``/``lora_B``, as diffusers' loader renames them; None for other keys."""
    if not key.startswith(tuple(c + "." for c in _COMPONENTS)):
        return None
    if key.endswith(_KOHYA_DOWN):
        return key.removesuffix(_KOHYA_DOWN) + _A
    if key.endswith(_KOHYA_UP):
        return key.removesuffix(_KOHYA_UP) + _B
    return None


def _kohya_targets(models: Mapping[str, nn.Module]) -> dict[str, tuple[str, tuple[str, ...], list[int], bool]]:
    """kohya module name -> (component, parameter names, row split, swap halves)."""
    targets: dict[str, tuple[str, tuple[str, ...], list[int], bool]] = {}
    for component, model in models.items():
        heads = [p for p, c in _KOHYA_PREFIXES.items() if c == component]
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                flat = module_name.replace(".", "_")
                for head in heads:
                    targets[head + flat] = (component, (module_name + ".weight",), [], False)
                    if component == TEXT_ENCODER:  # kohya keeps transformers-4's ``text_model.`` level
                        targets[head + "text_model_" + flat] = targets[head + flat]
        if component == TRANSFORMER:
            config = dict(model.config)
            for bfl, names, swap in transformer_key_rows(config):
                if bfl.endswith(".weight"):
                    sizes = split_sizes(config, len(names)) if len(names) > 1 else []
                    targets["lora_unet_" + bfl.removesuffix(".weight").replace(".", "_")] = (
                        component, names, sizes, swap)
    return targets


def _match_kohya(tensors: Mapping[str, Tensor], models: Mapping[str, nn.Module], name: str) -> FluxLoraMatch:
    targets = _kohya_targets(models)
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    deltas: dict[ParamRef, LoraDelta] = {}
    unmatched: list[str] = []
    modules = sorted({k.removesuffix(_KOHYA_DOWN) for k in tensors if k.endswith(_KOHYA_DOWN)})
    used = set()
    for module in modules:
        keys = [module + s for s in (_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA) if module + s in tensors]
        used.update(keys)
        target, up = targets.get(module), tensors.get(module + _KOHYA_UP)
        down = tensors[module + _KOHYA_DOWN]
        if target is None or up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            unmatched += keys
            continue
        component, names, sizes, swap = target
        if swap:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        if sizes and sum(sizes) != up.shape[0]:
            unmatched += keys
            continue
        pieces = torch.split(up, sizes, dim=0) if sizes else (up,)
        alpha = tensors.get(module + _KOHYA_ALPHA)
        rank = down.shape[0]
        scale = 1.0 if alpha is None else float(alpha) / rank  # kohya: no alpha means alpha = rank
        fits = all(params[component][n].shape == (p.shape[0], down.shape[1]) for n, p in zip(names, pieces,
                                                                                             strict=True))
        if not fits:
            unmatched += keys
            continue
        for param_name, piece in zip(names, pieces, strict=True):
            deltas[(component, param_name)] = LoraDelta(up=piece.contiguous(), down=down, scale=scale)
    unmatched += [k for k in tensors if k not in used]
    return FluxLoraMatch(name=name, deltas=deltas, unmatched_keys=tuple(sorted(set(unmatched))))


def _param_ref(module: str, models: Mapping[str, nn.Module],
               params: Mapping[str, Mapping[str, nn.Parameter]]) -> ParamRef | None:
    component, _, rest = module.partition(".")
    if component not in _COMPONENTS:  # a bare PEFT file: transformer module names without prefix
        component, rest = TRANSFORMER, module
    if component not in params:
        return None
    names = [rest + ".weight"]
    if component == TEXT_ENCODER and not hasattr(models[component], "text_model"):
        names.append(rest.removeprefix("text_model.") + ".weight")  # transformers >= 5.6 flattened CLIP
    found = next((n for n in names if n in params[component]), None)
    return (component, found) if found is not None else None


@torch.no_grad()
def merge_flux_loras(models: Mapping[str, nn.Module],
                     loras: Sequence[tuple[FluxLoraMatch, float]]) -> MergedFluxLoras:
    """Merge LoRAs into the weights in place, each at its strength; returns the originals for
    :func:`unmerge_flux_loras`. Each touched weight gets all its updates summed in float32 from the
    original and is cast back once (a float8 weight is rounded back to float8: its LoRA is then only
    as fine as float8 allows)."""
    pending: dict[ParamRef, list[tuple[LoraDelta, float]]] = {}
    for match, strength in loras:
        if match.skipped:
            log.warning("LoRA %s skipped: %d keys do not match this FLUX.1 model", match.name,
                        len(match.unmatched_keys))
            continue
        if strength == 0.0:
            continue
        for ref, delta in match.deltas.items():
            if ref[0] in models:
                pending.setdefault(ref, []).append((delta, strength))
    merged = MergedFluxLoras()
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    try:
        for ref, updates in pending.items():
            param = params[ref[0]][ref[1]]
            value = param.detach().to(torch.float32)
            for delta, strength in updates:
                up = delta.up.to(param.device, torch.float32)
                down = delta.down.to(param.device, torch.float32)
                value = value + (strength * delta.scale) * (up @ down)
            merged.originals[ref] = param.detach().to("cpu", copy=True)
            param.copy_(value.to(param.dtype))
    except BaseException:
        # Out of memory (or a cancel) half-way: put back what was merged so far, so the caller, which
        # never gets the originals, does not keep a half-merged model for every later job.
        unmerge_flux_loras(models, merged)
        raise
    return merged


@torch.no_grad()
def unmerge_flux_loras(models: Mapping[str, nn.Module], merged: MergedFluxLoras) -> None:
    """Restore the weights a :func:`merge_flux_loras` call changed (bit for bit)."""
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    for (component, name), original in merged.originals.items():
        params[component][name].copy_(original)
    merged.originals.clear()


def lora_fit_problem(path: str | Path, models: Mapping[str, nn.Module], *, name: str = "lora") -> str | None:
    """Why the LoRA file at ``path`` cannot apply to ``models`` (None when it fits), from its header alone.

    Submit-time check (issue 17: a LoRA for another family is refused before anything is queued): the
    tensors are stand-ins on the ``meta`` device with the header's shapes, so no weight data is read;
    only the scalar ``alpha`` values are (kohya's scale and the diffusers converters need them). The
    match is the one :func:`match_flux_lora` makes at run time, so the two cannot disagree on the layout.
    """
    from safetensors import safe_open

    info = check_weight_file(path)  # pickles and broken files are refused here, with their own codes
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key, tensor in info.tensors.items():
            if key.endswith(_KOHYA_ALPHA) or tensor.numel <= 1:
                tensors[key] = handle.get_tensor(key)
            else:
                tensors[key] = torch.empty(tensor.shape, dtype=_HEADER_DTYPES.get(tensor.dtype, torch.float32), device="meta")
    try:
        match = match_flux_lora(tensors, models, name=name)
    except ModelInvalid:
        # A diffusers converter that needs tensor values (not only shapes) fails on meta tensors:
        # decide on the real ones rather than refuse a file the run-time merge would take.
        try:
            match = match_flux_lora(load_flux_lora(path), models, name=name)
        except ModelInvalid as exc:
            return exc.message
    if match.skipped or not match.deltas:
        total = len(tensors)
        return (f"LoRA {name!r} does not fit this FLUX.1 model: {len(match.unmatched_keys)} of its {total} tensors "
                f"match no weight (e.g. {', '.join(match.unmatched_keys[:2])}); is it a LoRA for another model "
                "family, such as SDXL?")
    return None
