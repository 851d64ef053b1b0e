"""Unit: the IP-Adapter attention's contract (engine/sdxl/ip_adapter/); its numbers are checked against
Fooocus in tests/golden/test_ip_adapter_attention.py."""

from __future__ import annotations

import pytest
import torch

from engine.sdxl.ip_adapter.attention import COND, UNCOND, ImagePromptKV, fooocus_ip_attention, scale_image_tokens


def _prompt(channels: int = 8, tokens: int = 3, *, stop_at: float = 0.5, weight: float = 1.0,
            seed: int = 0) -> ImagePromptKV:
    g = torch.Generator().manual_seed(seed)
    k_c, v_c, k_u, v_u = (torch.randn(1, tokens, channels, generator=g, dtype=torch.float64) for _ in range(4))
    return ImagePromptKV(k_c, v_c, k_u, v_u, stop_at=stop_at, weight=weight)


def _qkv(batch: int, channels: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(batch, n, channels, generator=g, dtype=torch.float64) for n in (5, 4, 4))


def test_channel_penalty_and_mean_preserving_values() -> None:
    k = torch.randn(1, 3, 640, dtype=torch.float64)
    v = torch.randn(1, 3, 640, dtype=torch.float64) + 2.0
    k_ip, v_ip = scale_image_tokens(k, v, 0.6)
    torch.testing.assert_close(k_ip, k * 0.6 * 640 / 1280)
    # The token mean is scaled by the penalised weight, the spread around it is kept.
    torch.testing.assert_close(v_ip.mean(1), v.mean(1) * 0.3)
    torch.testing.assert_close(v_ip - v_ip.mean(1, keepdim=True), v - v.mean(1, keepdim=True))


def test_batch_chunks_take_cond_or_uncond_tokens_per_chunk() -> None:
    """A UNet batch of [negative ×2, positive ×2] with cond_or_uncond [1, 0] equals running each row
    with its own code."""
    q, k, v = _qkv(4)
    prompt = _prompt()
    batched = fooocus_ip_attention(q, k, v, [prompt], [UNCOND, COND], 0.1, n_heads=2)
    rows = [fooocus_ip_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], [prompt], [code], 0.1, n_heads=2)
            for i, code in enumerate([UNCOND, UNCOND, COND, COND])]
    torch.testing.assert_close(batched, torch.cat(rows), atol=1e-12, rtol=0)
    assert float((rows[0] - fooocus_ip_attention(q[:1], k[:1], v[:1], [prompt], [COND], 0.1, 2)).abs().max()) > 1e-3


@pytest.mark.parametrize("codes", [[0, 2], [0, 1, 0]], ids=["bad-code", "uneven-chunks"])
def test_bad_cond_or_uncond_is_rejected(codes: list[int]) -> None:
    q, k, v = _qkv(2)
    with pytest.raises(ValueError, match="cond_or_uncond"):
        fooocus_ip_attention(q, k, v, [_prompt()], codes, 0.1, n_heads=2)
