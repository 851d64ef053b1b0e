"""Unit: FreeU V2 hooks on a diffusers UNet decoder (spec §11.4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.sdxl.models.freeu import apply_freeu_v2, freeu_v2_output_block

FACTORS = {"b1": 1.3, "b2": 1.4, "s1": 0.5, "s2": 0.7}


@pytest.fixture(scope="module")
def unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True)
    return model.eval()


def _run(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=context).sample


def test_hooks_patch_where_diffusers_designed_freeu(unet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our resnet pre-hooks == diffusers' own FreeU call site with the V2 math and the channel rule."""
    import diffusers.models.unets.unet_2d_blocks as blocks

    plain = _run(unet)
    hooks = apply_freeu_v2(unet, **FACTORS)
    try:
        hooked = _run(unet)
    finally:
        hooks.remove()
    # 128-channel h: up block 0 (2 resnets) + first resnet of up block 1; 64-channel h: the next two.
    assert not hooks.handles

    def v2_by_channels(_idx: int, h: torch.Tensor, hsp: torch.Tensor, **kw: float) -> tuple[torch.Tensor, ...]:
        return freeu_v2_output_block(h, hsp, model_channels=32, **kw)

    monkeypatch.setattr(blocks, "apply_freeu", v2_by_channels)
    unet.enable_freeu(**FACTORS)
    try:
        reference = _run(unet)
    finally:
        unet.disable_freeu()
    torch.testing.assert_close(hooked, reference, atol=1e-5, rtol=1e-5)
    assert (hooked - plain).abs().max() > 1e-3
    # remove() restores the plain model exactly.
    torch.testing.assert_close(_run(unet), plain, atol=0, rtol=0)


def test_hook_count_follows_channel_rule(unet: Any) -> None:
    hooks = apply_freeu_v2(unet, **FACTORS)
    try:
        # h channels per up-block resnet: [128, 128], [128, 64], [64, 32] -> 5 match 4x or 2x of 32.
        assert len(hooks.handles) == 5
    finally:
        hooks.remove()


def test_neutral_factors_are_identity() -> None:
    gen = torch.Generator().manual_seed(2)
    h, hsp = torch.randn(2, 64, 4, 6, generator=gen), torch.randn(2, 64, 4, 6, generator=gen)
    h_out, hsp_out = freeu_v2_output_block(h, hsp, model_channels=16, b1=1.0, b2=1.0, s1=1.0, s2=1.0)
    torch.testing.assert_close(h_out, h)
    torch.testing.assert_close(hsp_out, hsp, atol=1e-5, rtol=1e-5)
    # Half precision in, half precision out (the FFT runs in float32).
    assert freeu_v2_output_block(h.half(), hsp.half(), model_channels=16, **FACTORS)[1].dtype == torch.float16
