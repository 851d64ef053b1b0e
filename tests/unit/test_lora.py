"""Unit: LoRA loading, key matching (kohya LDM/diffusers, PEFT, text encoders), merge and unmerge (spec §11.1)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.core.errors import ModelInvalid, UnsafeFile
from engine.sdxl.models.lora import (
    MAX_UNMATCHED_KEYS,
    LoraFile,
    LoraMatch,
    load_lora,
    match_lora,
    merge_loras,
    text_encoder_lora_key_map,
    unet_lora_key_map,
    unmerge_loras,
)
from engine.sdxl.models.patching import DiffPatch
from tests.paths import sdxl_configs_dir

RANK = 4
ALPHA = 2.0

# Real kohya names (SGM/LDM UNet naming, as sd-scripts writes them for SDXL) -> diffusers module.
# The layout of the tiny UNet below repeats SDXL's first two levels, so these are SDXL's own indices.
LITERAL_KOHYA_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k":
        ("unet", "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k"),
    "lora_unet_input_blocks_4_1_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
    "lora_unet_input_blocks_3_0_op": ("unet", "down_blocks.0.downsamplers.0.conv"),
    "lora_unet_input_blocks_4_0_emb_layers_1": ("unet", "down_blocks.1.resnets.0.time_emb_proj"),
    "lora_unet_input_blocks_4_0_skip_connection": ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj":
        ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    "lora_unet_middle_block_2_out_layers_3": ("unet", "mid_block.resnets.1.conv2"),
    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0":
        ("unet", "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_out.0"),
    "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
    "lora_unet_output_blocks_3_0_skip_connection": ("unet", "up_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_time_embed_0": ("unet", "time_embedding.linear_1"),
    "lora_unet_label_emb_0_2": ("unet", "add_embedding.linear_2"),
    "lora_unet_input_blocks_0_0": ("unet", "conv_in"),
    "lora_unet_out_2": ("unet", "conv_out"),
    # diffusers-named kohya (SD1.5-era trainers) and PEFT / old diffusers spellings.
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"),
    "unet.up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2":
        ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
    "lora_te2_text_projection": ("text_encoder_2", "text_projection"),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj":
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj"),
}


def _tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        use_linear_projection=True, norm_num_groups=32).eval()


def _tiny_text_encoders() -> tuple[nn.Module, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(1)
    return CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()


@pytest.fixture()
def models() -> dict[str, nn.Module]:
    text_encoder, text_encoder_2 = _tiny_text_encoders()
    return {"unet": _tiny_unet(), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


def _module(models: dict[str, nn.Module], component: str, module: str) -> nn.Module:
    return models[component].get_submodule(module)


def _lora_pair(layer: nn.Module, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (up, down) for a Linear or a Conv2d (LoCon: down carries the kernel, up is 1×1)."""
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=gen)
        up = torch.randn(layer.out_channels, RANK, 1, 1, generator=gen)
    else:
        down = torch.randn(RANK, layer.in_features, generator=gen)
        up = torch.randn(layer.out_features, RANK, generator=gen)
    return up * 0.1, down * 0.1


def _expected_lora_weight(layer: nn.Module, original: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """The merged weight, written as the layer's function so the reshape is checked too."""
    if isinstance(layer, nn.Conv2d):
        # conv(x, W + ΔW) = conv(x, W) + conv(conv(x, down), up): ΔW[o, i] = Σ_r up[o, r] · down[r, i]
        delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    else:
        delta = torch.einsum("or,ri->oi", up, down)
    return original + scale * delta


def _kohya_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module -> its LDM kohya name, from our own map (Linear and Conv2d layers only)."""
    names: dict[str, str] = {}
    for key, (_component, module) in unet_lora_key_map(unet).items():
        layer = unet.get_submodule(module)
        if (isinstance(layer, (nn.Linear, nn.Conv2d)) and key.startswith("lora_unet_")
                and key != f"lora_unet_{module.replace('.', '_')}"):
            names[module] = key
    return names


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_literal_kohya_and_diffusers_names_map_to_the_right_layers(models: dict[str, nn.Module]) -> None:
    key_map = unet_lora_key_map(models["unet"])
    key_map.update(text_encoder_lora_key_map(models["text_encoder"], "text_encoder"))
    key_map.update(text_encoder_lora_key_map(models["text_encoder_2"], "text_encoder_2"))
    for lora_name, target in LITERAL_KOHYA_NAMES.items():
        assert key_map.get(lora_name) == target, lora_name


def test_generated_kohya_lora_merges_every_layer_exactly(models: dict[str, nn.Module], tmp_path: Path) -> None:
    unet = models["unet"]
    ldm_names = _kohya_ldm_names(unet)
    # Every Linear/Conv2d of the UNet, top-level ones included, has an LDM (kohya SDXL) name.
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert set(ldm_names) == set(layers)
    gen = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, kohya in ldm_names.items():
        up, down = _lora_pair(unet.get_submodule(module), gen)
        pairs[module] = (up, down)
        tensors.update({f"{kohya}.lora_up.weight": up, f"{kohya}.lora_down.weight": down,
                        f"{kohya}.alpha": torch.tensor(ALPHA)})
    lora = load_lora(_write(tmp_path / "kohya_all.safetensors", tensors))
    match = match_lora(lora, unet, [models["text_encoder"], models["text_encoder_2"]])
    assert match.unmatched_count == 0 and not match.skipped and match.warning is None
    assert len(match.patches) == len(layers)

    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    merged = merge_loras(models, [(match, 0.8)])
    after = dict(unet.named_parameters())
    for module, (up, down) in pairs.items():
        layer = unet.get_submodule(module)
        expected = _expected_lora_weight(layer, before[f"{module}.weight"], up, down, 0.8 * ALPHA / RANK)
        torch.testing.assert_close(after[f"{module}.weight"].detach(), expected, atol=1e-6, rtol=1e-5)
    touched = {f"{m}.weight" for m in pairs}
    for name, value in before.items():
        if name not in touched:
            assert torch.equal(after[name], value), name
    assert set(merged.originals) == {("unet", name) for name in touched}
    assert all(t.device.type == "cpu" for t in merged.originals.values())

    merged.restore(models)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not merged.originals


def test_literal_names_merge_through_files(models: dict[str, nn.Module], tmp_path: Path) -> None:
    """kohya, diffusers and PEFT spellings in one file; text encoders included; no alpha -> no scaling."""
    gen = torch.Generator().manual_seed(4)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for lora_name, (component, module) in LITERAL_KOHYA_NAMES.items():
        layer = _module(models, component, module)
        up, down = _lora_pair(layer, gen)
        original = layer.weight.detach().clone()
        if lora_name.startswith(("unet.", "text_encoder")):
            tensors.update({f"{lora_name}.lora_B.weight": up, f"{lora_name}.lora_A.weight": down})
            expected[(component, module)] = _expected_lora_weight(layer, original, up, down, 1.5)
        else:
            tensors.update({f"{lora_name}.lora_up.weight": up, f"{lora_name}.lora_down.weight": down,
                            f"{lora_name}.alpha": torch.tensor(ALPHA, dtype=torch.float16)})
            expected[(component, module)] = _expected_lora_weight(layer, original, up, down, 1.5 * ALPHA / RANK)
    match = match_lora(load_lora(_write(tmp_path / "literal.safetensors", tensors)),
                       models["unet"], [models["text_encoder"], models["text_encoder_2"]])
    assert match.unmatched_count == 0
    merge_loras(models, [(match, 1.5)])
    for (component, module), weight in expected.items():
        torch.testing.assert_close(_module(models, component, module).weight.detach(), weight,
                                   atol=1e-6, rtol=1e-5)


def test_legacy_diffusers_processor_keys(models: dict[str, nn.Module]) -> None:
    base = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    tensors = {f"{base}.to_q_lora.up.weight": torch.ones(64, 2), f"{base}.to_q_lora.down.weight": torch.ones(2, 64),
               f"{base}.to_out_lora.up.weight": torch.ones(64, 2),
               f"{base}.to_out_lora.down.weight": torch.ones(2, 64),
               f"{te}.to_k_lora.up.weight": torch.ones(32, 2), f"{te}.to_k_lora.down.weight": torch.ones(2, 32)}
    match = match_lora(LoraFile("legacy", tensors), models["unet"], [models["text_encoder"]])
    assert match.unmatched_count == 0
    assert set(match.patches) == {
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"),
        ("text_encoder", "encoder.layers.0.self_attn.k_proj.weight")}


@pytest.mark.parametrize(("junk_keys", "skipped"), [(MAX_UNMATCHED_KEYS, False), (MAX_UNMATCHED_KEYS + 1, True)])
def test_more_than_12_unmatched_keys_skips_the_file(models: dict[str, nn.Module], junk_keys: int,
                                                    skipped: bool) -> None:
    name = "lora_unet_input_blocks_4_1_proj_in"
    tensors = {f"{name}.lora_up.weight": torch.ones(64, RANK), f"{name}.lora_down.weight": torch.ones(RANK, 64)}
    tensors.update({f"lora_unet_no_such_layer_{i}.lora_up.weight": torch.ones(1, 1) for i in range(junk_keys)})
    match = match_lora(LoraFile("mixed", tensors), models["unet"], [])
    assert match.unmatched_count == junk_keys
    assert match.skipped is skipped
    assert (match.warning is not None) is skipped
    layer = _module(models, "unet", "down_blocks.1.attentions.0.proj_in")
    before = layer.weight.detach().clone()
    merge_loras(models, [(match, 1.0)])
    assert torch.equal(layer.weight, before) is skipped


def test_missing_text_encoder_counts_its_keys_as_unmatched(models: dict[str, nn.Module]) -> None:
    tensors = {f"lora_te2_text_model_encoder_layers_{i % 2}_mlp_fc{1 + i // 2}.{part}": torch.ones(1)
               for i in range(4) for part in ("lora_up.weight", "lora_down.weight", "alpha")}
    with_te = match_lora(LoraFile("te", tensors), models["unet"], [models["text_encoder"], models["text_encoder_2"]])
    without_te = match_lora(LoraFile("te", tensors), models["unet"], [models["text_encoder"], None])
    assert without_te.unmatched_count == 12 and not without_te.skipped
    # The names matched with the encoder present, but ones-shaped tensors do not fit: not merged.
    assert with_te.unmatched_count == 0 and len(with_te.shape_mismatched) == 4 and not with_te.patches


def test_several_loras_sum_and_zero_strength_is_ignored(models: dict[str, nn.Module]) -> None:
    name = "lora_unet_input_blocks_4_1_proj_in"
    layer = _module(models, "unet", "down_blocks.1.attentions.0.proj_in")
    original = layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(5)
    (up_a, down_a), (up_b, down_b) = _lora_pair(layer, gen), _lora_pair(layer, gen)
    first = match_lora(LoraFile("a", {f"{name}.lora_up.weight": up_a, f"{name}.lora_down.weight": down_a}),
                       models["unet"])
    second = match_lora(LoraFile("b", {f"{name}.lora_up.weight": up_b, f"{name}.lora_down.weight": down_b,
                                       f"{name}.alpha": torch.tensor(8.0)}), models["unet"])
    merged = merge_loras(models, [(first, 0.5), (second, -1.0), (first, 0.0)])
    expected = original + 0.5 * (up_a @ down_a) - 1.0 * (8.0 / RANK) * (up_b @ down_b)
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=1e-5)
    unmerge_loras(models, merged)
    assert torch.equal(layer.weight, original)


def test_text_encoder_merge_changes_output_and_restore_undoes_it(models: dict[str, nn.Module]) -> None:
    te = models["text_encoder_2"]
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        plain = te(ids).text_embeds
    gen = torch.Generator().manual_seed(6)
    tensors = {}
    for kohya, module in (("lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
                           "text_model.encoder.layers.0.self_attn.v_proj"),
                          ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "text_model.encoder.layers.1.mlp.fc1")):
        up, down = _lora_pair(te.get_submodule(module), gen)
        tensors.update({f"{kohya}.lora_up.weight": up, f"{kohya}.lora_down.weight": down})
    match = match_lora(LoraFile("te2", tensors), None, [None, te])
    assert len(match.patches) == 2 and match.unmatched_count == 0
    merged = merge_loras({"text_encoder_2": te}, [(match, 1.0)])
    with torch.no_grad():
        assert (te(ids).text_embeds - plain).abs().max() > 1e-4
        merged.restore({"text_encoder_2": te})
        assert torch.equal(te(ids).text_embeds, plain)


def test_half_precision_weights_merge_in_float32(models: dict[str, nn.Module]) -> None:
    unet = models["unet"].half()
    layer = unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    original = layer.weight.detach().clone()
    up, down = torch.full((64, 1), 1e-3), torch.full((1, 64), 1.0)
    match = match_lora(LoraFile("fp16", {"lora_unet_input_blocks_4_1_proj_in.lora_up.weight": up,
                                         "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": down}), unet)
    merge_loras({"unet": unet}, [(match, 1.0)])
    assert layer.weight.dtype == torch.float16
    torch.testing.assert_close(layer.weight.detach(), (original.float() + 1e-3).half())


def test_load_lora_refuses_other_formats_and_corrupt_files(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    pickled = tmp_path / "evil.ckpt"
    pickled.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeFile):
        load_lora(pickled)
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeFile) as info:
        load_lora(renamed)
    assert info.value.code == "unsafe_file"
    assert not marker.exists()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weight file at all")
    with pytest.raises(ModelInvalid):
        load_lora(garbage)
    truncated = tmp_path / "cut.safetensors"
    _write(tmp_path / "ok.safetensors", {"a.lora_up.weight": torch.ones(4, 4)})
    truncated.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:-8])
    with pytest.raises(ModelInvalid):
        load_lora(truncated)
    with pytest.raises(ModelInvalid):
        load_lora(tmp_path / "missing.safetensors")
    assert load_lora(tmp_path / "ok.safetensors").name == "ok"


def test_ldm_names_agree_with_diffusers_converter_on_full_sdxl() -> None:
    """Independent check of the LDM index arithmetic on the real SDXL layout (meta device, no memory)."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    convert_blocks = getattr(conversion, "_maybe_map_sgm_blocks_to_diffusers", None)
    convert_key = getattr(conversion, "_convert_unet_lora_key", None)
    config_path = sdxl_configs_dir() / "base" / "unet" / "config.json"
    if convert_blocks is None or convert_key is None or not config_path.is_file():
        pytest.skip("diffusers' private converter or the SDXL config is not available")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_path.read_text()))
    checked = 0
    for key, (_component, module) in unet_lora_key_map(unet).items():
        is_ldm = key.startswith("lora_unet_") and key != f"lora_unet_{module.replace('.', '_')}"
        if not is_ldm or "layers_0" in key or key == "lora_unet_out_0":
            continue  # diffusers' converter does not map norm layers
        state = convert_blocks({f"{key}.lora_down.weight": 0}, unet.config)
        converted = convert_key(next(iter(state))).replace(".processor", "")
        converted = converted.removesuffix(".down.weight").removesuffix(".lora").removesuffix("_lora")
        converted = converted.replace("to_out_lora", "to_out.0")
        if converted.endswith(".to_out"):
            converted += ".0"
        assert converted == module, key
        checked += 1
    assert checked > 1000


def test_merge_leaves_a_weight_alone_when_its_patch_cannot_apply(models: dict[str, nn.Module]) -> None:
    """A hand-built match that bypassed match_lora's size check: that weight stays as it was."""
    ref = ("unet", "conv_in.weight")
    before = models["unet"].conv_in.weight.detach().clone()
    merged = merge_loras(models, [(LoraMatch("bad", {ref: (DiffPatch(torch.ones(3)),)}), 1.0)])
    assert torch.equal(models["unet"].conv_in.weight, before)
    assert not merged.originals
