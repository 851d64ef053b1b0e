"""FLUX.1 loading (issue 17): family detection from the header, the diffusers folder, BFL single files
with separate encoders and VAE, the ComfyUI all-in-one file, bundled configs, pickle refusal, and the
BFL <-> diffusers key mapping checked against diffusers' own converter at full size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.core.errors import AssetsMissing, ModelInvalid, UnknownModel, UnsafeFile
from engine.flux.components import FluxComponents
from engine.flux.configs import COMPONENTS, bundled_config
from engine.flux.loading import bfl_to_diffusers, detect_family, diffusers_to_bfl, load_flux
from engine.io.family import classify_keys, inspect_weights
from tests.flux.tiny import (
    build_tiny,
    save_all_in_one,
    save_bfl_files,
    save_diffusers_folder,
    save_tokenizers,
    tiny_configs,
)

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def assert_same_weights(loaded: FluxComponents, reference: dict[str, torch.nn.Module]) -> None:
    """Every tensor present on both sides, equal bit for bit, same dtype (no silent conversion)."""
    for part in PARTS:
        got, want = _state(getattr(loaded, part)), _state(reference[part])
        assert sorted(got) == sorted(want), part
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{part}.{key}"


# -- family detection ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["schnell", "dev"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    variant = request.param
    folder = tmp_path_factory.mktemp(f"flux-{variant}")
    modules = build_tiny(variant, seed=1 if variant == "dev" else 0)
    return {"variant": variant, "modules": modules,
            "folder": save_diffusers_folder(modules, folder / "diffusers", variant),
            "files": save_bfl_files(modules, folder / "bfl", variant),
            "aio": save_all_in_one(modules, folder / "flux-aio.safetensors", variant),
            "tokenizers": save_tokenizers(folder / "tok")}


def test_family_and_variant_come_from_the_header_of_each_layout(tiny: dict, tmp_path: Path) -> None:
    variant = tiny["variant"]
    assert inspect_weights(tiny["files"]["transformer"]).__dict__ == {
        "family": "flux", "variant": variant, "layout": "bfl", "prefix": ""}
    assert inspect_weights(tiny["aio"]).__dict__ == {
        "family": "flux", "variant": variant, "layout": "comfy_all_in_one", "prefix": "model.diffusion_model."}
    assert inspect_weights(tiny["folder"]).__dict__ == {
        "family": "flux", "variant": variant, "layout": "diffusers_folder", "prefix": None}
    saved = tiny["folder"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert inspect_weights(saved).__dict__ == {
        "family": "flux", "variant": variant, "layout": "diffusers_transformer", "prefix": ""}
    # The encoder and VAE files alone are no model.
    for part in ("clip", "t5", "vae"):
        assert detect_family(tiny["files"][part]) == "unknown"


def test_sdxl_and_other_files_are_told_apart_without_reading_tensors(tmp_path: Path) -> None:
    tensor = torch.zeros(1)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": tensor,
               "conditioner.embedders.0.transformer.text_model.x": tensor.clone()}, sdxl)
    assert detect_family(sdxl) == "sdxl"
    # SD3's MMDiT has transformer_blocks + x_embedder but no single_transformer_blocks: not Flux.
    sd3 = {"transformer_blocks.0.attn.to_q.weight", "x_embedder.proj.weight", "pos_embed.proj.weight"}
    assert classify_keys(sd3).family == "unknown"
    # The guidance embedder alone decides dev vs schnell.
    bfl = {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"}
    assert classify_keys(bfl).variant == "schnell"
    assert classify_keys(bfl | {"guidance_in.in_layer.weight"}).variant == "dev"
    pickle = tmp_path / "flux.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(UnsafeFile):
        detect_family(pickle)


# -- loading ------------------------------------------------------------------------------------


def test_diffusers_folder_loads_exactly(tiny: dict) -> None:
    loaded = load_flux(tiny["folder"])
    assert loaded.variant == tiny["variant"]
    assert loaded.scheduler_config["use_dynamic_shifting"] is (tiny["variant"] == "dev")
    assert_same_weights(loaded, tiny["modules"])
    assert loaded.tokenizer_2("a cat").input_ids[-1] == 1  # T5 appends </s>


def test_bfl_transformer_with_separate_encoder_and_vae_files_loads_exactly(tiny: dict) -> None:
    files = tiny["files"]
    loaded = load_flux(files["transformer"], clip_path=files["clip"], t5_path=files["t5"], vae_path=files["vae"],
                       tokenizer_dir=tiny["tokenizers"])
    assert loaded.variant == tiny["variant"] and loaded.name == files["transformer"].name
    assert_same_weights(loaded, tiny["modules"])


def test_comfy_all_in_one_file_loads_exactly(tiny: dict) -> None:
    loaded = load_flux(tiny["aio"], tokenizer_dir=tiny["tokenizers"])
    assert_same_weights(loaded, tiny["modules"])


def test_components_from_diffusers_subfolders_mix_with_a_single_file(tiny: dict) -> None:
    folder = tiny["folder"]
    loaded = load_flux(tiny["files"]["transformer"], clip_path=folder / "text_encoder",
                       t5_path=folder / "text_encoder_2", vae_path=folder / "vae", tokenizer_dir=folder)
    assert_same_weights(loaded, tiny["modules"])


def test_transformer_only_file_without_encoders_says_what_is_missing(tiny: dict) -> None:
    with pytest.raises(AssetsMissing, match="clip_path, t5_path, vae_path"):
        load_flux(tiny["files"]["transformer"], tokenizer_dir=tiny["tokenizers"])


def test_pickles_and_non_flux_weights_are_refused(tiny: dict, tmp_path: Path) -> None:
    pickle = tmp_path / "flux1-schnell.safetensors"
    pickle.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # a torch zip archive renamed .safetensors
    with pytest.raises(UnsafeFile):
        load_flux(pickle)
    renamed = tmp_path / "flux1-schnell.bin"
    renamed.write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFile):
        load_flux(renamed)
    with pytest.raises(ModelInvalid, match="not a FLUX.1"):
        load_flux(tiny["files"]["vae"])
    folder = tmp_path / "pickled"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFile, match="pickle"):
        load_flux(folder)


def test_a_config_that_does_not_fit_the_file_is_a_clear_error(tiny: dict, tmp_path: Path) -> None:
    """A file with more blocks than the config (a full-size config on a file of another depth, or the
    reverse) must not load half a model."""
    config_dir = tmp_path / "cfg"
    smaller = tiny_configs(tiny["variant"])
    smaller["transformer"]["num_single_layers"] = 1
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (config_dir / part).mkdir(parents=True)
        (config_dir / part / "config.json").write_text(json.dumps(smaller[part]))
    (config_dir / "scheduler").mkdir()
    (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(smaller["scheduler"]))
    with pytest.raises(ModelInvalid, match="single_blocks.1"):
        load_flux(tiny["aio"], tokenizer_dir=tiny["tokenizers"], config_dir=config_dir)


# -- bundled configs and the key mapping at full size -----------------------------------------


def test_bundled_configs_describe_flux1() -> None:
    schnell, dev = bundled_config("transformer", "schnell"), bundled_config("transformer", "dev")
    assert {k: v for k, v in schnell.items() if k != "guidance_embeds"} == {
        k: v for k, v in dev.items() if k != "guidance_embeds"}
    assert (schnell["guidance_embeds"], dev["guidance_embeds"]) == (False, True)
    assert bundled_config("scheduler", "schnell")["use_dynamic_shifting"] is False
    assert bundled_config("scheduler", "dev")["use_dynamic_shifting"] is True
    # The pieces must fit each other: T5 width feeds txt_in, CLIP's pooled width feeds vector_in,
    # 16 VAE latent channels packed 2x2 feed img_in, the rope axes tile one attention head.
    assert schnell["joint_attention_dim"] == bundled_config("text_encoder_2")["d_model"]
    assert schnell["pooled_projection_dim"] == bundled_config("text_encoder")["hidden_size"]
    assert schnell["in_channels"] == bundled_config("vae")["latent_channels"] * 4
    assert sum(schnell["axes_dims_rope"]) == schnell["attention_head_dim"]
    assert set(COMPONENTS) == {"transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"}


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_mapping_matches_diffusers_converter_on_full_size_shapes(variant: str) -> None:
    """diffusers' converter only handles the full-size width, so it is compared on meta tensors of the
    real FLUX.1 shapes: the same diffusers names with the same shapes, and every one of the model's
    parameters covered. (Values: the exact round trips above.)"""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = bundled_config("transformer", variant)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    reference = dict(model.state_dict())
    bfl = diffusers_to_bfl(reference, config)
    ours = bfl_to_diffusers(bfl, config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert sorted(ours) == sorted(theirs) == sorted(reference)
    assert all(ours[k].shape == theirs[k].shape == reference[k].shape for k in ours)
    # FLUX.1 has 19 double and 38 single blocks: check the BFL names hit the published layout.
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and "single_blocks.37.linear1.weight" in bfl
    assert ("guidance_in.in_layer.weight" in bfl) is (variant == "dev")


@pytest.mark.parametrize("guidance", [False, True])
def test_mapping_moves_the_same_values_as_diffusers_converter(guidance: bool) -> None:
    """The value check the meta comparison cannot make (which half of the final modulation is shift,
    in which order q, k, v, mlp are stacked): diffusers' converter splits BFL's fused tensors by row
    count only (3072 per projection, 12288 for the MLP), so small-width stand-ins with the full row
    counts go through both converters and must come out equal tensor for tensor."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from engine.flux.loading import transformer_key_rows

    config = {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 2, "num_single_layers": 2,
              "guidance_embeds": guidance}
    generator = torch.Generator().manual_seed(0)
    bfl = {}
    for key, names, _swap in transformer_key_rows(config):
        rows = 3 * 3072 + 12288 if len(names) == 4 else 3 * 3072 if len(names) == 3 else 6
        bfl[key] = torch.randn((rows, 2) if key.endswith("weight") else (rows,), generator=generator)
    ours = bfl_to_diffusers(bfl, config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(v, bfl[k]) for k, v in diffusers_to_bfl(ours, config).items())


# -- float8 storage -----------------------------------------------------------------------------


def _transformer_inputs(config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image_tokens, text_tokens = 16, 5
    inputs = {
        "hidden_states": torch.randn(1, image_tokens, config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, text_tokens, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                              indexing="ij"), -1).reshape(-1, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_float8_file_stays_float8_and_matches_the_upcast_once_model_exactly(variant: str, tmp_path: Path) -> None:
    """A float8_e4m3fn transformer file: kept in float8 with per-layer upcast, its output equals the
    same file upcast to float32 at load bit for bit. Why exact and not a tolerance: both compute every
    layer in float32 from the same float8 values (the hook casts the weight, then runs the same
    kernel), so there is no rounding difference to bound."""
    modules = build_tiny(variant, seed=2)  # type: ignore[arg-type]
    files = save_bfl_files(modules, tmp_path, variant, dtype=torch.float8_e4m3fn)  # type: ignore[arg-type]
    tokenizers = save_tokenizers(tmp_path / "tok")
    extra = {"clip_path": files["clip"], "t5_path": files["t5"], "vae_path": files["vae"], "tokenizer_dir": tokenizers}
    stored = load_flux(files["transformer"], **extra).transformer
    upcast = load_flux(files["transformer"], keep_float8=False, **extra).transformer

    linears = {n: m for n, m in stored.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears.values())
    # Modulation linears too (diffusers' own enable_layerwise_casting would skip every "*norm*" module).
    assert stored.transformer_blocks[0].norm1.linear.weight.dtype == torch.float8_e4m3fn
    assert stored.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32  # RMSNorm scale, upcast once
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    stored_bytes = sum(p.numel() * p.element_size() for p in stored.parameters())
    upcast_bytes = sum(p.numel() * p.element_size() for p in upcast.parameters())
    assert stored_bytes < 0.3 * upcast_bytes  # 1 byte instead of 4 for all but the norm scales

    inputs = _transformer_inputs(tiny_configs(variant)["transformer"])  # type: ignore[arg-type]
    with torch.no_grad():
        got = stored(**inputs, return_dict=False)[0]
        want = upcast(**inputs, return_dict=False)[0]
    assert torch.isfinite(want).all() and torch.equal(got, want)
    # The hooks put the weights back in float8 after each layer's forward.
    assert stored.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def _cache_repo(cache: Path, repo_id: str) -> Path:
    """An offline Hugging Face cache entry (refs/main -> snapshots/<commit>/), as the hub client lays it out."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_hf_cache_repo_ids_load_offline_with_cached_tokenizers(tiny: dict, tmp_path: Path) -> None:
    import shutil

    cache = tmp_path / "hub"
    shutil.copytree(tiny["folder"], _cache_repo(cache, "acme/tiny-flux"), dirs_exist_ok=True)
    loaded = load_flux("acme/tiny-flux", hf_cache_dir=cache)
    assert loaded.name == "acme/tiny-flux"
    assert_same_weights(loaded, tiny["modules"])
    # A single file from a cached repo; its tokenizers from a cached FLUX.1 repo (no tokenizer_dir).
    shutil.copy(tiny["aio"], _cache_repo(cache, "acme/tiny-aio") / "flux-aio.safetensors")
    shutil.copytree(tiny["tokenizers"], _cache_repo(cache, "black-forest-labs/FLUX.1-schnell"), dirs_exist_ok=True)
    loaded = load_flux("acme/tiny-aio/flux-aio.safetensors", hf_cache_dir=cache)
    assert_same_weights(loaded, tiny["modules"])
    with pytest.raises(UnknownModel):
        load_flux("acme/not-cached", hf_cache_dir=cache)
    with pytest.raises(UnknownModel):
        load_flux("acme/tiny-aio/../tiny-flux", hf_cache_dir=cache)


def test_model_folders_list_flux_files_as_flux_not_as_unrecognised(tiny: dict, tmp_path: Path) -> None:
    """`hooocus models` / the SDXL model list: a FLUX.1 file or folder in a checkpoints folder is named for
    what it is (and not offered as an SDXL base or refiner)."""
    import shutil

    from engine.io.registry import ModelRegistry

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(tiny["files"]["transformer"], folder / "flux1.safetensors")
    shutil.copy(tiny["aio"], folder / "aio.safetensors")
    shutil.copytree(tiny["folder"], folder / "flux-diffusers")
    entries = {e.name: e for e in ModelRegistry({"checkpoints": [folder]}).list("checkpoints")}
    want = f"flux_{tiny['variant']}"
    assert {name: e.architecture for name, e in entries.items()} == {
        "flux1.safetensors": want, "aio.safetensors": want, "flux-diffusers": want}
    assert all(not e.usable and f"FLUX.1 [{tiny['variant']}]" in (e.reason or "") for e in entries.values())
