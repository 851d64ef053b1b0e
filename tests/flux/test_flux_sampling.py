"""The small pure pieces of FLUX.1 sampling (engine/flux/sampling.py, preview.py, encode.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.flux.demo import scheduler_config
from engine.flux.encode import FluxTextCache, FluxTextEmbedding
from engine.flux.preview import FLUX_LATENT_RGB_BIAS, FLUX_LATENT_RGB_FACTORS, flux_latent_to_rgb
from engine.flux.sampling import (
    euler_step,
    flux_sigmas,
    image_ids,
    latent_hw,
    pack_latents,
    shift_mu,
    start_noise,
    unpack_latents,
)


def test_pack_then_unpack_is_the_identity_and_groups_2x2_cells() -> None:
    latent = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = pack_latents(latent)
    assert tokens.shape == (2, 2 * 3, 64)
    assert torch.equal(unpack_latents(tokens, 4, 6), latent)
    # token 0 holds cell (0..1, 0..1) of every channel, channel-major: c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1...
    assert tokens[0, 0, :4].tolist() == [latent[0, 0, 0, 0], latent[0, 0, 0, 1], latent[0, 0, 1, 0], latent[0, 0, 1, 1]]


def test_image_ids_are_row_and_column_of_each_token() -> None:
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[:, 0].eq(0).all()
    assert ids[:, 1].tolist() == [0, 0, 0, 1, 1, 1] and ids[:, 2].tolist() == [0, 1, 2, 0, 1, 2]


def test_latent_size_rounds_down_to_whole_tokens() -> None:
    assert latent_hw(1024, 768) == (96, 128) and latent_hw(1000, 760) == (94, 124)


def test_shift_mu_is_linear_between_the_configured_points() -> None:
    config = scheduler_config("dev")
    assert shift_mu(256, config) == pytest.approx(0.5) and shift_mu(4096, config) == pytest.approx(1.15)
    assert shift_mu(2176, config) == pytest.approx(0.825)


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize(("steps", "seq_len"), [(1, 16), (4, 24), (28, 4096), (50, 1000)])
def test_sigmas_are_bit_identical_to_the_diffusers_scheduler(variant: str, steps: int, seq_len: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = scheduler_config(variant)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq_len, config))
    ours = flux_sigmas(steps, seq_len, config)
    assert ours.dtype == torch.float32 and torch.equal(ours, scheduler.sigmas.cpu())
    assert ours[-1] == 0 and bool((ours[:-1] > ours[1:]).all())


def test_schedule_switches_flux_does_not_use_are_refused() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        flux_sigmas(4, 256, {**scheduler_config("dev"), "use_karras_sigmas": True})
    with pytest.raises(ValueError):
        flux_sigmas(0, 256, scheduler_config("dev"))


def test_euler_step_moves_along_the_velocity_in_float32() -> None:
    x = torch.ones(1, 2, 4, dtype=torch.bfloat16)
    v = torch.full((1, 2, 4), 2.0, dtype=torch.bfloat16)
    out = euler_step(x, v, torch.tensor(1.0), torch.tensor(0.75))
    assert out.dtype == torch.bfloat16 and out.float().eq(0.5).all()


def test_start_noise_is_the_seeded_cpu_normal_packed() -> None:
    noise = start_noise(123, 16, 4, 6)
    expected = torch.randn((1, 16, 4, 6), generator=torch.Generator("cpu").manual_seed(123))
    assert torch.equal(noise, pack_latents(expected)) and not torch.equal(noise, start_noise(124, 16, 4, 6))


def test_preview_maps_each_cell_with_comfyuis_flux_factors() -> None:
    assert len(FLUX_LATENT_RGB_FACTORS) == 16 and all(len(row) == 3 for row in FLUX_LATENT_RGB_FACTORS)
    zero = flux_latent_to_rgb(torch.zeros(1, 16, 2, 3))
    bias_only = [int((b + 1) / 2 * 255) for b in FLUX_LATENT_RGB_BIAS]  # truncating, as the SDXL preview
    assert zero.shape == (2, 3, 3) and zero.dtype == np.uint8 and zero[0, 0].tolist() == bias_only
    one_hot = torch.zeros(16, 1, 1)
    one_hot[2] = 1.0
    expected = [int(np.clip((f + b + 1) / 2, 0, 1) * 255) for f, b in zip(FLUX_LATENT_RGB_FACTORS[2],
                                                                          FLUX_LATENT_RGB_BIAS, strict=True)]
    assert flux_latent_to_rgb(one_hot)[0, 0].tolist() == expected
    with pytest.raises(ValueError):
        flux_latent_to_rgb(torch.zeros(4, 2, 2))


def test_text_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = FluxTextCache(max_items=2)
    item = FluxTextEmbedding(sequence=torch.zeros(1), pooled=torch.zeros(1))
    cache.put(("a", 1), item)
    cache.put(("b", 1), item)
    assert cache.get(("a", 1)) is item  # "a" is now the most recent
    cache.put(("c", 1), item)
    assert cache.get(("b", 1)) is None and cache.get(("a", 1)) is item and cache.get(("c", 1)) is item
