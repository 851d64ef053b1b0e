"""engine.imaging.upscaler: loading rules, spandrel's network, tiling, OOM halving, uint8, Fast 2x.

Tiny networks only: an RRDB with one block and 8 filters in the Fooocus file's key layout, and
pointwise fakes where the tiling arithmetic itself is under test. The full-size network against
Fooocus's own output is tests/golden/test_upscaler.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.core.errors import HooocusError
from engine.imaging.resize import resample_image
from engine.imaging.sizes import upscale_plan
from engine.imaging.upscaler import (
    MIN_TILE_PX,
    OVERLAP_PX,
    SETUP_COMMAND,
    TILE_PX,
    UPSCALER_FILE_NAME,
    Upscaler,
    build_network,
    fast_upscale_2x,
    feather_weights,
    load_upscaler,
    load_upscaler_state_dict,
    rename_fooocus_keys,
    tiled_upscale,
    to_uint8_truncating,
    upscale_float,
    upscale_image,
)

_FLOAT32_EPS = 2.0 ** -23


def _tiny_fooocus_state_dict(*, blocks: int = 1, nf: int = 8, gc: int = 32, in_nc: int = 3,
                             out_nc: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """An old-arch 4x ESRGAN in the layout of Fooocus's file (``residual_block_j``), small random values
    (layout: ../shared/parity/make_upscaler.py's docstring)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) / math.sqrt(cin * 9)
        sd[f"{name}.bias"] = torch.randn(cout, generator=gen) * 0.02

    conv("model.0", nf, in_nc)
    for b in range(blocks):
        for j in (1, 2, 3):
            for k in range(1, 6):
                conv(f"model.1.sub.{b}.residual_block_{j}.conv{k}.0", gc if k < 5 else nf, nf + (k - 1) * gc)
    conv(f"model.1.sub.{blocks}", nf, nf)
    conv("model.3", nf, nf)
    conv("model.6", nf, nf)
    conv("model.8", nf, nf)
    conv("model.10", out_nc, nf)
    return sd


def _write(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def _nearest_4x(x: torch.Tensor) -> torch.Tensor:
    """A pointwise 'network': every output pixel depends on one input pixel only, so tiling cannot
    change it, only the blend arithmetic can."""
    return torch.nn.functional.interpolate(x * 0.75 + 0.1, scale_factor=4, mode="nearest")


def _fake_upscaler(network) -> Upscaler:  # type: ignore[no-untyped-def]
    return Upscaler(network=network, device=torch.device("cpu"), path=Path("fake.safetensors"))


# -- loading -----------------------------------------------------------------------------------


def test_fooocus_block_names_become_esrgan_rdb_names() -> None:
    renamed = rename_fooocus_keys(_tiny_fooocus_state_dict())
    assert "model.1.sub.0.RDB2.conv3.0.weight" in renamed
    assert not [k for k in renamed if "residual_block_" in k]
    assert "model.10.bias" in renamed and len(renamed) == len(_tiny_fooocus_state_dict())


def test_a_missing_file_is_model_missing_naming_the_file_and_the_setup_command(tmp_path: Path) -> None:
    with pytest.raises(HooocusError) as info:
        load_upscaler_state_dict(tmp_path / UPSCALER_FILE_NAME)
    assert info.value.code == "model_missing"
    assert UPSCALER_FILE_NAME in info.value.message and SETUP_COMMAND in info.value.message
    assert info.value.details["setup_command"] == "hooocus setup --only upscale"


def test_a_pickle_is_refused_without_being_opened(tmp_path: Path) -> None:
    pickle = tmp_path / "fooocus_upscaler_s409985e5.bin"
    pickle.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(HooocusError) as info:
        load_upscaler_state_dict(pickle)
    assert info.value.code == "unsafe_file"


def test_an_unreadable_safetensors_file_is_model_invalid(tmp_path: Path) -> None:
    bad = tmp_path / UPSCALER_FILE_NAME
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(HooocusError) as info:
        load_upscaler_state_dict(bad)
    assert info.value.code == "model_invalid"


# -- spandrel builds the network -----------------------------------------------------------------


def test_spandrel_builds_a_4x_rrdb_from_the_renamed_fooocus_keys(tmp_path: Path) -> None:
    sd = _tiny_fooocus_state_dict()
    upscaler = load_upscaler(_write(tmp_path / UPSCALER_FILE_NAME, sd))
    assert type(upscaler.network).__name__ == "RRDBNet"
    out = upscaler.network(torch.rand(1, 3, 5, 7))
    assert out.shape == (1, 3, 20, 28)
    # Every tensor of the file went into the network (nothing dropped by the renaming).
    params = dict(upscaler.network.state_dict())
    assert sum(v.numel() for v in params.values()) == sum(v.numel() for v in sd.values())


def test_a_state_dict_that_is_no_esrgan_is_model_invalid() -> None:
    not_an_upscaler = {"encoder.weight": torch.zeros(4, 4), "encoder.bias": torch.zeros(4)}
    with pytest.raises(HooocusError) as info:
        build_network(not_an_upscaler)
    assert info.value.code == "model_invalid"


def test_an_esrgan_with_other_channels_is_model_invalid() -> None:
    grey = rename_fooocus_keys(_tiny_fooocus_state_dict(in_nc=1, out_nc=1))
    with pytest.raises(HooocusError) as info:
        build_network(grey)
    assert info.value.code == "model_invalid" and "1->1" in info.value.message


def test_tiled_rrdb_matches_untiled_away_from_tile_borders(tmp_path: Path) -> None:
    """128 px tiles with the 32 px overlap on a 180x200 image (tiles start at 0, 96, 192: a 2x3 grid
    with an 8 px sliver) against one whole-image pass. (A smaller tile than 512 keeps the network
    run cheap; the rule does not depend on the tile size.)

    Bound: a tile's zero padding changes outputs within the network's receptive field of the tile
    edge (one RRDB: 1 + 15 + 1 convs at 1x, then upconvs/HR/last at 2x and 4x, about 18 input px),
    and the blend still gives those pixels a ramp weight, so tiled ≠ untiled near seams. Measured on
    this seed (value std 0.09): max |Δ| 2.4e-2 near seams, 6e-8 (float32 rounding) farther than 32 input px from
    every inner tile edge (already at 16 px). Asserted: ≤ 1e-6 away from inner edges, ≤ 5e-2 (2x the
    measured seam error) everywhere.
    """
    upscaler = load_upscaler(_write(tmp_path / UPSCALER_FILE_NAME, _tiny_fooocus_state_dict()))
    height, width, tile = 180, 200, 128
    image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = upscaler.network(image.movedim(-1, 1)).movedim(1, -1).clamp(0, 1)
    tiled = upscale_float(upscaler, image, tile_px=tile)
    assert tiled.shape == whole.shape == (1, height * 4, width * 4, 3)
    diff = (tiled - whole).abs()[0].amax(dim=-1)

    def far_from_inner_edges(size: int) -> torch.Tensor:
        starts = range(0, size, tile - OVERLAP_PX)
        edges = {e for s in starts for e in (s, min(s + tile, size)) if 0 < e < size}
        positions = torch.arange(size * 4) / 4
        return torch.stack([(positions - e).abs() > 32 for e in edges]).all(dim=0)

    far = far_from_inner_edges(height)[:, None] & far_from_inner_edges(width)[None, :]
    assert far.any() and not far.all()
    assert diff[far].max() <= 1e-6
    assert diff.max() <= 5e-2


# -- tiling arithmetic ----------------------------------------------------------------------------


def test_feather_weights_are_linear_ramps_and_wrap_on_slivers() -> None:
    assert feather_weights(10, 4).tolist() == [0.25, 0.5, 0.75, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    # A 3 px sliver with a 4 px ramp: the far-edge slice [n-1-t : n-t] runs past the start and hits
    # row 0 at t = 2 and nothing at t = 3 (worked by hand: [.25·.75, .5·.5, .25·.75]).
    assert feather_weights(3, 4).tolist() == [0.1875, 0.25, 0.1875]


def test_two_tiles_cross_fade_linearly_over_the_overlap() -> None:
    """A fake returning 0 for the first tile and 1 for the second: on a 600 px wide row the tiles
    are [0, 512) and [480, 600); in output px the overlap is [1920, 2048) with a 128 px ramp, so
    output column c there is w_B / (w_A + w_B) = (c − 1919) / ((2048 − c) + (c − 1919)) = (c − 1919)/129."""
    calls: list[tuple[int, int]] = []

    def by_tile(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        value = float(len(calls) - 1)
        return torch.full((1, 3, x.shape[-2] * 4, x.shape[-1] * 4), value)

    out = tiled_upscale(torch.zeros(1, 3, 40, 600), by_tile, tile_px=TILE_PX, overlap_px=OVERLAP_PX)
    assert calls == [(40, 512), (40, 120)]
    row = out[0, 0, 80]
    columns = torch.arange(1920, 2048)
    assert torch.allclose(row[1920:2048], (columns - 1919).float() / 129, rtol=0, atol=4 * _FLOAT32_EPS)
    assert row[:1920].abs().max() == 0 and (row[2048:] == 1).all()


def test_tiling_a_pointwise_network_changes_nothing() -> None:
    """700x1100 gives 2x3 tiles plus slivers. Every output pixel is Σw·v/Σw of one value v ∈ [0.1, 0.85]
    over at most 9 tiles: float32 error ≤ (9 + 2)·eps relative < 1e-6, the bound asserted."""
    image = torch.rand(1, 3, 700, 1100, generator=torch.Generator().manual_seed(2))
    tiled = tiled_upscale(image, _nearest_4x, tile_px=TILE_PX, overlap_px=OVERLAP_PX)
    assert torch.allclose(tiled, _nearest_4x(image), rtol=1e-6, atol=0)


def test_out_of_memory_halves_the_tile_and_starts_over() -> None:
    sizes: list[int] = []

    def small_memory(x: torch.Tensor) -> torch.Tensor:
        sizes.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > 256:
            raise torch.OutOfMemoryError("fake: tile too large")
        return _nearest_4x(x)

    image = torch.rand(1, 300, 600, 3, generator=torch.Generator().manual_seed(3))
    out = upscale_float(_fake_upscaler(small_memory), image)
    assert sizes[0] == 512 and max(sizes[1:]) == 256  # one failed 512 tile, then only 256 tiles
    assert torch.allclose(out, _nearest_4x(image.movedim(-1, 1)).movedim(1, -1), rtol=1e-6, atol=0)


def test_out_of_memory_at_the_smallest_tile_is_an_out_of_memory_error() -> None:
    tried: list[int] = []

    def no_memory(x: torch.Tensor) -> torch.Tensor:
        tried.append(max(x.shape[-2:]))
        raise torch.OutOfMemoryError("fake: never enough")

    with pytest.raises(HooocusError) as info:
        upscale_float(_fake_upscaler(no_memory), torch.rand(1, 600, 600, 3))
    assert info.value.code == "out_of_memory"
    assert tried == [512, 256, MIN_TILE_PX]


# -- conversions and Fast 2x -------------------------------------------------------------------------


def test_uint8_conversion_truncates() -> None:
    levels = np.arange(256, dtype=np.float32)
    just_below_next = (levels + np.float32(0.99)) / np.float32(255.0)
    assert (to_uint8_truncating(just_below_next[:-1]) == levels[:-1]).all()  # not rounded up
    assert to_uint8_truncating(np.array([-0.5, 1.5], dtype=np.float32)).tolist() == [0, 255]
    assert to_uint8_truncating(torch.tensor([0.5])).tolist() == [127]  # 127.5 → 127


def test_upscale_image_takes_uint8_and_gives_the_truncated_4x_result() -> None:
    image = np.random.default_rng(4).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = upscale_image(_fake_upscaler(_nearest_4x), image)
    expected = to_uint8_truncating(_nearest_4x(torch.from_numpy(image).float().div(255).movedim(-1, 0)[None])
                                   [0].movedim(0, -1))
    assert out.dtype == np.uint8 and out.shape == (36, 52, 3)
    # The one-tile blend (x·w)/w equals x only to float32 rounding, and truncation turns a 1 ulp
    # step below a level boundary into one level: so ≤ 1 level against the unblended values, and
    # exact against the float path it is built on.
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    pixels = torch.from_numpy(image).float().div(255)[None]
    assert (out == to_uint8_truncating(upscale_float(_fake_upscaler(_nearest_4x), pixels)[0])).all()
    with pytest.raises(ValueError):
        upscale_image(_fake_upscaler(_nearest_4x), image.astype(np.float32))


@pytest.mark.parametrize("hw", [(150, 100), (600, 560)])
def test_fast_2x_is_esrgan_then_lanczos_to_the_2x_size(hw: tuple[int, int]) -> None:
    """(150, 100): 2x is below shape ceil 1024, so the 4x result is set to shape ceil 1024 instead;
    (600, 560): plain (2W, 2H)."""
    image = np.random.default_rng(5).integers(0, 256, (*hw, 3), dtype=np.uint8)
    upscaler = _fake_upscaler(_nearest_4x)
    out = fast_upscale_2x(upscaler, image)
    plan = upscale_plan(*hw, 2.0)
    assert out.shape[:2] == plan.result_hw
    assert (out == resample_image(upscale_image(upscaler, image), plan.result_hw[1], plan.result_hw[0])).all()
    if hw == (600, 560):
        assert out.shape[:2] == (1200, 1120)


