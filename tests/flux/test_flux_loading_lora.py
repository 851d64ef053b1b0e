"""FLUX.1 LoRAs (issue 17): kohya (BFL module names, fused qkv, alpha) and diffusers/PEFT layouts merge
into the tiny model's weights as the LoRA formula says, unmerge restores them bit for bit, pickles are
refused, and a LoRA for another model is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.core.errors import UnsafeFile
from engine.flux.loading import bfl_to_diffusers, diffusers_to_bfl
from engine.flux.lora import (
    MAX_UNMATCHED_KEYS,
    load_flux_lora,
    match_flux_lora,
    merge_flux_loras,
    unmerge_flux_loras,
)
from tests.flux.tiny import build_tiny, tiny_configs

RANK = 4
#: Merged weights are compared bit for bit: the expected value is the same float32 operations in the same
#: order (weight + (strength * scale) * (up @ down)); splitting kohya's fused up-projection into q/k/v rows
#: does not change any element's sum (each output element is the same rank-long dot product).


def _pair(generator: torch.Generator, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, RANK, generator=generator) * 0.3, torch.randn(RANK, inp, generator=generator) * 0.3


@pytest.fixture()
def model() -> dict[str, torch.nn.Module]:
    return build_tiny("dev", seed=3)


def test_kohya_lora_with_fused_qkv_and_alpha_merges_as_the_formula_says(model: dict, tmp_path: Path) -> None:
    config = tiny_configs("dev")["transformer"]
    bfl = diffusers_to_bfl(model["transformer"].state_dict(), config)
    generator = torch.Generator().manual_seed(0)
    alpha, strength = 2.0, 0.7
    lora, expected_bfl = {}, dict(bfl)
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1",
                   "single_blocks.0.linear2"):
        weight = bfl[module + ".weight"]
        up, down = _pair(generator, *weight.shape)
        kohya = "lora_unet_" + module.replace(".", "_")
        lora |= {f"{kohya}.lora_up.weight": up, f"{kohya}.lora_down.weight": down, f"{kohya}.alpha": torch.tensor(alpha)}
        expected_bfl[module + ".weight"] = weight + (strength * (alpha / RANK)) * (up @ down)
    clip_weight = dict(model["text_encoder"].named_parameters())["encoder.layers.0.mlp.fc1.weight"]
    up, down = _pair(generator, *clip_weight.shape)  # CLIP-L in kohya's transformers-4 naming, no alpha
    lora |= {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down}
    expected_clip = clip_weight.detach() + (strength * 1.0) * (up @ down)
    path = tmp_path / "kohya.safetensors"
    save_file(lora, path)

    match = match_flux_lora(load_flux_lora(path), model, name="kohya")
    assert not match.unmatched_keys and not match.skipped
    # qkv became three diffusers weights, linear1 four.
    assert ("transformer", "single_transformer_blocks.1.proj_mlp.weight") in match.deltas
    assert len(match.deltas) == 3 + 1 + 4 + 1 + 1
    before = {k: v.clone() for k, v in model["transformer"].state_dict().items()}
    merged = merge_flux_loras(model, [(match, strength)])
    expected = bfl_to_diffusers(expected_bfl, config)
    after = model["transformer"].state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert torch.equal(clip_weight, expected_clip)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {ref[1] for ref in match.deltas if ref[0] == "transformer"}
    unmerge_flux_loras(model, merged)
    assert all(torch.equal(v, before[k]) for k, v in model["transformer"].state_dict().items())


def test_diffusers_layout_lora_on_transformer_and_clip_merges(model: dict, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    transformer = dict(model["transformer"].named_parameters())
    clip = dict(model["text_encoder"].named_parameters())
    targets = {"transformer.transformer_blocks.0.attn.to_q": transformer["transformer_blocks.0.attn.to_q.weight"],
               "transformer.single_transformer_blocks.0.proj_out":
                   transformer["single_transformer_blocks.0.proj_out.weight"],
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
                   clip["encoder.layers.0.self_attn.q_proj.weight"]}
    lora, expected = {}, {}
    for module, weight in targets.items():
        up, down = _pair(generator, *weight.shape)
        lora |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
        scale = 1.0  # no alpha: scale 1
        if module.endswith("to_q"):  # a PEFT alpha: scale alpha / rank
            lora[f"{module}.alpha"] = torch.tensor(2.0)
            scale = 2.0 / RANK
        expected[module] = weight.detach() + (1.5 * scale) * (up @ down)
    path = tmp_path / "diffusers_lora.safetensors"
    save_file(lora, path)
    match = match_flux_lora(load_flux_lora(path), model, name="d")
    assert len(match.deltas) == 3 and not match.unmatched_keys
    merge_flux_loras(model, [(match, 1.5)])
    for module, weight in targets.items():
        assert torch.equal(weight, expected[module])


def test_a_lora_for_another_model_is_skipped_and_pickles_are_refused(model: dict, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    lora = {}
    for i in range(MAX_UNMATCHED_KEYS):  # SDXL UNet module names: nothing in a Flux transformer
        module = f"transformer.down_blocks.{i}.attentions.0.proj_in"
        up, down = _pair(generator, 8, 8)
        lora |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(lora, path)
    match = match_flux_lora(load_flux_lora(path), model, name="sdxl")
    assert match.skipped and not match.deltas
    before = {k: v.clone() for k, v in model["transformer"].state_dict().items()}
    assert merge_flux_loras(model, [(match, 1.0)]).originals == {}
    assert all(torch.equal(v, before[k]) for k, v in model["transformer"].state_dict().items())
    pickle = tmp_path / "lora.safetensors"
    pickle.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(UnsafeFile):
        load_flux_lora(pickle)


def test_a_merge_that_fails_half_way_leaves_the_weights_as_they_were(model: dict) -> None:
    from engine.flux.lora import FluxLoraMatch, LoraDelta

    params = dict(model["transformer"].named_parameters())
    first, second = "x_embedder.weight", "context_embedder.weight"
    generator = torch.Generator().manual_seed(4)
    good = LoraDelta(*_pair(generator, *params[first].shape), scale=1.0)
    up, down = _pair(generator, *params[second].shape)
    broken = LoraDelta(up=up, down=down[:, :-1], scale=1.0)  # up @ down has the wrong width: fails in the merge
    match = FluxLoraMatch(name="half", deltas={("transformer", first): good, ("transformer", second): broken})
    before = {k: v.clone() for k, v in model["transformer"].state_dict().items()}
    with pytest.raises(RuntimeError):
        merge_flux_loras(model, [(match, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in model["transformer"].state_dict().items())
