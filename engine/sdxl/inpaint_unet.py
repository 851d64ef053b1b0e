"""The inpaint engine's changes to a diffusers SDXL UNet, and taking them off for the synthetic refiner.

Spec §12.2 ("Inpaint head and patch"), §8 ("Synthetic refiner"), §11.1 (patch math); parity run g.

- **Head feature.** ldm's "input block 0" is diffusers' ``conv_in``. The head feature
  (:func:`engine.sdxl.models.inpaint.inpaint_head_feature`, computed once per task) is added to
  ``conv_in``'s output at every UNet call, for cond and uncond rows alike (a ``[1, 320, h, w]``
  feature broadcasts over the batch). :class:`InpaintHeadHook` does it with a forward hook.
- **Patch.** A ``.fooocus.patch`` is keyed in ldm naming (``diffusion_model.<ldm module>.<weight|bias>``);
  :func:`match_inpaint_patch` maps it onto diffusers parameter names with the LoRA key map of
  :mod:`engine.sdxl.models.lora` (``unet_lora_key_map``: every UNet module under its ``diffusion_model.``
  name) and merges with ``merge_loras`` (float32 math from the current weight, cast back once; CPU copies
  of the originals, restored with ``copy_``, so removal is bit-exact).
- **Synthetic refiner.** With an inpaint engine and no user refiner, the last ~20 % of steps run on the
  same base UNet *without* head and patch (user LoRAs stay). :class:`InpaintEngine` is the handle: the
  pipeline calls :meth:`InpaintEngine.apply` before sampling and :meth:`InpaintEngine.remove` in the
  joint swap's step callback at the switch step (and in a ``finally``), which restores the weights bit
  for bit and detaches the hook. The denoiser wrapper (``InpaintDenoiser``) stays for all steps.

Order with user LoRAs: merge the user LoRAs first, then ``apply()``; ``remove()`` before unmerging the
LoRAs (a stack). Fooocus merges LoRAs and the patch in one float32 sum per weight; with float32 weights
(CPU parity) merging them one after the other gives the same bits. With float16/bfloat16 weights the
LoRA-merged weight is rounded once before the patch is added: at most one extra rounding of the weight
dtype per patched weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from torch import Tensor, nn

from engine.sdxl.models.lora import UNET, LoraMatch, MergedLoras, merge_loras, unet_lora_key_map, unmerge_loras
from engine.sdxl.models.patching import FooocusPatch, PatchShapeError

__all__ = [
    "INPAINT_PATCH_STRENGTH",
    "SYNTHETIC_REFINER_SWITCH",
    "InpaintEngine",
    "InpaintHeadHook",
    "InpaintPatchMismatch",
    "match_inpaint_patch",
]

#: Fooocus merges the inpaint patch at strength 1.0 (spec §12.2).
INPAINT_PATCH_STRENGTH = 1.0
#: The synthetic refiner's switch fraction (spec §8): ``switch = round(performance_steps · 0.8)``.
SYNTHETIC_REFINER_SWITCH = 0.8
#: The name the inpaint patch goes by in a LoraMatch (logs and warnings).
_PATCH_NAME = "inpaint patch"


class InpaintPatchMismatch(ValueError):
    """The patch does not fit this UNet (keys it has no parameter for, or shapes that differ)."""


class InpaintHeadHook:
    """Adds ``feature`` to the output of ``unet.conv_in`` on every call while attached.

    The feature is moved to the output's device and dtype once per (device, dtype) and cached, so the
    per-step cost is one addition. ``remove()`` detaches the hook; calling it again does nothing.
    """

    def __init__(self, unet: nn.Module, feature: Tensor) -> None:
        conv_in = unet.conv_in
        if feature.dim() != 4 or feature.shape[1] != conv_in.out_channels:
            raise ValueError(f"head feature must be [B, {conv_in.out_channels}, h, w], got {tuple(feature.shape)}")
        self.feature = feature.detach()
        self._cast: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._handle: torch.utils.hooks.RemovableHandle | None = conv_in.register_forward_hook(self._add)

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _add(self, _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        key = (output.device, output.dtype)
        feature = self._cast.get(key)
        if feature is None:
            feature = self._cast[key] = self.feature.to(device=output.device, dtype=output.dtype)
        if feature.shape[-2:] != output.shape[-2:]:
            raise ValueError(f"head feature is {tuple(feature.shape[-2:])} but the latent is {tuple(output.shape[-2:])}")
        return output + feature

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._cast.clear()


def match_inpaint_patch(unet: nn.Module, patches: Mapping[str, FooocusPatch]) -> LoraMatch:
    """Map ``{ldm key: FooocusPatch}`` (from :func:`~engine.sdxl.models.inpaint.fooocus_patches_from_state_dict`)
    onto ``unet``'s parameters, as a :class:`LoraMatch` that ``merge_loras`` can merge.

    Keys are ``diffusion_model.<ldm module>.weight`` or ``.bias``; the module part goes through
    ``unet_lora_key_map`` (the one ldm↔diffusers map of the project). Any key without a parameter, or a
    patch whose shape differs from its parameter, raises :class:`InpaintPatchMismatch` naming the
    first few: an inpaint patch is made for one architecture, and a partial merge would be a silent
    quality bug.
    """
    key_map = unet_lora_key_map(unet)
    params = dict(unet.named_parameters())
    mapped: dict[tuple[str, str], tuple[FooocusPatch, ...]] = {}
    unmatched: list[str] = []
    mismatched: list[str] = []
    for key, patch in sorted(patches.items()):
        module, _, leaf = key.rpartition(".")
        target = key_map.get(module) if leaf in ("weight", "bias") else None
        name = f"{target[1]}.{leaf}" if target is not None else None
        if name is None or name not in params:
            unmatched.append(key)
            continue
        if tuple(patch.w_uint8.shape) != tuple(params[name].shape):
            mismatched.append(f"{key} {tuple(patch.w_uint8.shape)} vs {tuple(params[name].shape)}")
            continue
        mapped[(UNET, name)] = (patch,)
    if unmatched or mismatched:
        problems = [*(f"no parameter for {k}" for k in unmatched), *(f"shape {m}" for m in mismatched)]
        raise InpaintPatchMismatch(f"inpaint patch does not fit this UNet ({len(problems)} problems): "
                                   + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))
    return LoraMatch(name=_PATCH_NAME, patches=mapped)


class InpaintEngine:
    """Head hook + merged patch on one base UNet, switchable on and off (the synthetic refiner's handle).

    ``feature`` is the head feature (None: patch only; ``patches`` may be empty: head only). Nothing
    changes until :meth:`apply`; :meth:`remove` undoes exactly what ``apply`` did (weights bit for bit)
    and is safe to call twice or without ``apply``. Usable as a context manager (apply on enter, remove
    on exit) so an exception mid-sampling never leaves a patched UNet behind in the model cache.
    """

    def __init__(self, unet: nn.Module, patches: Mapping[str, FooocusPatch], feature: Tensor | None, *,
                 strength: float = INPAINT_PATCH_STRENGTH) -> None:
        self.unet = unet
        self.match = match_inpaint_patch(unet, patches)  # fail before anything is touched
        self.feature = feature
        self.strength = strength
        self._merged: MergedLoras | None = None
        self._hook: InpaintHeadHook | None = None

    @property
    def applied(self) -> bool:
        return self._merged is not None or self._hook is not None

    def apply(self) -> None:
        """Merge the patch into the weights and attach the head feature. Raises if already applied."""
        if self.applied:
            raise RuntimeError("inpaint engine is already applied to this UNet")
        try:
            if self.match.patches:
                self._merged = merge_loras({UNET: self.unet}, [(self.match, self.strength)])
                if len(self._merged.originals) != len(self.match.patches):  # merge_loras logs and skips misfits
                    raise PatchShapeError("inpaint patch was only partly merged")
            if self.feature is not None:
                self._hook = InpaintHeadHook(self.unet, self.feature)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Detach the head and put the original weights back (bit-exact). Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._merged is not None:
            unmerge_loras({UNET: self.unet}, self._merged)
            self._merged = None

    def __enter__(self) -> InpaintEngine:
        self.apply()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
