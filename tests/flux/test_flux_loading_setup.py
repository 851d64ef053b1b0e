"""``hooocus setup --only flux-schnell`` (issue 17): an optional, fully pinned group whose files land where
``load_flux`` is pointed at them, in the layouts the loader reads (checked with the tiny model)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.core.errors import AssetsMissing
from engine.core.settings import Settings
from engine.flux.loading import load_flux
from engine.io.family import inspect_weights
from engine.io.setup import (
    ALL_ASSETS,
    DEFAULT_ASSETS,
    FLUX_SCHNELL_ASSETS,
    FLUX_SCHNELL_GROUP,
    flux_schnell_paths,
    select_assets,
)
from tests.flux.test_flux_loading import assert_same_weights
from tests.flux.tiny import (
    bfl_transformer_state,
    build_tiny,
    build_tokenizers,
    clip_file_state,
    t5_file_state,
    tiny_configs,
    vae_ldm_state,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_flux_schnell_is_an_optional_fully_pinned_group() -> None:
    assert select_assets(ALL_ASSETS, [FLUX_SCHNELL_GROUP]) == list(FLUX_SCHNELL_ASSETS)
    assert not set(FLUX_SCHNELL_ASSETS) & set(select_assets(ALL_ASSETS, None)) and set(DEFAULT_ASSETS).isdisjoint(
        FLUX_SCHNELL_ASSETS)
    for asset in FLUX_SCHNELL_ASSETS:
        assert asset.optional and asset.convert is None, asset.name  # safetensors / JSON only, nothing to unpickle
        assert asset.sha256 is not None and _HEX64.match(asset.sha256), asset.name
        assert asset.url.startswith("https://") and "FLUX.1-dev" not in asset.url  # [dev] is never fetched
        assert asset.size_bytes and asset.size_bytes > 0
    # Every part load_flux needs is in the group.
    dests = {Path(a.dest) for a in FLUX_SCHNELL_ASSETS}
    paths = flux_schnell_paths(Path("."))
    for key in ("transformer", "clip_path", "t5_path", "vae_path"):
        assert paths[key] in dests, key
    for sub, name in (("tokenizer", "vocab.json"), ("tokenizer", "merges.txt"), ("tokenizer_2", "tokenizer.json")):
        assert paths["tokenizer_dir"] / sub / name in dests


def write_layout(modules: dict, paths: dict[str, Path]) -> None:
    """The tiny model in the formats set-up installs (BFL transformer, clip_l and t5xxl ComfyUI files, LDM
    ae, tokenizer files), at ``paths`` (keys as :func:`flux_schnell_paths`)."""
    for key in ("transformer", "clip_path", "t5_path", "vae_path"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    metadata = {"hooocus.configs": json.dumps(tiny_configs("schnell"))}
    save_file(_contiguous(bfl_transformer_state(modules, "schnell")), paths["transformer"], metadata=metadata)
    save_file(clip_file_state(modules), paths["clip_path"], metadata=metadata)
    save_file(t5_file_state(modules), paths["t5_path"], metadata=metadata)
    save_file(_contiguous(vae_ldm_state(modules, "schnell")), paths["vae_path"], metadata=metadata)
    clip, t5 = build_tokenizers()
    clip.save_pretrained(paths["tokenizer_dir"] / "tokenizer")
    t5.save_pretrained(paths["tokenizer_dir"] / "tokenizer_2")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}


def test_the_installed_layout_loads(tmp_path: Path) -> None:
    """Written where set-up puts each file, in the same formats, the tiny model loads exactly, whether
    the paths are passed or found from the settings' data folder (what the runtime does)."""
    modules = build_tiny("schnell", seed=4)
    paths = flux_schnell_paths(tmp_path)
    write_layout(modules, paths)
    assert not (paths["tokenizer_dir"] / "tokenizer_2" / "spiece.model").exists()  # tokenizer.json suffices
    assert inspect_weights(paths["transformer"]).variant == "schnell"
    transformer = paths.pop("transformer")
    loaded = load_flux(transformer, **paths)
    assert_same_weights(loaded, modules)
    assert loaded.tokenizer_2("a cat").input_ids[-1] == loaded.tokenizer_2.eos_token_id
    assert_same_weights(load_flux(transformer, settings=Settings(data_dir=tmp_path)), modules)
    alone = tmp_path / "elsewhere" / "models" / "unet" / "flux.safetensors"  # no encoders anywhere near it
    alone.parent.mkdir(parents=True)
    shutil.copy(transformer, alone)
    with pytest.raises(AssetsMissing, match="clip_path, t5_path, vae_path"):
        load_flux(alone, settings=Settings(data_dir=tmp_path / "empty"), tokenizer_dir=paths["tokenizer_dir"])


def test_a_transformer_in_a_comfyui_tree_finds_its_encoders(tmp_path: Path) -> None:
    modules = build_tiny("schnell", seed=5)
    models = tmp_path / "ComfyUI" / "models"
    paths = {"transformer": models / "diffusion_models" / "my-flux.safetensors",
             "clip_path": models / "clip" / "clip_l.safetensors",
             "t5_path": models / "text_encoders" / "t5xxl_fp16.safetensors",
             "vae_path": models / "vae" / "ae.safetensors", "tokenizer_dir": tmp_path / "tok"}
    write_layout(modules, paths)
    loaded = load_flux(paths["transformer"], settings=Settings(data_dir=tmp_path / "data"),
                       tokenizer_dir=paths["tokenizer_dir"])
    assert_same_weights(loaded, modules)
