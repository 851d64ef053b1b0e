"""LoRA files: load (safetensors only), match onto diffusers/transformers modules, merge and unmerge.

Fooocus merges LoRAs into the weights when a model loads and skips a file that leaves more than 12
keys unmatched (spec §11.1). Our models are diffusers ``UNet2DConditionModel`` and transformers
CLIP encoders, so the key map is built from their own ``named_parameters()``; each parameter is
reachable under every name a LoRA file may use for it:

- kohya / A1111: ``lora_unet_<module with _>`` in the original SGM/LDM UNet naming
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) or in diffusers naming
  (``lora_unet_down_blocks_1_attentions_0_…``); ``lora_te1_…`` / ``lora_te_…`` (CLIP-L) and
  ``lora_te2_…`` (CLIP-G) in the transformers-4 naming ``text_model_encoder_layers_0_self_attn_q_proj``;
- diffusers / PEFT: ``unet.<module>``, ``text_encoder.<module>``, ``text_encoder_2.<module>``
  (also the older ``…attn1.processor.to_q_lora.up.weight`` spelling);
- ComfyUI state-dict style: ``diffusion_model.<ldm module>``.

A key is a module name plus a suffix (``.lora_up.weight``, ``.lora_B.weight``, ``.alpha``,
``.hada_w1_a``, ``.lokr_w1``, ``.diff`` …); the suffixes of one module form one patch.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from engine.core.errors import ModelInvalid
from engine.io.safety import open_safetensors_checked
from engine.sdxl.models.patching import (
    DiffPatch,
    LohaPatch,
    LokrPatch,
    LoraPatch,
    PatchShapeError,
    WeightPatch,
    apply_patches,
    patch_numel,
)

log = logging.getLogger(__name__)

#: Fooocus skips a LoRA that leaves more than this many keys unmatched (spec §11.1).
MAX_UNMATCHED_KEYS = 12

UNET = "unet"
TEXT_ENCODER = "text_encoder"      # CLIP-L (SDXL) or the only encoder (SD1.5)
TEXT_ENCODER_2 = "text_encoder_2"  # CLIP-G (SDXL)
_TEXT_ENCODER_NAMES = (TEXT_ENCODER, TEXT_ENCODER_2)
#: The kohya prefixes that address each text encoder.
_KOHYA_TE_PREFIXES = {TEXT_ENCODER: ("lora_te1_", "lora_te_"), TEXT_ENCODER_2: ("lora_te2_",)}

#: key suffix -> role in a patch. Longest first, so '.lokr_w1_a' is tried before '.lokr_w1'.
_SUFFIX_ROLES: tuple[tuple[str, str], ...] = tuple(sorted({
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".alpha": "alpha",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b",
}.items(), key=lambda item: -len(item[0])))

# Older diffusers attention-processor spellings -> module names.
_LEGACY_KEY_FIXES = (
    (re.compile(r"\.processor\.to_out_lora\."), ".to_out.0.lora."),
    (re.compile(r"\.processor\.to_([qkv])_lora\."), r".to_\1.lora."),
    (re.compile(r"\.self_attn\.to_out_lora\."), ".self_attn.out_proj.lora."),
    (re.compile(r"\.self_attn\.to_([qkv])_lora\."), r".self_attn.\1_proj.lora."),
)

# diffusers ResnetBlock2D member -> LDM ResBlock member.
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                     "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                     "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}

ParamRef = tuple[str, str]  # (component, parameter name), e.g. ("unet", "conv_in.weight")


@dataclass(frozen=True)
class LoraFile:
    """The raw tensors of one LoRA file, on CPU."""

    name: str
    tensors: Mapping[str, Tensor]


@dataclass(frozen=True)
class LoraMatch:
    """How one LoRA file maps onto a model: patches per parameter, and what did not map.

    ``skipped`` is Fooocus's mismatch rule (more than 12 unmatched keys); :func:`merge_loras`
    leaves such a file out and ``warning`` says why. ``shape_mismatched`` lists modules whose
    name matched but whose tensors do not fit (Fooocus does not merge those either).
    """

    name: str
    patches: Mapping[ParamRef, tuple[WeightPatch, ...]]
    unmatched_keys: tuple[str, ...] = ()
    shape_mismatched: tuple[str, ...] = ()

    @property
    def unmatched_count(self) -> int:
        return len(self.unmatched_keys)

    @property
    def skipped(self) -> bool:
        return self.unmatched_count > MAX_UNMATCHED_KEYS

    @property
    def warning(self) -> str | None:
        if self.skipped:
            return (f"LoRA {self.name!r} does not fit this model ({self.unmatched_count} unmatched keys, "
                    f"more than {MAX_UNMATCHED_KEYS}); skipped")
        if self.shape_mismatched:
            return f"LoRA {self.name!r}: {len(self.shape_mismatched)} modules have mismatched shapes; not merged"
        return None


@dataclass
class MergedLoras:
    """CPU copies of exactly the weights a merge changed, so they can be put back."""

    originals: dict[ParamRef, Tensor] = field(default_factory=dict)

    def restore(self, models: Mapping[str, nn.Module]) -> None:
        """Put every touched weight back to its value before the merge (bit for bit)."""
        unmerge_loras(models, self)


# --------------------------------------------------------------------------------------------- loading

def load_lora(path: str | Path) -> LoraFile:
    """Read a ``.safetensors`` LoRA file onto the CPU. Never unpickles anything.

    The file passes :func:`engine.io.safety.open_safetensors_checked` first: pickle formats
    (by suffix or content) raise ``UnsafeFile``; anything unreadable or corrupt raises ``ModelInvalid``.
    """
    path = Path(path)
    try:
        with open_safetensors_checked(path) as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as exc:  # a tensor read that fails after the header checks passed
        raise ModelInvalid(f"LoRA {path.name!r} cannot be read: {str(exc)[:200]}") from None
    return LoraFile(name=path.stem, tensors=tensors)


# ------------------------------------------------------------------------------------------ key maps

@dataclass(frozen=True)
class _UnetLayout:
    """Resnets per down/up block and which up blocks have attention: all the LDM index math needs."""

    down_sizes: tuple[int, ...]
    up_sizes: tuple[int, ...]
    up_has_attention: tuple[bool, ...]

    @classmethod
    def of(cls, unet: nn.Module) -> _UnetLayout:
        return cls(tuple(len(b.resnets) for b in unet.down_blocks), tuple(len(b.resnets) for b in unet.up_blocks),
                   tuple(bool(getattr(b, "attentions", None)) for b in unet.up_blocks))


def ldm_unet_module_name(module: str, unet: nn.Module | _UnetLayout) -> str | None:
    """The SGM/LDM name of a diffusers UNet module (``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``).

    Index arithmetic follows the LDM layout (as diffusers' single-file converter does, Apache-2.0):
    input block 0 is conv_in, each down level has its resnet(+attention) blocks then a downsample
    block; output blocks hold resnet, attention, upsample of one level each. None when the module
    has no LDM counterpart.
    """
    layout = unet if isinstance(unet, _UnetLayout) else _UnetLayout.of(unet)
    if module in _TOP_LEVEL_TO_LDM:
        return _TOP_LEVEL_TO_LDM[module]
    parts = module.split(".")
    if parts[0] == "mid_block" and len(parts) >= 3 and parts[2].isdigit():
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets" and index in (0, 1):
            return _join(f"middle_block.{2 * index}", _resnet_member(rest))
        if kind == "attentions" and index == 0:
            return _join("middle_block.1", ".".join(rest))
        return None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 4 or not (parts[1] + parts[3]).isdigit():
        return None
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        start = 1 + sum(size + 1 for size in layout.down_sizes[:block])
        if kind == "resnets":
            return _join(f"input_blocks.{start + index}.0", _resnet_member(rest))
        if kind == "attentions":
            return _join(f"input_blocks.{start + index}.1", ".".join(rest))
        if kind == "downsamplers" and rest == ["conv"]:
            return f"input_blocks.{start + layout.down_sizes[block]}.0.op"
        return None
    start = sum(layout.up_sizes[:block])
    if kind == "resnets":
        return _join(f"output_blocks.{start + index}.0", _resnet_member(rest))
    if kind == "attentions":
        return _join(f"output_blocks.{start + index}.1", ".".join(rest))
    if kind == "upsamplers" and rest == ["conv"]:
        upsample_slot = 2 if layout.up_has_attention[block] else 1
        return f"output_blocks.{start + layout.up_sizes[block] - 1}.{upsample_slot}.conv"
    return None


def _resnet_member(rest: list[str]) -> str | None:
    return _RESNET_TO_LDM.get(".".join(rest)) if rest else None


def _join(head: str, tail: str | None) -> str | None:
    if tail is None:
        return None
    return f"{head}.{tail}" if tail else head


def _split_param(name: str) -> tuple[str, str] | None:
    for leaf in ("weight", "bias"):
        if name.endswith("." + leaf):
            return name[: -len(leaf) - 1], leaf
    return None


def unet_lora_key_map(unet: nn.Module) -> dict[str, tuple[str, str]]:
    """LoRA module name (every accepted spelling) -> (diffusers module name, ``weight``/``bias`` param base)."""
    key_map: dict[str, tuple[str, str]] = {}
    layout = _UnetLayout.of(unet)
    for name, _param in unet.named_parameters():
        split = _split_param(name)
        if split is None or split[1] != "weight":
            continue
        module = split[0]
        names = [f"lora_unet_{module.replace('.', '_')}", f"unet.{module}"]
        ldm = ldm_unet_module_name(module, layout)
        if ldm is not None:
            names += [f"lora_unet_{ldm.replace('.', '_')}", f"diffusion_model.{ldm}"]
        for lora_name in names:
            key_map.setdefault(lora_name, (UNET, module))
    return key_map


def _canonical_text_module(module: str) -> str:
    """transformers 5 drops the ``text_model.`` level from CLIPTextModel; LoRA names keep it."""
    if module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"


def text_encoder_lora_key_map(text_encoder: nn.Module, component: str) -> dict[str, tuple[str, str]]:
    """LoRA module name -> (component, module name) for a transformers CLIP text encoder."""
    key_map: dict[str, tuple[str, str]] = {}
    for name, _param in text_encoder.named_parameters():
        split = _split_param(name)
        if split is None or split[1] != "weight":
            continue
        module = split[0]
        canonical = _canonical_text_module(module)
        names = [f"{prefix}{canonical.replace('.', '_')}" for prefix in _KOHYA_TE_PREFIXES[component]]
        names.append(f"{component}.{canonical}")
        for lora_name in names:
            key_map.setdefault(lora_name, (component, module))
    return key_map


# -------------------------------------------------------------------------------------------- matching

def _group_keys(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split raw keys into {module name: {role: raw key}}; keys with no known suffix are returned apart."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    loose: list[str] = []
    for key in keys:
        normalised = key
        for pattern, replacement in _LEGACY_KEY_FIXES:
            normalised = pattern.sub(replacement, normalised)
        for suffix, role in _SUFFIX_ROLES:
            if normalised.endswith(suffix):
                groups[normalised[: -len(suffix)]][role] = key
                break
        else:
            loose.append(key)
    return dict(groups), loose


def _build_patches(group: dict[str, str], tensors: Mapping[str, Tensor]) -> list[tuple[str, WeightPatch]]:
    """(parameter leaf, patch) pairs for one module's tensors; empty when the roles make no patch."""
    t = {role: tensors[key] for role, key in group.items()}
    alpha = float(t["alpha"].item()) if "alpha" in t else None
    if "up" in t and "down" in t:
        return [("weight", LoraPatch(up=t["up"], down=t["down"], alpha=alpha, mid=t.get("mid")))]
    if all(f"hada_{w}" in t for w in ("w1_a", "w1_b", "w2_a", "w2_b")):
        return [("weight", LohaPatch(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha,
                                     t.get("hada_t1"), t.get("hada_t2")))]
    has_w1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
    has_w2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
    if has_w1 and has_w2:
        return [("weight", LokrPatch(w1=t.get("lokr_w1"), w1_a=t.get("lokr_w1_a"), w1_b=t.get("lokr_w1_b"),
                                     w2=t.get("lokr_w2"), w2_a=t.get("lokr_w2_a"), w2_b=t.get("lokr_w2_b"),
                                     t2=t.get("lokr_t2"), alpha=alpha))]
    out: list[tuple[str, WeightPatch]] = []
    if "diff" in t:
        out.append(("weight", DiffPatch(t["diff"])))
    if "diff_b" in t:
        out.append(("bias", DiffPatch(t["diff_b"])))
    return out


def _fits(patch: WeightPatch, shape: torch.Size) -> bool:
    """Whether a patch can be merged into a weight of ``shape``; malformed tensors simply do not fit."""
    if isinstance(patch, DiffPatch):
        return tuple(patch.diff.shape) == tuple(shape)
    try:
        return patch_numel(patch) == shape.numel()
    except (IndexError, AttributeError, TypeError):
        return False


def match_lora(lora: LoraFile, unet: nn.Module | None,
               text_encoders: Sequence[nn.Module | None] = ()) -> LoraMatch:
    """Map a LoRA file onto a UNet and up to two text encoders (CLIP-L, CLIP-G) (spec §11.1).

    A model part passed as None (e.g. the refiner's dropped CLIP) maps nothing, so its keys count
    as unmatched, as in Fooocus.
    """
    key_map: dict[str, tuple[str, str]] = {}
    shapes: dict[ParamRef, torch.Size] = {}
    parts: list[tuple[str, nn.Module]] = [(UNET, unet)] if unet is not None else []
    parts += [(name, te) for name, te in zip(_TEXT_ENCODER_NAMES, text_encoders) if te is not None]
    for component, model in parts:
        key_map.update(unet_lora_key_map(model) if component == UNET else text_encoder_lora_key_map(model, component))
        shapes.update({(component, name): param.shape for name, param in model.named_parameters()})

    groups, unmatched = _group_keys(lora.tensors)
    patches: dict[ParamRef, list[WeightPatch]] = defaultdict(list)
    mismatched: list[str] = []
    for module_name, group in sorted(groups.items()):
        target = key_map.get(module_name)
        if target is None:
            unmatched.extend(group.values())
            continue
        try:
            built = _build_patches(group, lora.tensors)
        except (RuntimeError, ValueError):  # e.g. an alpha that is not a single number
            mismatched.append(module_name)
            continue
        if not built:
            unmatched.extend(group.values())
            continue
        component, module = target
        for leaf, patch in built:
            ref = (component, f"{module}.{leaf}")
            if ref in shapes and _fits(patch, shapes[ref]):
                patches[ref].append(patch)
            else:
                mismatched.append(module_name)
    return LoraMatch(name=lora.name, patches={ref: tuple(p) for ref, p in patches.items()},
                     unmatched_keys=tuple(sorted(unmatched)), shape_mismatched=tuple(sorted(set(mismatched))))


# --------------------------------------------------------------------------------------------- merging

#: Fooocus keeps the CLIP text encoders' weights in float16 even where it computes in float32 (on CPU),
#: so a LoRA merged into them is rounded to float16 (parity README, runs e–h quirk 7; run h's
#: conditioning differs by 2e-4 without this rounding). Pass as ``storage_dtypes`` to copy it.
FOOOCUS_STORAGE_DTYPES: Mapping[str, torch.dtype] = {TEXT_ENCODER: torch.float16, TEXT_ENCODER_2: torch.float16}


def merge_loras(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraMatch, float]], *,
                storage_dtypes: Mapping[str, torch.dtype] | None = None) -> MergedLoras:
    """Merge LoRAs into the weights in place, each at its strength (Fooocus merges at load, spec §11.1).

    ``models`` maps component names (``unet``, ``text_encoder``, ``text_encoder_2``) to modules.
    Every touched weight gets all its patches in slot order, summed in float32 from the original
    and cast back once. Skipped matches and zero strengths change nothing. Returns CPU copies of
    the original weights; call :func:`unmerge_loras` (or ``.restore``) before merging another set.
    ``storage_dtypes`` rounds a component's merged weights through that dtype (see
    :data:`FOOOCUS_STORAGE_DTYPES`); the module keeps its own dtype.
    """
    pending: dict[ParamRef, list[tuple[WeightPatch, float]]] = defaultdict(list)
    for match, strength in loras:
        if match.skipped or strength == 0.0:
            continue
        for ref, patches in match.patches.items():
            if ref[0] in models:
                pending[ref].extend((patch, strength) for patch in patches)
    merged = MergedLoras()
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    with torch.no_grad():
        for ref, patches in pending.items():
            param = params[ref[0]][ref[1]]
            try:
                new_value = apply_patches(param, patches)
                storage = (storage_dtypes or {}).get(ref[0])
                if storage is not None and storage != new_value.dtype:
                    new_value = new_value.to(storage).to(param.dtype)
            except (PatchShapeError, RuntimeError) as exc:  # match_lora checks sizes; this is the backstop
                log.warning("LoRA patch for %s.%s not merged: %s", ref[0], ref[1], exc)
                continue
            merged.originals[ref] = param.detach().to("cpu", copy=True)
            param.copy_(new_value)
    return merged


def unmerge_loras(models: Mapping[str, nn.Module], merged: MergedLoras) -> None:
    """Restore the weights a :func:`merge_loras` call changed."""
    params = {component: dict(model.named_parameters()) for component, model in models.items()}
    with torch.no_grad():
        for (component, name), original in merged.originals.items():
            params[component][name].copy_(original)
    merged.originals.clear()
