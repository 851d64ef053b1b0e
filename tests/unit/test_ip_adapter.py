"""Unit: the IP-Adapter attention's contract (engine/sdxl/ip_adapter/); its numbers are checked against
Fooocus in tests/golden/test_ip_adapter_attention.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
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


# --- the attention-processor hook on the demo UNet (engine/sdxl/ip_adapter/hook.py, model.py) ----------

_STOP_AT = 0.5
_EARLY_T, _LATE_T = 999, 400  # progress 0.0 (< stop_at) and 1 − 400/999 ≈ 0.6 (≥ stop_at)


@pytest.fixture(scope="module")
def demo() -> Any:
    from engine.sdxl.models.demo import build_demo_sdxl

    return build_demo_sdxl("base")


@pytest.fixture(scope="module")
def adapter(demo: Any) -> Any:
    from engine.sdxl.ip_adapter.model import build_tiny_ip_adapter

    return build_tiny_ip_adapter(demo.unet)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _unet_inputs(demo: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    unet = demo.unet
    return {"sample": torch.randn(2, 4, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, demo.text_encoder_2.config.projection_dim, generator=g),
                                  "time_ids": torch.randn(2, 6, generator=g)}}


@torch.no_grad()
def _eps(demo: Any, timestep: int) -> torch.Tensor:
    return demo.unet(timestep=torch.tensor([timestep, timestep]), return_dict=False, **_unet_inputs(demo))[0]


def _layers(adapter: Any, image: np.ndarray, weight: float) -> list[list[ImagePromptKV]]:
    from engine.sdxl.ip_adapter.model import image_prompt_layers

    return [[kv] for kv in image_prompt_layers(adapter, image, stop_at=_STOP_AT, weight=weight)]


@contextmanager
def _installed(demo: Any, layers: list[list[ImagePromptKV]], codes: list[int] | None = None) -> Iterator[Any]:
    from engine.sdxl.ip_adapter.hook import install

    hook = install(demo.unet, layers, cond_or_uncond=codes or [UNCOND, COND])
    try:
        yield hook
    finally:
        hook.remove()


def test_hook_changes_output_while_active_and_not_after_stop_at(demo: Any, adapter: Any, image: np.ndarray) -> None:
    plain_early, plain_late = _eps(demo, _EARLY_T), _eps(demo, _LATE_T)
    with _installed(demo, _layers(adapter, image, 0.6)) as hook:
        early = _eps(demo, _EARLY_T)
        assert hook.state.progress == 0.0
        late = _eps(demo, _LATE_T)
        assert hook.state.progress == pytest.approx(1 - _LATE_T / 999) and hook.state.progress >= _STOP_AT
    assert float((early - plain_early).abs().max()) > 1e-4
    # Past stop_at the processor runs the same projections and SDPA call as diffusers' AttnProcessor2_0
    # with nothing appended: bit-identical (measured: max |diff| 0.0).
    assert torch.equal(late, plain_late)


def test_weight_zero_still_shifts_attention_as_fooocus_does(demo: Any, adapter: Any, image: np.ndarray) -> None:
    """Fooocus keeps a weight-0 prompt's tokens (zero keys, mean-free values): they take softmax mass,
    so the output changes (golden case out_3); no prompt at all leaves it unchanged."""
    plain = _eps(demo, _EARLY_T)
    with _installed(demo, _layers(adapter, image, 0.0)):
        zero = _eps(demo, _EARLY_T)
    with _installed(demo, [[] for _ in _layers(adapter, image, 0.0)]):
        none = _eps(demo, _EARLY_T)
    assert float((zero - plain).abs().max()) > 1e-5
    assert torch.equal(none, plain)


def test_processor_applies_the_attention_math_at_each_layer(demo: Any, adapter: Any, image: np.ndarray) -> None:
    """Each attn2 layer's output is ``to_out(fooocus_ip_attention(to_q(h), to_k(c), to_v(c)))`` with
    that layer's own tokens (so the ip_index → layer wiring is right)."""
    from engine.sdxl.ip_adapter.hook import attn2_processor_names

    layers = _layers(adapter, image, 0.8)
    modules = dict(demo.unet.named_modules())
    attns = [modules[name.removesuffix(".processor")] for name in attn2_processor_names(demo.unet)]
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = [a.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.append(
        (i, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"], out)), with_kwargs=True)
        for i, a in enumerate(attns)]
    try:
        with _installed(demo, layers):
            _eps(demo, _EARLY_T)
    finally:
        for h in handles:
            h.remove()
    assert sorted(i for i, *_ in seen) == list(range(len(attns)))
    for i, hidden, context, out in seen:
        a = attns[i]
        with torch.no_grad():
            expected = a.to_out[0](fooocus_ip_attention(a.to_q(hidden), a.to_k(context), a.to_v(context), layers[i],
                                                        [UNCOND, COND], 0.0, a.heads))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_cond_or_uncond_picks_image_or_negative_tokens(demo: Any, adapter: Any, image: np.ndarray) -> None:
    layers = _layers(adapter, image, 0.6)
    with _installed(demo, layers, [UNCOND, COND]):
        neg_pos = _eps(demo, _EARLY_T)
    with _installed(demo, layers, [COND, UNCOND]):
        pos_neg = _eps(demo, _EARLY_T)
    assert float((neg_pos - pos_neg).abs().max()) > 1e-4


def test_remove_restores_the_original_processors(demo: Any, adapter: Any, image: np.ndarray) -> None:
    from engine.sdxl.ip_adapter.hook import FooocusIPAttnProcessor, attn2_processor_names

    before = dict(demo.unet.attn_processors)
    with _installed(demo, _layers(adapter, image, 0.6)) as hook:
        now = demo.unet.attn_processors
        assert all(isinstance(now[n], FooocusIPAttnProcessor) for n in attn2_processor_names(demo.unet))
        assert hook.installed
    assert not hook.installed
    after = demo.unet.attn_processors
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    hook.remove()  # twice is harmless


def test_install_refuses_wrong_layer_count(demo: Any) -> None:
    from engine.sdxl.ip_adapter.hook import attn2_processor_names, install

    before = dict(demo.unet.attn_processors)
    with pytest.raises(ValueError, match="cross-attention layers"):
        install(demo.unet, [[]] * (len(attn2_processor_names(demo.unet)) + 1))
    assert all(demo.unet.attn_processors[n] is before[n] for n in before)


def test_clip_pixel_values_normalise_and_refuse_non_rgb() -> None:
    from engine.sdxl.ip_adapter.model import CLIP_MEAN, CLIP_STD, clip_pixel_values

    white = clip_pixel_values(np.full((224, 224, 3), 255, np.uint8))
    assert white.shape == (1, 3, 224, 224)
    torch.testing.assert_close(white[0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    with pytest.raises(ValueError):
        clip_pixel_values(np.zeros((224, 224), np.uint8))


# --- loading the released IP-Adapter layout (engine/sdxl/ip_adapter/model.py load_ip_adapter) ----------

#: diffusers resampler names → the IP-Adapter repository's (the layout of ip-adapter-plus_sdxl_vit-h),
#: written here by hand so the loader's use of diffusers' converter is checked against an independent map.
_TO_IP_ADAPTER = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
                  "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}


def _released_layout(adapter: Any, attn1_between: bool = True) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    state = adapter.resampler.state_dict()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[f"image_proj.{key}"] = value
            continue
        layer, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn.to_k"):
            kv = torch.cat([value, state[key.replace("to_k", "to_v")]])
            out[f"image_proj.layers.{layer}.0.to_kv.weight"] = kv
            continue
        if rest.startswith("attn.to_v"):
            continue
        module, leaf = rest.rsplit(".", 1)
        out[f"image_proj.layers.{layer}.{_TO_IP_ADAPTER[module]}.{leaf}"] = value
    for i in range(adapter.kv.layer_count):
        index = 2 * i + 1 if attn1_between else i  # attn1 layers take the even numbers in the released file
        out[f"ip_adapter.{index}.to_k_ip.weight"] = adapter.kv.kv[2 * i].weight
        out[f"ip_adapter.{index}.to_v_ip.weight"] = adapter.kv.kv[2 * i + 1].weight
    return out


def test_load_ip_adapter_from_the_released_layout(demo: Any, adapter: Any, image: np.ndarray) -> None:
    from engine.sdxl.ip_adapter.model import image_prompt_layers, load_ip_adapter

    loaded = load_ip_adapter(demo.unet, _released_layout(adapter), adapter.negative_tokens, vision=adapter.vision)
    want = image_prompt_layers(adapter, image, stop_at=0.5, weight=0.6)
    got = image_prompt_layers(loaded, image, stop_at=0.5, weight=0.6)
    for a, b in zip(got, want, strict=True):
        for field in ("k_cond", "v_cond", "k_uncond", "v_uncond"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0)


def test_load_ip_adapter_refuses_a_layer_count_mismatch(demo: Any, adapter: Any) -> None:
    from engine.sdxl.ip_adapter.model import load_ip_adapter

    state = _released_layout(adapter)
    for key in [k for k in state if k.startswith("ip_adapter.1.")]:
        del state[key]
    with pytest.raises(ValueError, match="k/v layers"):
        load_ip_adapter(demo.unet, state, adapter.negative_tokens, vision=adapter.vision)


def test_load_clip_vision_sizes_from_the_tensors(adapter: Any) -> None:
    from engine.sdxl.ip_adapter.model import load_clip_vision

    # The released layout carries the "vision_model." prefix and a projection the plus adapters ignore.
    state = {f"vision_model.{k}": v for k, v in adapter.vision.state_dict().items()}
    state["visual_projection.weight"] = torch.zeros(8, adapter.vision.config.hidden_size)
    vision = load_clip_vision(state, num_attention_heads=adapter.vision.config.num_attention_heads)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        b = adapter.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    del state["vision_model.post_layernorm.weight"]
    with pytest.raises(ValueError, match="lacks"):
        load_clip_vision(state, num_attention_heads=adapter.vision.config.num_attention_heads)


def test_hook_works_on_fused_qkv_projections(adapter: Any, image: np.ndarray) -> None:
    """The accelerator fuses k/v into one Linear and keeps to_k/to_v as views: the processor's
    to_k/to_v calls still see the fused weights, and remove() gives the fused processor back."""
    from engine.sdxl.acceleration.attention import fuse_qkv_views
    from engine.sdxl.models.demo import build_demo_sdxl

    fused = build_demo_sdxl("base")
    assert fuse_qkv_views(fused.unet) > 0
    plain_early, plain_late = _eps(fused, _EARLY_T), _eps(fused, _LATE_T)
    before = dict(fused.unet.attn_processors)
    with _installed(fused, _layers(adapter, image, 0.6)):
        early, late = _eps(fused, _EARLY_T), _eps(fused, _LATE_T)
    assert float((early - plain_early).abs().max()) > 1e-4
    # Separate k/v GEMMs vs one fused GEMM block their sums differently (acceleration/attention.py:
    # ≤ 1e-5 relative in float32); outputs here are O(1).
    torch.testing.assert_close(late, plain_late, atol=1e-5, rtol=1e-5)
    assert all(fused.unet.attn_processors[n] is before[n] for n in before)
