"""Golden: the order of Fooocus's 70 patched attn2 layers (spec §12.4) against
refdata/weights/ip_adapter_attention.json ``patched_attn2_keys_in_order``.

The recorded ldm keys ``(block, index, transformer)``, in ``ip_index`` order, mapped to diffusers
processor names must be exactly the attn2 processors of a UNet built from the bundled SDXL base
config, in diffusers' registration order, which is the order the hook assigns ``ip_index`` in. The
UNet is built on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.sdxl.ip_adapter.hook import attn2_processor_names, ldm_attn2_to_diffusers
from engine.sdxl.models.configs import component_config

_ORDER_KEY = "patched_attn2_keys_in_order(ip_index = position)"


@pytest.fixture(scope="module")
def recorded_order(refdata: Path) -> list[tuple[str, int, int]]:
    data: dict[str, Any] = json.loads((refdata / "weights" / "ip_adapter_attention.json").read_text())
    order = [tuple(key) for key in data[_ORDER_KEY]]
    assert order, f"{_ORDER_KEY} is empty"
    return order  # type: ignore[return-value]


@pytest.fixture(scope="module")
def sdxl_unet() -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(component_config("base", "unet"))


def test_ip_index_order_is_diffusers_attn2_order(recorded_order: list[tuple[str, int, int]], sdxl_unet: Any) -> None:
    layers_per_block = sdxl_unet.config.layers_per_block
    mapped = [ldm_attn2_to_diffusers(b, i, t, layers_per_block=layers_per_block) for b, i, t in recorded_order]
    assert mapped == attn2_processor_names(sdxl_unet)


def test_non_attention_blocks_are_refused() -> None:
    for block, index in (("input", 0), ("input", 3), ("middle", 1), ("side", 0)):
        with pytest.raises(ValueError):
            ldm_attn2_to_diffusers(block, index, 0)
