"""Model folders (reliability matrix rows 21-22): listing, name resolution, traversal refusal."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from engine.core.errors import UnknownLora, UnknownModel
from engine.io.registry import ModelRegistry, detect_checkpoint_kind, is_plain_name
from tests.paths import sdxl_base_keys_file

SDXL_BASE_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
                  "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                  "conditioner.embedders.1.model.ln_final.weight", "first_stage_model.decoder.conv_in.weight"]
SDXL_REFINER_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight",
                     "first_stage_model.decoder.conv_in.weight"]
SD15_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
             "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
LORA_KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]


def write(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    return path


class TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    """Two checkpoint folders (the first wins on equal names), a LoRA folder and a secret outside."""
    first, second, loras = tmp_path / "models" / "checkpoints", tmp_path / "fooocus" / "checkpoints", tmp_path / "loras"
    write(first / "juggernautXL.safetensors", SDXL_BASE_KEYS)
    write(first / "SDXL" / "refiner_1.0.safetensors", SDXL_REFINER_KEYS)
    write(first / "SD15" / "old.safetensors", SD15_KEYS)
    write(first / "dup.safetensors", SDXL_BASE_KEYS)
    (first / "pickled.safetensors").write_bytes(pickle.dumps(TouchOnUnpickle(tmp_path / "marker")))
    (first / "classic.ckpt").write_bytes(pickle.dumps(TouchOnUnpickle(tmp_path / "marker")))
    (first / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    diffusers = first / "my-sdxl"
    (diffusers / "unet").mkdir(parents=True)
    (diffusers / "model_index.json").write_text(json.dumps({"text_encoder": ["transformers", "CLIPTextModel"]}))
    write(diffusers / "unet" / "diffusion_pytorch_model.safetensors", ["conv_in.weight"])
    write(second / "dup.safetensors", SD15_KEYS)
    write(second / "other" / "dup.safetensors", SDXL_BASE_KEYS)
    write(second / "extra.safetensors", SDXL_BASE_KEYS)
    write(loras / "offset.safetensors", LORA_KEYS)
    secret = write(tmp_path / "secret.safetensors", SDXL_BASE_KEYS)
    return {"first": first, "second": second, "loras": loras, "secret": secret, "root": tmp_path}


def registry_for(models: dict[str, Path]) -> ModelRegistry:
    return ModelRegistry({"checkpoints": [models["first"], models["second"], models["root"] / "absent"],
                          "loras": [models["loras"]]})


def test_list_shows_usable_and_unusable_entries_with_reasons(models: dict[str, Path]) -> None:
    entries = {e.name: e for e in registry_for(models).list("checkpoints")}
    assert set(entries) == {"juggernautXL.safetensors", "SDXL/refiner_1.0.safetensors", "SD15/old.safetensors",
                            "dup.safetensors", "pickled.safetensors", "broken.safetensors", "my-sdxl",
                            "other/dup.safetensors", "extra.safetensors"}  # no .ckpt, no files of my-sdxl
    assert entries["juggernautXL.safetensors"].usable and entries["juggernautXL.safetensors"].architecture == "sdxl_base"
    assert entries["SDXL/refiner_1.0.safetensors"].architecture == "sdxl_refiner"
    assert entries["my-sdxl"].usable and entries["my-sdxl"].architecture == "sdxl_base"
    assert entries["dup.safetensors"].path.parent == models["first"]  # the first folder wins
    for name, word in [("SD15/old.safetensors", "SD 1.5"), ("pickled.safetensors", "pickle"),
                       ("broken.safetensors", "")]:
        assert not entries[name].usable and word in (entries[name].reason or "-")
    assert entries["juggernautXL.safetensors"].size_bytes == (models["first"] / "juggernautXL.safetensors").stat().st_size
    assert not (models["root"] / "marker").exists()


@pytest.mark.parametrize(("name", "expected"), [
    ("juggernautXL.safetensors", "juggernautXL.safetensors"),
    ("juggernautXL", "juggernautXL.safetensors"),
    ("SDXL/refiner_1.0.safetensors", "SDXL/refiner_1.0.safetensors"),
    ("SDXL/refiner_1.0", "SDXL/refiner_1.0.safetensors"),
    ("refiner_1.0.safetensors", "SDXL/refiner_1.0.safetensors"),
    ("refiner_1.0", "SDXL/refiner_1.0.safetensors"),
    ("dup", "dup.safetensors"),  # the exact relative name beats the equal file name in other/
    ("my-sdxl", "my-sdxl"),
])
def test_resolve_accepts_names_paths_and_stems(models: dict[str, Path], name: str, expected: str) -> None:
    path = registry_for(models).resolve("checkpoints", name)
    assert path == (models["first"] / expected).resolve() or path == models["first"].resolve() / expected


@pytest.mark.parametrize("name", [
    "../secret.safetensors", "../secret", "/etc/passwd", str(Path("/etc/passwd")), "a/../../secret.safetensors",
    "..\\secret.safetensors", "%2e%2e/secret.safetensors", "%2E%2E%2Fsecret", "juggernaut\x00XL.safetensors",
    "juggernautXL.safetensors/", "./juggernautXL.safetensors", "SDXL//refiner_1.0", "~/secret", "C:/secret",
    "classic.ckpt", "classic", "", "x" * 600, "nothere",
])
def test_traversal_and_unknown_names_are_unknown_model(models: dict[str, Path], name: str) -> None:
    with pytest.raises(UnknownModel) as err:
        registry_for(models).resolve("checkpoints", name)
    assert err.value.message.startswith("unknown model ")
    assert "available: " in err.value.message and "juggernautXL.safetensors" in err.value.message
    assert str(models["root"]) not in err.value.message  # no paths leak


def test_error_text_does_not_tell_whether_a_file_exists_outside(models: dict[str, Path]) -> None:
    registry = registry_for(models)
    messages = []
    for name in ("../secret.safetensors", "../absent.safetensors"):
        with pytest.raises(UnknownModel) as err:
            registry.resolve("checkpoints", name)
        messages.append(err.value.message.replace(repr(name), "NAME"))
    assert messages[0] == messages[1]


def test_symlink_escaping_the_folder_is_refused(models: dict[str, Path]) -> None:
    (models["first"] / "escape.safetensors").symlink_to(models["secret"])
    (models["first"] / "linkdir").symlink_to(models["root"], target_is_directory=True)
    (models["first"] / "inside.safetensors").symlink_to(models["first"] / "juggernautXL.safetensors")
    registry = registry_for(models)
    names = {e.name for e in registry.list("checkpoints")}
    assert "escape.safetensors" not in names and not any(n.startswith("linkdir") for n in names)
    for name in ("escape.safetensors", "escape", "linkdir/secret.safetensors"):
        with pytest.raises(UnknownModel):
            registry.resolve("checkpoints", name)
    assert registry.resolve("checkpoints", "inside").name == "inside.safetensors"  # links inside are fine


def test_symlink_swapped_after_listing_is_refused(models: dict[str, Path]) -> None:
    link = models["first"] / "swap.safetensors"
    link.symlink_to(models["first"] / "juggernautXL.safetensors")
    registry = registry_for(models)
    assert registry.resolve("checkpoints", "swap").name == "swap.safetensors"
    link.unlink()
    link.symlink_to(models["secret"])
    with pytest.raises(UnknownModel):
        registry.resolve("checkpoints", "swap")


def test_ambiguous_short_name_and_new_files(models: dict[str, Path]) -> None:
    registry = registry_for(models)
    write(models["second"] / "a" / "same.safetensors", SDXL_BASE_KEYS)
    write(models["second"] / "b" / "same.safetensors", SDXL_BASE_KEYS)
    with pytest.raises(UnknownModel):
        registry.resolve("checkpoints", "same")  # two files: a short form must not pick one
    assert registry.resolve("checkpoints", "a/same").parent.name == "a"
    write(models["first"] / "late.safetensors", SDXL_BASE_KEYS)  # added after the first scan
    assert registry.resolve("checkpoints", "late").name == "late.safetensors"


def test_loras_and_kinds(models: dict[str, Path]) -> None:
    registry = registry_for(models)
    assert [e.name for e in registry.list("loras")] == ["offset.safetensors"]
    assert registry.resolve("loras", "offset").name == "offset.safetensors"
    with pytest.raises(UnknownLora) as err:
        registry.resolve("loras", "../secret")
    assert err.value.code == "unknown_lora"
    assert registry.list("vae") == []
    with pytest.raises(ValueError):
        registry.list("models")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModelRegistry({"weights": []})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_name_resolves_inside_or_is_unknown(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    root = tmp_path_factory.getbasetemp() / "fuzz-models"
    folder = root / "checkpoints"
    if not folder.exists():
        write(folder / "m.safetensors", SDXL_BASE_KEYS)
        write(root / "outside.safetensors", SDXL_BASE_KEYS)
    registry = ModelRegistry({"checkpoints": [folder]})
    try:
        path = registry.resolve("checkpoints", name)
    except UnknownModel:
        return
    assert path.resolve().is_relative_to(folder.resolve()) and is_plain_name(name)


def test_detect_checkpoint_kind() -> None:
    assert detect_checkpoint_kind(SDXL_BASE_KEYS) == "sdxl_base"
    assert detect_checkpoint_kind(SDXL_REFINER_KEYS) == "sdxl_refiner"
    assert detect_checkpoint_kind(SD15_KEYS) == "sd15"
    assert detect_checkpoint_kind(LORA_KEYS) == "unknown"
    assert detect_checkpoint_kind(SDXL_BASE_KEYS[1:]) == "unknown"  # no UNet
    assert detect_checkpoint_kind([]) == "unknown"


def test_detect_real_sdxl_key_list() -> None:
    keys = [key for key, _shape, _dtype in json.loads(sdxl_base_keys_file().read_text())]
    assert detect_checkpoint_kind(keys) == "sdxl_base"
    # The refiner layout: no CLIP-L, bigG moved to embedders.0.
    refiner = [k.replace("conditioner.embedders.1.", "conditioner.embedders.0.") for k in keys
               if not k.startswith("conditioner.embedders.0.")]
    assert detect_checkpoint_kind(refiner) == "sdxl_refiner"


def test_from_settings_and_hashes(tmp_path: Path) -> None:
    import hashlib

    from engine.core.settings import Settings
    from engine.io.registry import registry_from_settings

    extra = tmp_path / "a1111" / "Stable-diffusion"
    path = write(extra / "x.safetensors", SDXL_BASE_KEYS)
    own = write(tmp_path / "data" / "models" / "checkpoints" / "x.safetensors", SD15_KEYS)
    registry = registry_from_settings(Settings(data_dir=tmp_path / "data", checkpoint_dirs=(extra,)))
    assert registry.resolve("checkpoints", "x") == own.resolve() or registry.resolve("checkpoints", "x") == own
    assert registry.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "data" / "cache" / "sha256_cache.json").is_file()
    assert registry.sha256(tmp_path) is None
