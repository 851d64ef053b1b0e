"""Seeded noise: prepare_noise's private stream and the Brownian tree's sign and scaling rules."""

from __future__ import annotations

import pytest
import torch

from engine.sdxl.sampling.noise import BrownianNoise, prepare_noise, randn_like

SHAPE = (1, 4, 8, 12)


def test_prepare_noise_matches_manual_seed_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    noise, generator = prepare_noise(12345, SHAPE)
    assert torch.equal(torch.random.get_rng_state(), state)

    reference = torch.Generator().manual_seed(12345)  # what torch.manual_seed(12345) seeds
    assert torch.equal(noise, torch.randn(SHAPE, generator=reference))
    assert noise.dtype == torch.float32
    # The generator continues the same stream: Fooocus's CPU randn_like after prepare_noise.
    assert torch.equal(randn_like(noise, generator), torch.randn(SHAPE, generator=reference))


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_prepare_noise_accepts_the_seed_range(seed: int) -> None:
    a, _ = prepare_noise(seed, SHAPE)
    b, _ = prepare_noise(seed, SHAPE)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_randn_like_keeps_shape_and_dtype() -> None:
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    out = randn_like(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float64


def test_brownian_sign_rule_and_scaling() -> None:
    tree = BrownianNoise(SHAPE, 0.03, 14.6, seed=7)
    hi, lo = torch.tensor(5.0), torch.tensor(2.0)
    down = tree.increment(hi, lo)
    # Stepping down in sigma flips the sign of the forward increment W(lo → hi).
    assert torch.equal(down, -tree.increment(lo, hi))
    torch.testing.assert_close(tree(hi, lo), down / 3.0**0.5)


def test_brownian_is_a_deterministic_function_of_seed_and_interval() -> None:
    a = BrownianNoise(SHAPE, 0.03, 14.6, seed=7)
    b = BrownianNoise(SHAPE, 0.03, 14.6, seed=7)
    c = BrownianNoise(SHAPE, 0.03, 14.6, seed=8)
    # Query a and b in different orders: one tree per image must not depend on query history.
    a_first = a.increment(torch.tensor(10.0), torch.tensor(8.0))
    b.increment(torch.tensor(3.0), torch.tensor(1.0))
    torch.testing.assert_close(b.increment(torch.tensor(10.0), torch.tensor(8.0)), a_first, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(c.increment(torch.tensor(10.0), torch.tensor(8.0)), a_first)


def test_brownian_increments_add_up() -> None:
    tree = BrownianNoise(SHAPE, 0.03, 14.6, seed=3)
    s = [torch.tensor(v) for v in (9.0, 4.0, 1.0)]
    whole = tree.increment(s[0], s[2])
    torch.testing.assert_close(tree.increment(s[0], s[1]) + tree.increment(s[1], s[2]), whole, atol=1e-5, rtol=1e-5)


def test_brownian_noise_has_unit_variance() -> None:
    tree = BrownianNoise((1, 4, 64, 64), 0.03, 14.6, seed=11)
    noise = tree(torch.tensor(6.0), torch.tensor(5.5))
    assert abs(float(noise.std()) - 1.0) < 0.05
    assert abs(float(noise.mean())) < 0.05


def test_degenerate_interval_fails_only_when_queried() -> None:
    tree = BrownianNoise(SHAPE, 14.6, 14.6, seed=1)  # a 1-step schedule has σmin == σmax
    with pytest.raises(ValueError, match="empty"):
        tree(torch.tensor(14.6), torch.tensor(1.0))
