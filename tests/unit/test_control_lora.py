"""Unit: Control-LoRA → diffusers ControlNetModel (engine/sdxl/control/control_lora.py) and its residuals.

The tiny Control-LoRA file is written in the ldm layout by the test itself: the encoder keys through
the project's own diffusers → ldm UNet renaming (engine.sdxl.models.demo, written independently of
diffusers' converter the module uses), the ControlNet-only keys by the fixed names of the ldm
ControlNet (``input_hint_block.{0,2,…,14}``, ``zero_convs.i.0``, ``middle_block_out.0``). The key map
is also checked on the real SDXL layout: every ldm UNet encoder key of an SDXL base checkpoint
(tests/data/sdxl_base_keys.json) must land on a ControlNet parameter of the same shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
import torch

from engine.sdxl.control.control_lora import (
    CONTROL_LORA_MARKER,
    build_control_lora,
    control_hint,
    control_residuals,
    diffusers_key_map,
)
from engine.sdxl.control.softness import softness_factors
from engine.sdxl.models.demo import _unet_to_ldm
from tests.paths import sdxl_base_keys_file

_RANK = 2
#: Encoder modules the tiny file stores as LoRA pairs (linear and 3×3 conv); the rest are full values.
_LORA_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_out.0.weight", ".proj_in.weight", ".conv1.weight")
_LDM_PREFIX = "model.diffusion_model."
_ENCODER_TOPS = ("input_blocks", "middle_block", "time_embed", "label_emb")


def _control_only_ldm(name: str) -> str:
    """diffusers ControlNet-only parameter → the ldm ControlNet name (the fixed cldm layout)."""
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{leaf}"
    if parts[0] == "controlnet_mid_block":
        return f"middle_block_out.0.{leaf}"
    if parts[1] == "conv_in":
        return f"input_hint_block.0.{leaf}"
    if parts[1] == "blocks":
        return f"input_hint_block.{2 * (int(parts[2]) + 1)}.{leaf}"
    return f"input_hint_block.14.{leaf}"  # conv_out after the 6 blocks


def _rand(shape: torch.Size | tuple[int, ...], tag: str, scale: float = 0.1) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little")
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def demo() -> Any:
    from engine.sdxl.models.demo import build_demo_sdxl

    return build_demo_sdxl("base")


@pytest.fixture(scope="module")
def tiny_file(demo: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the Control-LoRA state dict, the diffusers parameters it must produce)."""
    from diffusers import ControlNetModel

    unet = demo.unet
    base = ControlNetModel.from_unet(unet)
    expected: dict[str, torch.Tensor] = {}
    file: dict[str, torch.Tensor] = {CONTROL_LORA_MARKER: torch.tensor([])}
    encoder = {n: p.detach() for n, p in base.named_parameters() if not n.startswith("controlnet_")}
    for name, ldm in zip(encoder, _unet_to_ldm(encoder, unet.config), strict=True):
        weight = encoder[name]
        if name.endswith(_LORA_SUFFIXES):
            up = _rand((weight.shape[0], _RANK, *([1] * (weight.ndim - 2))), f"up/{name}")
            down = _rand((_RANK, *weight.shape[1:]), f"down/{name}")
            stem = ldm.removesuffix(".weight")
            file[stem + ".up"], file[stem + ".down"] = up, down
            expected[name] = weight + torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
        elif name.endswith(".bias") or "norm" in name:
            file[ldm] = weight + _rand(weight.shape, f"full/{name}", 0.01)
            expected[name] = file[ldm]
        else:
            expected[name] = weight  # not in the file: stays the UNet's
    for name, param in base.named_parameters():
        if name.startswith("controlnet_"):
            file[_control_only_ldm(name)] = _rand(param.shape, f"control/{name}")
            expected[name] = file[_control_only_ldm(name)]
    return file, expected


def test_control_lora_merges_into_the_unet_copy(demo: Any, tiny_file: Any) -> None:
    file, expected = tiny_file
    controlnet = build_control_lora(demo.unet, file)
    got = dict(controlnet.named_parameters())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("break_it", ["no-marker", "missing-zero-conv", "bad-shape"])
def test_bad_control_lora_is_refused(demo: Any, tiny_file: Any, break_it: str) -> None:
    file = dict(tiny_file[0])
    if break_it == "no-marker":
        del file[CONTROL_LORA_MARKER]
    elif break_it == "missing-zero-conv":
        del file["zero_convs.3.0.weight"]
    else:
        file["middle_block_out.0.bias"] = torch.zeros(3)
    with pytest.raises(ValueError):
        build_control_lora(demo.unet, file)


def test_key_map_covers_the_sdxl_encoder_with_matching_shapes() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from engine.sdxl.models.configs import component_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_config("base", "unet"))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    shapes = {name: tuple(p.shape) for name, p in controlnet.named_parameters()}
    rows = json.loads(sdxl_base_keys_file().read_text())
    ldm = {key.removeprefix(_LDM_PREFIX): tuple(shape) for key, shape, _ in rows
           if key.startswith(_LDM_PREFIX) and key.removeprefix(_LDM_PREFIX).split(".")[0] in _ENCODER_TOPS}
    control_only = {_control_only_ldm(n): s for n, s in shapes.items() if n.startswith("controlnet_")}
    mapping = diffusers_key_map([*ldm, *control_only], controlnet.config)
    assert all(shapes[mapping[k]] == s for k, s in {**ldm, **control_only}.items())
    # Every ControlNet parameter comes from exactly one ldm key (the encoder copy or the file).
    assert sorted(mapping.values()) == sorted(shapes)


def test_residuals_positive_rows_only_with_softness_and_strength(demo: Any, tiny_file: Any) -> None:
    controlnet = build_control_lora(demo.unet, tiny_file[0])
    g = torch.Generator().manual_seed(0)
    unet = demo.unet
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, demo.text_encoder_2.config.projection_dim, generator=g),
             "time_ids": torch.randn(2, 6, generator=g)}
    control_map = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    hint = control_hint(control_map)
    assert hint.shape == (1, 3, 128, 128) and float(hint.max()) <= 1.0
    t = torch.tensor(500)
    down, mid = control_residuals(controlnet, sample, t, encoder_hidden_states=context, added_cond_kwargs=added,
                                  hint=hint, cond_or_uncond=[1, 0], strength=0.7)
    with torch.no_grad():
        raw_down, raw_mid = controlnet(sample[1:], t.reshape(1), encoder_hidden_states=context[1:], controlnet_cond=hint,
                                       added_cond_kwargs={k: v[1:] for k, v in added.items()}, return_dict=False)
    factors = softness_factors(0.25, len(raw_down) + 1)
    for got, raw, factor in zip([*down, mid], [*raw_down, raw_mid], factors, strict=True):
        assert not got[0].any()  # the negative row gets no control
        torch.testing.assert_close(got[1:], raw * factor * 0.7, atol=1e-6, rtol=1e-5)
    assert float(mid[1].abs().max()) > 0
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]
        guided = unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False,
                      down_block_additional_residuals=down, mid_block_additional_residual=mid)[0]
    assert torch.equal(guided[0], plain[0])  # zero residuals: x + 0 is x, bit for bit
    assert float((guided[1] - plain[1]).abs().max()) > 1e-4
    assert control_residuals(controlnet, sample, t, encoder_hidden_states=context, added_cond_kwargs=added,
                             hint=hint, cond_or_uncond=[1, 1], strength=0.7) is None
