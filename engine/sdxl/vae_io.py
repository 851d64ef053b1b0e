"""VAE encode and decode as Fooocus does them for image inputs (spec §11.3, §12.1–12.2).

- **Encode samples the posterior.** Every encode is ``mean + std·randn(latent_shape)``, not the mean:
  one draw per encode call, or one per tile of a tiled encode, in call order (parity README, "Fooocus
  behaviour pinned down by runs e–h", item 1). The draws come from an explicit CPU
  ``torch.Generator`` the caller passes in (no global RNG state is touched); see
  :func:`posterior_generator` for how the pipeline must seed it to reproduce the parity runs.
- **Crop to multiples of 8** before encoding (:func:`crop_to_multiple_of_8`).
- **Channels-last input**: the encoder sees the pixels in the layout Fooocus gives it (see
  :func:`sample_posterior`); the float32 result depends on it at the 1e-3 level on the parity VAE.
- **Tiled encode** (Upscale): 512 px tiles with 64 px overlap, averaged over the tilings 512×512,
  1024 wide × 256 high and 256 wide × 1024 high, in that order. **Tiled decode**: 64-latent tiles,
  overlap 16, averaged over 32 wide × 128 high, 128 wide × 32 high and 64×64.
- Latents here are in **VAE space** (what ``core.encode_vae`` returns); the sampler works in model
  space, ``latent · scaling_factor`` (0.13025 for SDXL).

The blend inside one tiling is not written down in the spec or the parity README beyond "tile borders
blended". It is the feathered ``tiled_scale`` of ComfyUI (``comfy/utils.py``, late-2023 form, which
Fooocus's ``ldm_patched`` carries) as publicly described: tiles start at ``0, tile−overlap, …`` while
the start is inside the image (border tiles are cut short); each tile's output is weighted by a mask
that is 1 inside and ramps ``1/f, 2/f, … `` over the ``f = round(overlap·scale)`` outermost rows and
columns of the tile (the ramps multiply where they meet); the tiling's result is the weighted sum
divided by the summed weights. Two facts pin this form for Fooocus 2.5.5: the 33 per-tile posterior
draws of parity run f have exactly the tile shapes this grid gives (a later ComfyUI grid that clamps
the last tile gives 19), and replaying run f's stored per-tile samples through :func:`tiled_scale`
reproduces its encoded latent (``tests/unit/test_vae_io.py``). The decode's tilings use the same
function; their order (32×128, 128×32, 64×64) only changes float32 rounding.

We call the VAE's ``encoder``/``quant_conv`` and ``post_quant_conv``/``decoder`` directly rather than
``AutoencoderKL.encode``/``decode``: those switch to diffusers' own tiling (a different blend) when
``enable_tiling()`` was called, and ``encode`` would not let us own the posterior draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DECODE_OVERLAP_LATENT",
    "DECODE_TILE_LATENT",
    "ENCODE_OVERLAP_PX",
    "ENCODE_TILE_PX",
    "LATENT_SCALE_PX",
    "POSTERIOR_SEED",
    "Tile",
    "crop_to_multiple_of_8",
    "decode_tilings",
    "encode_tilings",
    "feather_mask",
    "posterior_generator",
    "sample_posterior",
    "tile_grid",
    "tiled_scale",
    "vae_decode",
    "vae_encode",
]

#: Pixels per latent cell along each side (SDXL's KL-f8 VAE).
LATENT_SCALE_PX = 8
#: Fooocus's tiled encode: ``VAEEncodeTiled(tile_size=512)`` with the default overlap of 64 px.
ENCODE_TILE_PX = 512
ENCODE_OVERLAP_PX = 64
#: Fooocus's tiled decode: ``VAEDecodeTiled(tile_size=512)`` = 64 latent cells, overlap 16 cells.
DECODE_TILE_LATENT = 64
DECODE_OVERLAP_LATENT = 16
#: The seed of the posterior generator that reproduces the parity runs: their harness calls
#: ``torch.manual_seed(0)`` right before each task, and nothing draws from the global CPU RNG between
#: that and the encodes (``params.json`` → ``derived.pre_task_global_seed``).
POSTERIOR_SEED = 0
#: ldm's DiagonalGaussianDistribution clamps the log-variance to this range before ``std = exp(logvar/2)``.
_LOGVAR_RANGE = (-30.0, 20.0)


def posterior_generator(seed: int = POSTERIOR_SEED) -> torch.Generator:
    """The CPU generator every VAE encode of one task draws its posterior noise from.

    How the pipeline must use it: create **one** per task (per Generate request, before its first
    encode) with the default seed and pass the same object to every :func:`vae_encode` of that task,
    in Fooocus's call order (inpaint: the grey-filled ``latent_inpaint`` encode first, then the fill
    encode; Vary/Upscale: the one encode). A CPU ``torch.Generator`` seeded ``s`` gives the same stream
    as the global CPU RNG after ``torch.manual_seed(s)``, so this reproduces every posterior draw of
    parity runs e, f and g bit for bit (checked in ``tests/unit/test_vae_io.py``).

    Fooocus itself leaves the global RNG in whatever state earlier work left it (the previous image's
    noise draws), so no fixed seed matches Fooocus in general; 0 matches the recorded runs, and with
    real SDXL VAE weights the posterior std is tiny, so the draw hardly changes the latent.
    """
    return torch.Generator(device="cpu").manual_seed(int(seed))


def crop_to_multiple_of_8(pixels: Tensor) -> Tensor:
    """``[B, C, H, W]`` cut to ``8·⌊H/8⌋ × 8·⌊W/8⌋``, centred: the cut starts ``(H mod 8) // 2`` rows
    (and ``(W mod 8) // 2`` columns) in, as ComfyUI's ``VAEEncode`` node (which Fooocus's
    ``core.encode_vae`` uses) crops. Sizes that already are multiples of 8 come back unchanged."""
    height, width = pixels.shape[-2:]
    new_h, new_w = height // LATENT_SCALE_PX * LATENT_SCALE_PX, width // LATENT_SCALE_PX * LATENT_SCALE_PX
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image of {height}×{width} px is smaller than one latent cell (8×8 px)")
    if (new_h, new_w) == (height, width):
        return pixels
    top, left = (height % LATENT_SCALE_PX) // 2, (width % LATENT_SCALE_PX) // 2
    return pixels[..., top:top + new_h, left:left + new_w]


# -------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class Tile:
    """One tile of the input: rows ``y:y+height``, columns ``x:x+width`` (border tiles are cut short)."""

    y: int
    x: int
    height: int
    width: int


def tile_grid(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[Tile]:
    """Tiles in processing order: rows outer, columns inner; starts at ``0, tile−overlap, 2·(tile−overlap), …``
    for as long as the start is inside the image (so the last tile of a row may lie inside the one
    before it; that is the rule, and it decides how many posterior draws an encode makes)."""
    if tile_h <= overlap or tile_w <= overlap:
        raise ValueError(f"tile {tile_h}×{tile_w} must be larger than the overlap {overlap}")
    return [Tile(y, x, min(tile_h, height - y), min(tile_w, width - x))
            for y in range(0, height, tile_h - overlap) for x in range(0, width, tile_w - overlap)]


def encode_tilings(tile_px: int = ENCODE_TILE_PX) -> tuple[tuple[int, int], ...]:
    """(tile height, tile width) of the three encode passes, in order: square, wide, tall."""
    return (tile_px, tile_px), (tile_px // 2, tile_px * 2), (tile_px * 2, tile_px // 2)


def decode_tilings(tile_latent: int = DECODE_TILE_LATENT) -> tuple[tuple[int, int], ...]:
    """(tile height, tile width) of the three decode passes, in order: tall, wide, square."""
    return (tile_latent * 2, tile_latent // 2), (tile_latent // 2, tile_latent * 2), (tile_latent, tile_latent)


def feather_mask(height: int, width: int, feather: int) -> Tensor:
    """``[1, 1, height, width]`` float32 blend weights of one tile's output.

    Row ``t`` from the top and row ``t`` from the bottom (and likewise columns) are multiplied by
    ``(t+1)/feather`` for ``t < feather``, one after the other, so a tile thinner than ``2·feather``
    gets both ramps multiplied into its middle rows (kept: the weights are then still positive, and
    it is what the reference computes).
    """
    mask = torch.ones((1, 1, height, width), dtype=torch.float32)
    for t in range(feather):
        ramp = (1.0 / feather) * (t + 1)
        mask[:, :, t:t + 1, :] *= ramp
        mask[:, :, height - 1 - t:height - t, :] *= ramp
        mask[:, :, :, t:t + 1] *= ramp
        mask[:, :, :, width - 1 - t:width - t] *= ramp
    return mask


def tiled_scale(samples: Tensor, function: Callable[[Tensor], Tensor], tile_h: int, tile_w: int, overlap: int, *,
                scale: float, out_channels: int) -> Tensor:
    """Apply ``function`` (which resizes by ``scale``) tile by tile and blend (module docstring).

    ``samples`` is ``[B, C, H, W]``; each batch row is tiled on its own, tiles in :func:`tile_grid`
    order, so ``function`` sees ``[1, C, h, w]`` tiles in exactly the order Fooocus feeds them (which
    is what makes the per-tile posterior draws line up). Returns float32 on ``samples``' device.
    """
    batch, _channels, height, width = samples.shape
    out_h, out_w = round(height * scale), round(width * scale)
    feather = round(overlap * scale)
    rows = []
    for b in range(batch):
        sample = samples[b:b + 1]
        acc = torch.zeros((1, out_channels, out_h, out_w), dtype=torch.float32, device=samples.device)
        weight = torch.zeros((1, 1, out_h, out_w), dtype=torch.float32, device=samples.device)
        for tile in tile_grid(height, width, tile_h, tile_w, overlap):
            out = function(sample[:, :, tile.y:tile.y + tile.height, tile.x:tile.x + tile.width]).float()
            mask = feather_mask(out.shape[-2], out.shape[-1], feather).to(out.device)
            top, left = round(tile.y * scale), round(tile.x * scale)
            region = (slice(None), slice(None), slice(top, top + out.shape[-2]), slice(left, left + out.shape[-1]))
            acc[region] += out * mask
            weight[region] += mask
        rows.append(acc / weight)
    return torch.cat(rows)


# ------------------------------------------------------------------------------------ encode / decode


def sample_posterior(vae: torch.nn.Module, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """One posterior sample ``mean + std·randn`` of ``pixels`` ``[B, 3, H, W]`` in [0, 1], VAE space, float32.

    The N(0, 1) draw has the latent's shape and comes from ``generator`` on the CPU in float32 (as
    Fooocus's ``torch.randn(mean.shape)`` on the global CPU RNG), then moves to the VAE's device; the
    sum is formed in float32 (Fooocus forms it in the VAE dtype: the same on CPU float32).
    """
    param = next(vae.parameters())
    # Channels-last on purpose: Fooocus hands the encoder ``movedim(-1, 1)`` of an NHWC image tensor,
    # i.e. a channels-last view, and PyTorch then runs every encoder convolution in that layout. On
    # CPU that is another kernel (oneDNN) with other float32 rounding, and the random-weight parity
    # VAE amplifies it near the image borders: contiguous input lands 1.5e-3 (rel) from Fooocus's
    # recorded posterior mean of run g, channels-last 2.5e-6 (measured, docs/golden-tolerances.md,
    # "VAE encode layout"). Same math either way, and channels-last is the fast layout on CUDA.
    # ``clone`` and not ``contiguous``: a ``[1, 3, H, W]`` view of an HWC array can already count as
    # channels-last-contiguous with a batch stride of 3, and PyTorch then still picks the NCHW kernels.
    x = (2.0 * pixels - 1.0).to(device=param.device, dtype=param.dtype).clone(memory_format=torch.channels_last)
    moments = vae.encoder(x)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = torch.chunk(moments.float(), 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, *_LOGVAR_RANGE))
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
    return mean + std * noise.to(mean.device)


def vae_encode(vae: torch.nn.Module, pixels: Tensor, generator: torch.Generator, *, tiled: bool = False,
               tile_px: int = ENCODE_TILE_PX, overlap_px: int = ENCODE_OVERLAP_PX) -> Tensor:
    """Fooocus's ``core.encode_vae``: crop to multiples of 8, then one posterior sample (or a tiled encode).

    ``pixels``: ``[B, 3, H, W]`` float in [0, 1]. Returns the VAE-space latent ``[B, 4, H/8, W/8]`` float32
    (multiply by the scaling factor for the sampler). Untiled: one draw of the latent's shape per
    call. Tiled: the three tilings of :func:`encode_tilings` averaged, one draw per tile, in order.
    ``tile_px``/``overlap_px`` exist so tests can tile tiny images; the pipeline keeps the defaults.
    """
    pixels = crop_to_multiple_of_8(pixels)
    with torch.no_grad():
        if not tiled:
            return sample_posterior(vae, pixels, generator)
        channels = _latent_channels(vae)

        def encode_tile(tile: Tensor) -> Tensor:
            return sample_posterior(vae, tile, generator)

        tilings = [tiled_scale(pixels, encode_tile, tile_h, tile_w, overlap_px, scale=1.0 / LATENT_SCALE_PX,
                               out_channels=channels) for tile_h, tile_w in encode_tilings(tile_px)]
        return _mean_of(tilings)


def vae_decode(vae: torch.nn.Module, latent: Tensor, *, tiled: bool = False, tile_latent: int = DECODE_TILE_LATENT,
               overlap_latent: int = DECODE_OVERLAP_LATENT) -> Tensor:
    """Fooocus's ``core.decode_vae``: VAE-space ``latent`` → ``[B, 3, 8h, 8w]`` float32 in [0, 1],
    ``clamp((decoder(latent) + 1) / 2, 0, 1)``; tiled: the three tilings of :func:`decode_tilings`
    blended and averaged before the clamp (so the clamp sees the average, as in Fooocus)."""
    param = next(vae.parameters())

    def decode_plus_one(z: Tensor) -> Tensor:
        z = z.to(device=param.device, dtype=param.dtype)
        if getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z).float() + 1.0

    with torch.no_grad():
        if not tiled:
            return torch.clamp(decode_plus_one(latent) / 2.0, 0.0, 1.0)
        channels = int(getattr(vae.config, "out_channels", 3))
        tilings = [tiled_scale(latent, decode_plus_one, tile_h, tile_w, overlap_latent, scale=LATENT_SCALE_PX,
                               out_channels=channels) for tile_h, tile_w in decode_tilings(tile_latent)]
        return torch.clamp(_mean_of(tilings) / 2.0, 0.0, 1.0)


def _mean_of(tilings: Sequence[Tensor]) -> Tensor:
    """Sum in pass order, then divide by the count (the reference's order of float32 operations)."""
    total = tilings[0].clone()
    for other in tilings[1:]:
        total += other
    return total / float(len(tilings))


def _latent_channels(vae: torch.nn.Module) -> int:
    config = getattr(vae, "config", None)
    return int(getattr(config, "latent_channels", 4))
