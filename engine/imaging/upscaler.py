"""The 4× ESRGAN upscaler of Upscale / Inpaint (spec §12.1) and Upscale (Fast 2×).

Fooocus ships the network as ``fooocus_upscaler_s409985e5.bin``, an old-arch ESRGAN (RRDB, 4×,
3→3 channels, nf 64, 23 blocks) pickle. Set-up converts it to safetensors with the same keys
(``hooocus setup --only upscale``); only the safetensors file is read here. The keys spell the
dense blocks ``residual_block_j``; Fooocus renames them to ``RDBj`` before it builds the network
(``../shared/parity/README.md``, "Extra weights"), and so do we (:func:`rename_fooocus_keys`).

The architecture is not written here: :func:`build_network` hands the state dict to ``spandrel``,
which detects ESRGAN-family networks (and their hyper-parameters) from the keys. We only check that
it is a 4× ESRGAN with 3 input and 3 output channels.

Inference (:func:`upscale_float`) follows spec §12.1: float32, tiles of 512 px with 32 px overlap,
the tile size halved on out-of-memory (:data:`MIN_TILE_PX` is where we give up). How the tiles are
blended is not in the spec; :func:`tiled_upscale` documents the rule (Fooocus's tiled scaling, from
ComfyUI's ``tiled_scale`` of 2023). The parity runs only cover one-tile inputs (≤ 512 px).
The float output is clamped to [0, 1] and converted to ``uint8`` by *truncation*
(``uint8(255·x)``, not rounding), as Fooocus does (:func:`to_uint8_truncating`).

Nothing runs at import; spandrel is imported when a network is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.errors import HooocusError, ModelInvalid, ModelMissing, OutOfMemory, UnsafeFile
from engine.imaging.resize import resample_image
from engine.imaging.sizes import upscale_plan

__all__ = [
    "FAST_UPSCALE_FACTOR",
    "MIN_TILE_PX",
    "OVERLAP_PX",
    "SCALE",
    "SETUP_COMMAND",
    "TILE_PX",
    "UPSCALER_FILE_NAME",
    "UPSCALE_MODELS_DIR",
    "Upscaler",
    "build_network",
    "fast_upscale_2x",
    "feather_weights",
    "load_upscaler",
    "load_upscaler_state_dict",
    "rename_fooocus_keys",
    "tiled_upscale",
    "to_uint8_truncating",
    "upscale_float",
    "upscale_image",
]

#: The converted file set-up writes, under the models folder's :data:`UPSCALE_MODELS_DIR`.
UPSCALER_FILE_NAME = "fooocus_upscaler_s409985e5.safetensors"
UPSCALE_MODELS_DIR = "upscale_models"
#: What to run when the file is missing (named in the ``model_missing`` error).
SETUP_COMMAND = "hooocus setup --only upscale"
#: spec §12.1: the network is 4×, run on tiles of 512 px that overlap by 32 px.
SCALE = 4
TILE_PX = 512
OVERLAP_PX = 32
#: The tile is halved on out-of-memory down to this; one more OOM is an ``out_of_memory`` error.
#: (At 64 px a tile is only twice the overlap: most of every tile would be blend ramp.)
MIN_TILE_PX = 128
#: spec §12.1, Upscale (Fast 2x).
FAST_UPSCALE_FACTOR = 2.0
#: Fooocus renames the dense blocks of its file before building the network (module docstring).
_FOOOCUS_BLOCK_PREFIX = "residual_block_"
_ESRGAN_BLOCK_PREFIX = "RDB"


# -- loading ------------------------------------------------------------------------------------


def rename_fooocus_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with ``residual_block_j`` spelled ``RDBj``, as Fooocus renames it on load."""
    return {key.replace(_FOOOCUS_BLOCK_PREFIX, _ESRGAN_BLOCK_PREFIX): value for key, value in state_dict.items()}


def load_upscaler_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the upscaler file at ``path`` (safetensors only), keys renamed.

    Missing → ``model_missing`` naming the file and the set-up command; a pickle → ``unsafe_file``
    (never opened); anything safetensors cannot read → ``model_invalid``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelMissing(f"upscaler weights {path.name} not found at {path}; run `{SETUP_COMMAND}` to install them",
                           details={"file": path.name, "path": str(path), "setup_command": SETUP_COMMAND})
    if path.suffix != ".safetensors":
        # The download is a pickle; set-up converts it after checking its pin. Never unpickle here.
        raise UnsafeFile(f"{path.name}: only .safetensors weights are loaded; run `{SETUP_COMMAND}` to convert "
                         "the pickle after its sha256 is checked")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelInvalid(f"{path.name}: not a readable safetensors file ({str(exc)[:200]})") from None
    if not state_dict:
        raise ModelInvalid(f"{path.name}: holds no tensors")
    return rename_fooocus_keys(state_dict)


def build_network(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The ESRGAN network for ``state_dict`` (already renamed), built by spandrel, in eval mode.

    Refused with ``model_invalid`` unless spandrel recognises an ESRGAN with scale 4 and 3 input /
    3 output channels: any other network would give images of the wrong size or colours.
    """
    try:
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError
    except ImportError as exc:  # spandrel, or the torchvision it imports, does not match this torch
        raise HooocusError(f"the upscaler library spandrel cannot be imported ({exc}); install the "
                           "project's dependencies (spandrel needs a torchvision built for this torch)") from None
    try:
        descriptor = ModelLoader().load_from_state_dict(dict(state_dict))
    except UnsupportedModelError:
        raise ModelInvalid("the upscaler file is not a network spandrel recognises (expected a 4x ESRGAN)") from None
    except (KeyError, RuntimeError, ValueError) as exc:  # detected, but the tensors do not fit
        raise ModelInvalid(f"the upscaler file does not hold a consistent ESRGAN ({str(exc)[:200]})") from None
    found = (descriptor.architecture.id, getattr(descriptor, "scale", None),
             descriptor.input_channels, descriptor.output_channels)
    if not isinstance(descriptor, ImageModelDescriptor) or found != ("ESRGAN", SCALE, 3, 3):
        raise ModelInvalid(f"the upscaler must be a {SCALE}x ESRGAN with 3 input and 3 output channels; "
                           f"this file is {found[0]} with scale {found[1]}, {found[2]}->{found[3]} channels")
    network = descriptor.model
    network.eval().requires_grad_(False)
    return network


@dataclass(frozen=True)
class Upscaler:
    """A loaded upscaler: the network (float32, on ``device``) and where it came from."""

    network: torch.nn.Module
    device: torch.device
    path: Path


def load_upscaler(path: Path, device: torch.device | str = "cpu") -> Upscaler:
    """Read, check and build the upscaler at ``path`` onto ``device`` in float32."""
    device = torch.device(device)
    network = build_network(load_upscaler_state_dict(path))
    return Upscaler(network=network.to(device=device, dtype=torch.float32), device=device, path=Path(path))


# -- inference ----------------------------------------------------------------------------------


def feather_weights(length_px: int, feather_px: int) -> torch.Tensor:
    """Blend weights along one side of an upscaled tile: ``(t+1)/feather`` at ``t`` px from either
    edge for ``t < feather``, 1 inside; both ramps multiply where they meet.

    Written with Python slices on purpose: for a tile shorter than the ramp, the far-edge slice
    ``[n-1-t : n-t]`` goes negative and wraps (hits rows again or nothing), and the tiled scaling
    Fooocus uses builds its mask with exactly these slices, so the weights match it on slivers too.
    """
    weights = torch.ones(length_px, dtype=torch.float32)
    for t in range(feather_px):
        factor = (1.0 / feather_px) * (t + 1)
        weights[t:t + 1] *= factor
        weights[length_px - 1 - t:length_px - t] *= factor
    return weights


def tiled_upscale(image: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor], *, tile_px: int,
                  overlap_px: int, scale: int = SCALE, out_channels: int = 3) -> torch.Tensor:
    """``network`` applied to ``image`` (B×C×H×W, float32) tile by tile; the result on the CPU.

    The rule (spec §12.1 gives tile and overlap; the blend is Fooocus's tiled scaling):
    - tiles of ``tile_px`` start at 0, ``tile_px − overlap_px``, … along each side, as long as the
      start is inside the image (border tiles are cut by the image edge, and can be thin slivers
      that lie inside the previous tile);
    - each upscaled tile is weighted by :func:`feather_weights` with a ramp of
      ``round(overlap_px · scale)`` output px on all four sides (the image border too);
    - the output is Σ weight·tile / Σ weight. With one tile this is ``(tile·w)/w``, which equals the
      tile to float32 rounding (it is kept so one-tile results match Fooocus to the last bit).
    """
    if tile_px <= overlap_px:
        raise ValueError(f"tile_px {tile_px} must be larger than overlap_px {overlap_px}")
    batch, _, height, width = image.shape
    out_h, out_w = round(height * scale), round(width * scale)
    feather_px = round(overlap_px * scale)
    total = torch.zeros((batch, out_channels, out_h, out_w), dtype=torch.float32)
    weight_sum = torch.zeros_like(total)
    step = tile_px - overlap_px
    for y in range(0, height, step):
        for x in range(0, width, step):
            tile_out = network(image[:, :, y:y + tile_px, x:x + tile_px]).to("cpu", torch.float32)
            th, tw = tile_out.shape[-2:]
            mask = feather_weights(th, feather_px)[:, None] * feather_weights(tw, feather_px)[None, :]
            oy, ox = round(y * scale), round(x * scale)
            total[:, :, oy:oy + th, ox:ox + tw] += tile_out * mask
            weight_sum[:, :, oy:oy + th, ox:ox + tw] += mask
    return total / weight_sum


def upscale_float(upscaler: Upscaler, image_bhwc: torch.Tensor, *, tile_px: int = TILE_PX,
                  overlap_px: int = OVERLAP_PX) -> torch.Tensor:
    """The network on ``image_bhwc`` (float in [0, 1], B×H×W×3), clamped to [0, 1], B×4H×4W×3 on the CPU.

    Out-of-memory halves the tile and starts over (spec §12.1), down to :data:`MIN_TILE_PX`.
    """
    image = image_bhwc.to(upscaler.device, torch.float32).movedim(-1, 1)
    while True:
        try:
            with torch.inference_mode():
                result = tiled_upscale(image, upscaler.network, tile_px=tile_px, overlap_px=overlap_px)
            break
        except torch.cuda.OutOfMemoryError:  # = torch.OutOfMemoryError; raised on any device
            tile_px //= 2
            if upscaler.device.type == "cuda":
                torch.cuda.empty_cache()
            if tile_px < MIN_TILE_PX:
                raise OutOfMemory(f"the upscaler ran out of memory even with {tile_px * 2} px tiles") from None
    return result.movedim(1, -1).clamp(0.0, 1.0)


def to_uint8_truncating(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``uint8(clip(255·x, 0, 255))`` in float32, truncating toward zero as Fooocus's conversion does.

    Truncation, not rounding: a value a hair below a level boundary drops a whole level, so another
    machine's float32 rounding can move single pixels by 1 (parity README, "ESRGAN uint8").
    """
    values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return np.clip(values.astype(np.float32) * np.float32(255.0), 0, 255).astype(np.uint8)


def upscale_image(upscaler: Upscaler, image: np.ndarray) -> np.ndarray:
    """ESRGAN 4× of an H×W×3 ``uint8`` image: the 4H×4W×3 ``uint8`` Fooocus's ``perform_upscale`` gives."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div(255.0)[None]
    return to_uint8_truncating(upscale_float(upscaler, pixels)[0])


def fast_upscale_2x(upscaler: Upscaler, image: np.ndarray) -> np.ndarray:
    """Upscale (Fast 2x), spec §12.1: ESRGAN 4×, then LANCZOS to the 2× size; no diffusion.

    The size is the Upscale rule for factor 2 (:func:`engine.imaging.sizes.upscale_plan`, checked
    against the golden ``upscale_2x`` rows): ``(2W, 2H)``, or shape ceil 1024 when 2× would be
    smaller than that.
    """
    height, width = image.shape[:2]
    plan = upscale_plan(height, width, FAST_UPSCALE_FACTOR, sr_scale=SCALE)
    target_h, target_w = plan.result_hw  # the shape-ceil rule is already applied to the 4x size
    return resample_image(upscale_image(upscaler, image), target_w, target_h)
