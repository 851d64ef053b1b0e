"""``hooocus setup --only flux-schnell`` (issue 17): an optional, fully pinned group whose files land where
``load_flux`` is pointed at them, in the layouts the loader reads (checked with the tiny model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def test_the_installed_layout_loads(tmp_path: Path) -> None:
    """The tiny model written where set-up puts each file, in the same formats (BFL transformer, clip_l
    and t5xxl ComfyUI files, LDM ae, tokenizer files) loads exactly through flux_schnell_paths."""
    modules = build_tiny("schnell", seed=4)
    paths = flux_schnell_paths(tmp_path)
    for key in ("transformer", "clip_path", "t5_path", "vae_path"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    metadata = {"hooocus.configs": json.dumps(tiny_configs("schnell"))}
    contig = lambda state: {k: v.contiguous() for k, v in state.items()}  # noqa: E731
    save_file(contig(bfl_transformer_state(modules, "schnell")), paths["transformer"], metadata=metadata)
    save_file(clip_file_state(modules), paths["clip_path"], metadata=metadata)
    save_file(t5_file_state(modules), paths["t5_path"], metadata=metadata)
    save_file(contig(vae_ldm_state(modules, "schnell")), paths["vae_path"], metadata=metadata)
    clip, t5 = build_tokenizers()
    clip.save_pretrained(paths["tokenizer_dir"] / "tokenizer")
    t5.save_pretrained(paths["tokenizer_dir"] / "tokenizer_2")
    assert not (paths["tokenizer_dir"] / "tokenizer_2" / "spiece.model").exists()  # tokenizer.json suffices

    assert inspect_weights(paths["transformer"]).variant == "schnell"
    transformer = paths.pop("transformer")
    loaded = load_flux(transformer, **paths)
    assert_same_weights(loaded, modules)
    assert loaded.tokenizer_2("a cat").input_ids[-1] == t5.eos_token_id
    assert torch.is_tensor(loaded.text_encoder_2.shared.weight)
