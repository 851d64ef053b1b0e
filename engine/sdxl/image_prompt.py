"""One job's Image Prompt state for the SDXL runner (spec §12.3, §12.4; issue 16).

:func:`prepare_image_prompts` turns the request's slots (decoded at submit, ``RunContext.inputs``)
into an :class:`ImagePromptRun`:

- ImagePrompt slots → the IP-Adapter's per-layer keys/values (stretched 224² image → CLIP vision →
  resampler → to_k_ip/to_v_ip), several slots concatenated in slot order; installed on the base
  UNet's attn2 layers per image (:meth:`ImagePromptRun.install`) and removed at the refiner swap and
  at the end of sampling (:meth:`ImagePromptRun.remove`).
- FaceSwap slots → the same path with the face IP-Adapter (``ip-adapter-plus-face_sdxl_vit-h``; the
  same CLIP vision and negative tokens), on the aligned face crop (engine/imaging/face_crop.py: YuNet
  landmarks, FFHQ template, grey border) instead of the whole image; their tokens come after all the
  ImagePrompt slots' tokens, as Fooocus concatenates them (ImagePrompt tasks, then FaceSwap tasks).
- PyraCanny / CPDS slots → a ControlNet (Control-LoRA merged into the UNet's encoder copy) and its
  hint (the preprocessed map at the generation size). :meth:`ImagePromptRun.unet_kwargs`, called by
  the denoiser before every UNet call, adds their residuals on the positive rows only, while
  ``σ ≥ percent_to_sigma(stop_at)``, base UNet only, with softness and strength; the residuals of
  several controls add up.

The same call keeps the IP-Adapter's ``cond_or_uncond`` in step with the denoiser's batch (its
[negative, positive] groups, or a lone group when the token lengths do not batch).

Weights: the demo model gets tiny seeded ones (engine.sdxl.models.demo); any other model reads the
set-up files (:data:`SETUP_FILES`), and a missing one is ``model_missing`` naming the file and the
``hooocus setup --only <group>`` command (:func:`check_image_prompt_files`, called at submit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.core.errors import ModelMissing, Unsupported
from engine.core.inputs import image_prompt_key
from engine.sdxl.ip_adapter.attention import ImagePromptKV

if TYPE_CHECKING:
    from engine.imaging.face_crop import FaceDetector

__all__ = [
    "CONTROL_FILES",
    "FACE_ADAPTER_FILE",
    "FACE_DETECTOR_FILE",
    "IP_ADAPTER_FILES",
    "SETUP_FILES",
    "ControlSlot",
    "ImagePromptRun",
    "check_image_prompt_files",
    "prepare_image_prompts",
]

#: Where set-up installs each file under the models folder (Fooocus's path_controlnet /
#: path_clip_vision layout), and the set-up group that installs it (engine/io/setup/catalogue.py).
IP_ADAPTER_GROUP = "ip-adapter"
CONTROLNET_GROUP = "controlnet"
FACESWAP_GROUP = "faceswap"
IP_ADAPTER_FILES = {
    "adapter": "controlnet/ip-adapter-plus_sdxl_vit-h.safetensors",  # converted from the released .bin
    "negative": "controlnet/fooocus_ip_negative.safetensors",
    "clip_vision": "clip_vision/clip_vision_vit_h.safetensors",
}
#: FaceSwap: the face IP-Adapter (Fooocus keeps it in path_controlnet) and the YuNet face detector.
FACE_ADAPTER_FILE = "controlnet/ip-adapter-plus-face_sdxl_vit-h.safetensors"  # converted from the released .bin
FACE_DETECTOR_FILE = "face_detection/face_detection_yunet_2023mar.onnx"
CONTROL_FILES = {
    "PyraCanny": "controlnet/control-lora-canny-rank128.safetensors",
    "CPDS": "controlnet/fooocus_xl_cpds_128.safetensors",
}
#: slot type → its (file under the models folder, set-up group that installs it) pairs. FaceSwap shares
#: the CLIP vision and negative tokens of the ``ip-adapter`` group.
SETUP_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "ImagePrompt": tuple((rel, IP_ADAPTER_GROUP) for rel in IP_ADAPTER_FILES.values()),
    "FaceSwap": ((IP_ADAPTER_FILES["clip_vision"], IP_ADAPTER_GROUP), (IP_ADAPTER_FILES["negative"], IP_ADAPTER_GROUP),
                 (FACE_ADAPTER_FILE, FACESWAP_GROUP), (FACE_DETECTOR_FILE, FACESWAP_GROUP)),
    "PyraCanny": ((CONTROL_FILES["PyraCanny"], CONTROLNET_GROUP),),
    "CPDS": ((CONTROL_FILES["CPDS"], CONTROLNET_GROUP),),
}
#: The IP-Adapter kinds (slot types that go through the IP-Adapter attention) → their adapter file, in
#: the order Fooocus concatenates their tokens.
IP_ADAPTER_KINDS = {"ImagePrompt": IP_ADAPTER_FILES["adapter"], "FaceSwap": FACE_ADAPTER_FILE}
#: The head count of OpenCLIP ViT-H/14 (not visible in any tensor shape; engine.sdxl.ip_adapter.model).
CLIP_VIT_H_HEADS = 16
_COND, _UNCOND = 0, 1


def check_image_prompt_files(slots: Sequence[Any], *, models_dir: Path, data_dir: Path, is_demo: bool) -> None:
    """Refuse at submit a slot whose weight file is missing (``model_missing`` with the file, the set-up
    command and the slot's field path). The demo model builds its own tiny ones."""
    for index, slot in enumerate(slots):
        loc = ("image_prompts", index, "type")
        if is_demo:
            continue
        for rel, group in SETUP_FILES[slot.type]:
            path = models_dir / rel
            if not path.is_file():
                raise ModelMissing(f"{slot.type} needs {path.name} in {path.parent}: run "
                                   f"'hooocus setup --only {group} --data-dir {data_dir}'", loc=loc)


@dataclass
class ControlSlot:
    controlnet: torch.nn.Module
    hint: torch.Tensor  # [1, 3, H, W] in 0..1 at the generation size
    stop_at: float
    weight: float


@dataclass
class ImagePromptRun:
    """The prepared image prompts of one job: IP-Adapter tokens and controls; no state on the UNet
    until :meth:`install`."""

    ip_layers: list[list[ImagePromptKV]] | None
    controls: list[ControlSlot]
    model_sampling: Any  # percent_to_sigma for the control gate
    base_unet: torch.nn.Module
    _hook: Any = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        return self.ip_layers is None and not self.controls

    def install(self) -> None:
        """Put the IP-Adapter processors on the base UNet (no-op without ImagePrompt slots)."""
        from engine.sdxl.ip_adapter.hook import install

        self.remove()
        if self.ip_layers is not None:
            self._hook = install(self.base_unet, self.ip_layers)

    def remove(self) -> None:
        """Restore the base UNet's processors; safe to call at any time, twice."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def unet_kwargs(self, unet: torch.nn.Module, sigma: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
                    context: torch.Tensor, added_cond_kwargs: Mapping[str, torch.Tensor],
                    cond_or_uncond: Sequence[int]) -> dict[str, Any]:
        """Before one UNet call: update the IP state's row codes and compute the control residuals."""
        from engine.sdxl.control.control_lora import control_residuals
        from engine.sdxl.control.softness import control_active

        if self._hook is not None:
            self._hook.state.cond_or_uncond = list(cond_or_uncond)
        if unet is not self.base_unet or not self.controls:
            return {}
        sigma_value = float(sigma.reshape(-1)[0])
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for control in self.controls:
            if not control_active(sigma_value, control.stop_at, self.model_sampling):
                continue
            out = control_residuals(control.controlnet, sample, timestep, encoder_hidden_states=context,
                                    added_cond_kwargs=added_cond_kwargs, hint=control.hint,
                                    cond_or_uncond=cond_or_uncond, strength=control.weight)
            if out is None:
                continue
            if down is None or mid is None:
                down, mid = out
            else:  # several controls add their residuals (Fooocus chains them)
                down = [a + b for a, b in zip(down, out[0], strict=True)]
                mid = mid + out[1]
        if down is None:
            return {}
        return {"down_block_additional_residuals": [t.to(sample.dtype) for t in down],
                "mid_block_additional_residual": mid.to(sample.dtype)}


ModelsFor = Callable[[str], Any]


def prepare_image_prompts(slots: Sequence[Any], inputs: Mapping[str, np.ndarray], *, width_px: int, height_px: int,
                          base_unet: torch.nn.Module, model_sampling: Any, ip_models: Callable[[str], Any],
                          controlnet_for: Callable[[str], torch.nn.Module],
                          face_detector: Callable[[], FaceDetector] | None = None) -> ImagePromptRun | None:
    """The job's :class:`ImagePromptRun`, None without slots. ``ip_models(kind)`` gives the IP-Adapter
    models of ``kind`` ("ImagePrompt" or "FaceSwap", :data:`IP_ADAPTER_KINDS`), ``controlnet_for(type)``
    a ControlNet and ``face_detector()`` FaceSwap's detector; each is called only when a slot needs it.

    An ImagePrompt slot with ``stop_at`` 0 never takes part (progress starts at 0; spec §12.4's gate
    is ``progress < stop_at``), so it is left out rather than run as a no-op; likewise a control
    with ``stop_at`` 0 would need σ ≥ the "infinitely noisy" sigma."""
    from engine.imaging.face_crop import crop_face
    from engine.imaging.image_prompt import control_map, ip_adapter_input
    from engine.sdxl.control.control_lora import control_hint
    from engine.sdxl.ip_adapter.model import image_prompt_layers

    if not slots:
        return None
    per_slot: dict[str, list[list[ImagePromptKV]]] = {kind: [] for kind in IP_ADAPTER_KINDS}
    controls: list[ControlSlot] = []
    device, dtype = base_unet.device, base_unet.dtype
    for index, slot in enumerate(slots):
        stop_at, weight = slot.resolved_stop_at, slot.resolved_weight
        if stop_at <= 0.0:
            continue
        image = inputs.get(image_prompt_key(index))
        loc = ("image_prompts", index, "image")
        if image is None:
            raise ValueError(f"image_prompts[{index}] was not resolved to pixels")
        if slot.type in IP_ADAPTER_KINDS:
            if slot.type == "FaceSwap":  # spec §12.3: the aligned face crop (or the whole image: no face)
                if face_detector is None:
                    raise Unsupported("FaceSwap needs a face detector", loc=("image_prompts", index, "type"))
                image = crop_face(image, face_detector(), loc=loc)
            # np.array: the resize hands back a read-only view, which torch.from_numpy warns about
            per_slot[slot.type].append(image_prompt_layers(ip_models(slot.type),
                                                           np.array(ip_adapter_input(image, loc=loc)),
                                                           stop_at=stop_at, weight=weight))
        elif slot.type in ("PyraCanny", "CPDS"):
            hint = control_hint(control_map(image, slot.type, width_px, height_px, loc=loc)).to(device, dtype)
            controls.append(ControlSlot(controlnet_for(slot.type), hint, stop_at, weight))
        else:  # the request model admits no other type
            raise Unsupported(f"{slot.type} is not supported", loc=("image_prompts", index, "type"))
    ip_layers = None
    # Every layer lists the prompts as Fooocus concatenates their tokens: the ImagePrompt slots, then the
    # FaceSwap slots, each in slot order (one softmax over all tokens, so only float rounding depends on it).
    ordered = [layers for kind in IP_ADAPTER_KINDS for layers in per_slot[kind]]
    if ordered:
        ip_layers = [list(layer) for layer in zip(*ordered, strict=True)]
    return ImagePromptRun(ip_layers=ip_layers, controls=controls, model_sampling=model_sampling, base_unet=base_unet)


def load_ip_models(models_dir: Path, unet: torch.nn.Module, kind: str = "ImagePrompt", *,
                   vision: torch.nn.Module | None = None) -> Any:
    """The IP-Adapter plus of ``kind`` (:data:`IP_ADAPTER_KINDS`), its negative tokens and the CLIP
    ViT-H from the set-up files (safetensors only), on the UNet's device and dtype. ``vision``: an
    already loaded CLIP vision tower to share (both kinds use the same one, as in Fooocus)."""
    from safetensors.torch import load_file

    from engine.sdxl.ip_adapter.model import load_clip_vision, load_ip_adapter

    paths = {name: models_dir / rel for name, rel in IP_ADAPTER_FILES.items()}
    if vision is None:
        vision = load_clip_vision(load_file(str(paths["clip_vision"])), num_attention_heads=CLIP_VIT_H_HEADS)
    negative = load_file(str(paths["negative"]))
    if "data" not in negative:
        raise ModelMissing(f"{paths['negative']} has no 'data' tensor: re-run 'hooocus setup --only "
                           f"{IP_ADAPTER_GROUP}'", loc=("image_prompts",))
    models = load_ip_adapter(unet, load_file(str(models_dir / IP_ADAPTER_KINDS[kind])), negative["data"],
                             vision=vision)
    for part in (models.vision, models.resampler, models.kv):
        part.to(device=unet.device, dtype=unet.dtype)
    models.negative_tokens = models.negative_tokens.to(device=unet.device, dtype=unet.dtype)
    return models


def load_controlnet(models_dir: Path, control_type: str, unet: torch.nn.Module) -> torch.nn.Module:
    """The ``control_type`` Control-LoRA file merged into a ControlNet copied from ``unet``."""
    from safetensors.torch import load_file

    from engine.sdxl.control.control_lora import build_control_lora

    controlnet = build_control_lora(unet, load_file(str(models_dir / CONTROL_FILES[control_type])))
    return controlnet.to(device=unet.device, dtype=unet.dtype)


def load_face_detector(models_dir: Path) -> FaceDetector:
    """FaceSwap's YuNet detector from the set-up file (an ONNX file, read when first used)."""
    from engine.imaging.face_crop import YuNetDetector

    return YuNetDetector(models_dir / FACE_DETECTOR_FILE)
