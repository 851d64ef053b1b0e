"""VAE encode/decode for image inputs (engine/sdxl/vae_io.py): posterior sampling with an explicit
generator, crop to 8, the tile grid and feathered blend, tiled encode/decode on a tiny random VAE,
and the parity runs' posterior draws and tiled-encode blend replayed bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.sdxl import vae_io
from engine.sdxl.models.demo import demo_configs
from engine.sdxl.vae_io import (
    LATENT_SCALE_PX,
    crop_to_multiple_of_8,
    decode_tilings,
    encode_tilings,
    feather_mask,
    posterior_generator,
    tile_grid,
    tiled_scale,
    vae_decode,
    vae_encode,
)
from tests.paths import parity_runs_where


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    """The demo model's tiny KL-f8 VAE architecture (4 latent channels), random weights.

    Built alone (not through build_demo_sdxl, which also builds the text encoders); diffusers' own
    initialisation runs under a forked, seeded RNG so the global stream is left as it was.
    """
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = AutoencoderKL.from_config(demo_configs()["vae"])
    return model.eval().requires_grad_(False)


def _pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- crop


def test_crop_to_multiple_of_8_is_centred() -> None:
    pixels = torch.arange(21 * 30, dtype=torch.float32).reshape(1, 1, 21, 30)
    cropped = crop_to_multiple_of_8(pixels)
    # 21 = 16 + 5 → start at row 5 // 2 = 2; 30 = 24 + 6 → start at column 3.
    assert torch.equal(cropped, pixels[..., 2:18, 3:27])


def test_crop_leaves_multiples_of_8_alone_and_rejects_tiny_images() -> None:
    pixels = torch.rand(1, 3, 16, 24)
    assert crop_to_multiple_of_8(pixels) is pixels
    with pytest.raises(ValueError, match="smaller than one latent cell"):
        crop_to_multiple_of_8(torch.rand(1, 3, 7, 64))


def test_encode_crops_before_encoding(vae: torch.nn.Module) -> None:
    """A 53×45 image encodes as its centred 48×40 cut: same latent, same draw."""
    pixels = _pixels(53, 45)
    latent = vae_encode(vae, pixels, posterior_generator(7))
    assert latent.shape == (1, 4, 6, 5)
    assert torch.equal(latent, vae_encode(vae, pixels[..., 2:50, 2:42], posterior_generator(7)))


# ------------------------------------------------------------------------------ posterior sampling


def test_untiled_encode_is_diffusers_posterior_mean_plus_std_times_one_draw(vae: torch.nn.Module) -> None:
    """Against diffusers' own DiagonalGaussianDistribution: mean + std · (the generator's first draw),
    and the generator has advanced by exactly one randn of the latent's shape."""
    pixels = _pixels(48, 40)
    generator = posterior_generator(3)
    latent = vae_encode(vae, pixels, generator)
    reference = torch.Generator().manual_seed(3)
    noise = torch.randn((1, 4, 6, 5), generator=reference)
    with torch.no_grad():
        dist = vae.encode((2.0 * pixels - 1.0).clone(memory_format=torch.channels_last)).latent_dist
    # Same float32 operations in the same order (and layout) as diffusers' mean/std: equal to the last bit.
    assert torch.equal(latent, dist.mean + dist.std * noise)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_encoder_runs_channels_last_like_fooocus(vae: torch.nn.Module) -> None:
    """Fooocus feeds the encoder ``movedim(-1, 1)`` of an NHWC tensor, so every encoder convolution runs in
    the channels-last layout; on CPU that is another kernel with other float32 rounding (parity run g:
    1.5e-3 rel in NCHW, 2.5e-6 in channels-last). A ``[1, 3, H, W]`` view of an HWC array counts as
    channels-last-contiguous with a batch stride of 3, which PyTorch still runs as NCHW: that is the
    case that must come out channels-last with dense strides too."""
    seen: list[torch.Tensor] = []
    handle = vae.encoder.conv_in.register_forward_hook(lambda _m, _inp, out: seen.append(out))
    hwc = torch.rand(48, 40, 3, generator=torch.Generator().manual_seed(4))
    try:
        for pixels in (hwc.permute(2, 0, 1)[None], hwc.permute(2, 0, 1).contiguous()[None]):
            vae_encode(vae, pixels, posterior_generator())
            vae_encode(vae, pixels, posterior_generator(), tiled=True, tile_px=32, overlap_px=8)
    finally:
        handle.remove()
    assert len(seen) > 4
    for out in seen:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.stride()[0] == out[0].numel()  # a real channels-last tensor, not the ambiguous view


def test_generator_makes_encodes_deterministic_and_the_draw_matters(vae: torch.nn.Module) -> None:
    pixels = _pixels(32, 32)
    first = vae_encode(vae, pixels, posterior_generator())
    assert torch.equal(first, vae_encode(vae, pixels, posterior_generator()))
    # The random VAE's posterior std is about 1, so another seed moves the latent by O(1).
    assert (first - vae_encode(vae, pixels, posterior_generator(1))).abs().max() > 0.1


def test_global_rng_is_not_touched(vae: torch.nn.Module) -> None:
    before = torch.get_rng_state()
    vae_encode(vae, _pixels(32, 32), posterior_generator(), tiled=True, tile_px=32, overlap_px=8)
    assert torch.equal(torch.get_rng_state(), before)


def test_tiled_encode_draws_one_randn_per_tile_in_tiling_order(vae: torch.nn.Module) -> None:
    """The generator ends where drawing each tile's latent shape, pass by pass, row by row, leaves it."""
    height, width, tile_px, overlap_px = 48, 40, 32, 8
    generator = posterior_generator(5)
    vae_encode(vae, _pixels(height, width), generator, tiled=True, tile_px=tile_px, overlap_px=overlap_px)
    reference = torch.Generator().manual_seed(5)
    draws = 0
    for tile_h, tile_w in encode_tilings(tile_px):
        for tile in tile_grid(height, width, tile_h, tile_w, overlap_px):
            torch.randn((1, 4, tile.height // LATENT_SCALE_PX, tile.width // LATENT_SCALE_PX), generator=reference)
            draws += 1
    assert draws > 3  # the image really was tiled in every pass
    assert torch.equal(generator.get_state(), reference.get_state())


def test_tiled_encode_is_a_different_computation_from_untiled(vae: torch.nn.Module) -> None:
    """Tiles see less context and draw other noise, so the results differ (parity README: implement the tiling)."""
    pixels = _pixels(48, 40)
    plain = vae_encode(vae, pixels, posterior_generator())
    tiled = vae_encode(vae, pixels, posterior_generator(), tiled=True, tile_px=32, overlap_px=8)
    assert tiled.shape == plain.shape
    assert not torch.allclose(tiled, plain)


# ----------------------------------------------------------------------------------- tile and blend


@pytest.mark.parametrize(("height", "width", "tile_h", "tile_w", "overlap"),
                         [(1024, 1024, 512, 512, 64), (1024, 1024, 256, 1024, 64), (128, 96, 32, 128, 16), (40, 9, 8, 4, 2)])
def test_tile_grid_covers_the_image_with_fixed_strides(height: int, width: int, tile_h: int, tile_w: int,
                                                       overlap: int) -> None:
    tiles = tile_grid(height, width, tile_h, tile_w, overlap)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for tile in tiles:
        assert tile.y % (tile_h - overlap) == 0 and tile.x % (tile_w - overlap) == 0
        assert tile.height == min(tile_h, height - tile.y) and tile.width == min(tile_w, width - tile.x)
        covered[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width] += 1
    assert int(covered.min()) >= 1
    starts = [(t.y, t.x) for t in tiles]
    assert starts == sorted(starts)  # rows outer, columns inner


def test_tile_grid_rejects_overlap_not_smaller_than_tile() -> None:
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_grid(64, 64, 16, 16, 16)


def test_feather_mask_ramps_edges_and_keeps_the_inside() -> None:
    mask = feather_mask(10, 12, 4)[0, 0]
    assert torch.equal(mask[4:6, 4:8], torch.ones(2, 4))
    expected_edge = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(mask[:4, 6], expected_edge) and torch.allclose(mask[6:, 6], expected_edge.flip(0))
    assert torch.allclose(mask[0, 0], torch.tensor(0.25 * 0.25))
    assert bool((mask > 0).all())


def test_tiled_scale_of_a_local_function_equals_the_untiled_result() -> None:
    """For a function whose output cell depends only on its own input block (no context), tiling
    cannot change the value; only the normalisation ``Σ wᵢ·v / Σ wᵢ`` rounds. Each output cell sums
    at most 2×2 tiles per tiling with weights in (0, 1]; float32 relative rounding per operation is
    2⁻²⁴ ≈ 6e-8, and ≤ 4 additions + 1 multiply + 1 divide bound the error by 6 · 6e-8 · |v| < 1e-6·|v|."""
    latent = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(0))

    def up(z: torch.Tensor) -> torch.Tensor:  # latent → "pixels": nearest ×8 of a pointwise nonlinearity
        return torch.repeat_interleave(torch.repeat_interleave(torch.tanh(z[:, :3]), 8, dim=2), 8, dim=3)

    def down(x: torch.Tensor) -> torch.Tensor:  # "pixels" → latent: 8×8 mean pooling
        return torch.nn.functional.avg_pool2d(x, 8)

    for tile_h, tile_w in decode_tilings(8):
        tiled = tiled_scale(latent, up, tile_h, tile_w, 2, scale=8, out_channels=3)
        assert torch.allclose(tiled, up(latent), rtol=1e-6, atol=0)
    pixels = up(latent)
    for tile_h, tile_w in encode_tilings(64):
        tiled = tiled_scale(pixels, down, tile_h, tile_w, 16, scale=1 / 8, out_channels=3)
        assert torch.allclose(tiled, down(pixels), rtol=1e-6, atol=1e-7)


def test_tiled_decode_with_one_tile_per_pass_equals_the_plain_decode(vae: torch.nn.Module) -> None:
    """When every pass has a single tile, tiling only multiplies and divides by the blend weight:
    ``(v·w)/w`` is v within one rounding of each, so 2⁻²³ relative (≤ 1.2e-7 on values ≤ 1 after the
    /2 and clamp; atol 3e-7 leaves a factor 2.5)."""
    latent = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    plain = vae_decode(vae, latent)
    tiled = vae_decode(vae, latent, tiled=True, tile_latent=16, overlap_latent=2)
    assert plain.shape == (1, 3, 48, 40) and float(plain.min()) >= 0.0 and float(plain.max()) <= 1.0
    assert torch.allclose(tiled, plain, rtol=0, atol=3e-7)


def test_tiled_decode_differs_from_plain_when_tiles_are_small(vae: torch.nn.Module) -> None:
    latent = 0.3 * torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    plain = vae_decode(vae, latent)
    tiled = vae_decode(vae, latent, tiled=True, tile_latent=4, overlap_latent=1)
    assert tiled.shape == plain.shape
    assert not torch.allclose(tiled, plain, atol=1e-3)


# --------------------------------------------------------------------------------------- parity runs


def _params(folder: Path) -> dict:
    return json.loads((folder / "params.json").read_text(encoding="utf-8"))


def _has_encodes(folder: Path) -> bool:
    derived = _params(folder).get("derived", {})
    return bool(derived.get("vae_encode_calls")) and (folder / "image_inputs.safetensors").is_file()


def _has_tiled_encode(folder: Path) -> bool:
    return _has_encodes(folder) and any(c["tiled"] for c in _params(folder)["derived"]["vae_encode_calls"])


def _expected_draw_shapes(folder: Path) -> list[tuple[int, ...]]:
    """Every posterior draw's shape, in call order, from our own rules: inpaint encodes first (one
    latent-sized draw each), then each encode: one latent-sized draw, or one per tile of the 3 tilings."""
    derived = _params(folder)["derived"]
    shapes: list[tuple[int, ...]] = []
    for call in derived.get("vae_encode_inpaint_calls", []):
        shapes.append(tuple(derived["vae_encode_calls"][0]["latent_shape"]))
        assert call["posterior_calls"][1] - call["posterior_calls"][0] == 1
    for call in derived["vae_encode_calls"]:
        batch, height, width, _ = call["pixels_shape"]
        if not call["tiled"]:
            shapes.append(tuple(call["latent_shape"]))
            continue
        for tile_h, tile_w in encode_tilings():
            shapes += [(batch, 4, t.height // 8, t.width // 8) for t in tile_grid(height, width, tile_h, tile_w, 64)]
    return shapes


@pytest.mark.parametrize("folder", parity_runs_where("image-input", _has_encodes))
def test_posterior_generator_reproduces_every_parity_draw(folder: Path) -> None:
    """posterior_generator() and our draw order/shapes give Fooocus's posterior noise bit for bit
    (run f: the 33 tile draws of a tiled 1024² encode; g: inpaint encode, then fill)."""
    shapes = _expected_draw_shapes(folder)
    generator = posterior_generator()
    with safe_open(str(folder / "image_inputs.safetensors"), "pt") as handle:
        stored = sorted(k for k in handle.keys() if k.startswith("posterior") and k.endswith(".noise"))
        assert len(stored) == len(shapes)
        for key, shape in zip(stored, shapes):
            noise = handle.get_tensor(key)
            assert tuple(noise.shape) == shape, key
            assert torch.equal(torch.randn(shape, generator=generator), noise), key


@pytest.mark.parametrize("folder", parity_runs_where("tiled-encode", _has_tiled_encode))
def test_tiled_encode_reproduces_the_parity_encoded_latent(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vae_encode(tiled=True) with Fooocus's own per-tile posterior samples in place of our VAE gives
    its encoded latent exactly: the grid, the pass order, the feather and the averaging all match."""
    derived = _params(folder)["derived"]
    call = next(c for c in derived["vae_encode_calls"] if c["tiled"])
    first, end = call["posterior_calls"]
    with safe_open(str(folder / "image_inputs.safetensors"), "pt") as handle:
        samples = iter([handle.get_tensor(f"posterior{i:02d}.sample") for i in range(first, end)])
        expected = handle.get_tensor(f"encode_vae{derived['vae_encode_calls'].index(call)}.latent")

    def replay(_vae: object, tile: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        sample = next(samples)
        assert tuple(sample.shape[-2:]) == (tile.shape[-2] // 8, tile.shape[-1] // 8)
        return sample

    monkeypatch.setattr(vae_io, "sample_posterior", replay)
    batch, height, width, _ = call["pixels_shape"]
    latent = vae_encode(object(), torch.zeros((batch, 3, height, width)), posterior_generator(), tiled=True)
    assert next(samples, None) is None
    assert torch.equal(latent, expected)
