"""Loading SDXL: demo model, diffusers folder, single-file checkpoint, HF cache, VAE override,
and the full-size single-file key mapping proven on the meta device."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from engine.core.errors import AssetsMissing, ModelInvalid, UnknownModel, UnsafeFile
from engine.io.registry import ModelRegistry
from engine.sdxl.models import loading
from engine.sdxl.models.configs import COMPONENTS, component_config, config_dir
from engine.sdxl.models.demo import (
    build_demo_sdxl,
    build_demo_tokenizer,
    demo_configs,
    save_demo_diffusers,
    save_diffusers,
    save_single_file,
    to_ldm_state_dict,
)
from engine.sdxl.models.loading import (
    LDM_PREFIXES,
    SDXLComponents,
    choose_dtype,
    load_clip_tokenizer,
    load_clip_tokenizers,
    load_ldm_component,
    load_sdxl,
    vae_decode_dtype,
)
from tests.paths import sdxl_base_keys_file, sdxl_configs_dir

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def demo_base() -> SDXLComponents:
    return build_demo_sdxl("base")


@pytest.fixture(scope="module")
def demo_refiner() -> SDXLComponents:
    return build_demo_sdxl("refiner")


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single files carry no tokenizer; the demo's vocabulary, saved (tokenizer.json only)."""
    folder = tmp_path_factory.mktemp("demo-tokenizer")
    build_demo_tokenizer().save_pretrained(folder)
    return folder


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def outputs(c: SDXLComponents) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP outputs on fixed inputs (a private generator; the global RNG is not used)."""
    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    tokens = c.tokenizer_2(["a red fox!"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    enc2 = c.text_encoder_2(tokens, output_hidden_states=True)
    out["clip_g_penultimate"], out["clip_g_pooled"] = enc2.hidden_states[-2], enc2.text_embeds
    context = enc2.hidden_states[-2]
    if c.text_encoder is not None:
        enc1 = c.text_encoder(c.tokenizer(["a red fox!"], padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids, output_hidden_states=True)
        out["clip_l_penultimate"] = enc1.hidden_states[-2]
        context = torch.cat([enc1.hidden_states[-2], context], dim=-1)
    n_time_ids = 6 if c.kind == "base" else 5
    latent = torch.randn(1, 4, 8, 8, generator=g)
    out["eps"] = c.unet(latent, torch.tensor([500]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": enc2.text_embeds,
                                           "time_ids": torch.tensor([[64.0] * n_time_ids])}).sample
    out["image"] = c.vae.decode(latent / c.vae_scaling_factor).sample
    return out


def assert_same_model(a: SDXLComponents, b: SDXLComponents) -> None:
    for part in PARTS:
        ma, mb = getattr(a, part), getattr(b, part)
        assert (ma is None) == (mb is None), part
        if ma is not None:
            assert states_equal(ma, mb), part
    oa, ob = outputs(a), outputs(b)
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key


# -- demo -----------------------------------------------------------------------------------------


def test_demo_is_deterministic_and_leaves_the_global_rng_alone(demo_base: SDXLComponents) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = build_demo_sdxl("base")
    assert torch.equal(torch.get_rng_state(), state)
    assert_same_model(demo_base, again)
    assert again.is_demo and again.name == "demo" and again.source == "demo" and again.kind == "base"


def test_demo_is_tiny_sdxl_shaped(demo_base: SDXLComponents, demo_refiner: SDXLComponents) -> None:
    total = sum(p.numel() for part in PARTS if getattr(demo_base, part) is not None
                for p in getattr(demo_base, part).parameters())
    assert total < 4_000_000  # a few MB
    assert demo_base.vae_scaling_factor == pytest.approx(0.13025)
    with torch.no_grad():
        image = demo_base.vae.decode(torch.zeros(1, 4, 12, 8)).sample
    assert image.shape == (1, 3, 96, 64)  # the latent is 1/8 of the image, as in SDXL
    o = outputs(demo_base)
    assert o["eps"].shape == (1, 4, 8, 8) and torch.isfinite(o["eps"]).all()
    assert demo_base.unet.config.cross_attention_dim == 64 and demo_refiner.unet.config.cross_attention_dim == 32
    assert demo_refiner.text_encoder is None and demo_refiner.tokenizer is None and demo_refiner.kind == "refiner"
    # like the real pair, base and refiner share the VAE and the bigG encoder, not the UNet
    assert states_equal(demo_base.vae, demo_refiner.vae)
    assert states_equal(demo_base.text_encoder_2, demo_refiner.text_encoder_2)
    assert outputs(demo_refiner)["eps"].shape == (1, 4, 8, 8)


def test_demo_tokenizer() -> None:
    tok, tok2 = build_demo_tokenizer(), build_demo_tokenizer(pad_token="!")
    assert len(tok) == 514 and tok.convert_tokens_to_ids("!") == 0
    ids = tok("a cat!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "c", "a", "t</w>", "!</w>"]
    assert tok2("a cat!").input_ids == ids  # same text tokens; only the padding differs
    assert tok("a", padding="max_length", max_length=5).input_ids[-1] == tok.eos_token_id
    assert tok2("a", padding="max_length", max_length=5).input_ids[-2:] == [0, 0]


def test_demo_float16_keeps_the_vae_in_float32() -> None:
    half = load_sdxl("demo", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32  # force_upcast, as SDXL's VAE config says


# -- diffusers folder -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_diffusers_folder_round_trip(tmp_path: Path, kind: str, demo_base: SDXLComponents,
                                     demo_refiner: SDXLComponents) -> None:
    original = demo_base if kind == "base" else demo_refiner
    folder = save_demo_diffusers(tmp_path / "demo-diffusers", kind=kind)  # type: ignore[arg-type]
    assert not list(folder.rglob("*.bin"))
    loaded = load_sdxl(folder, kind=kind)  # type: ignore[arg-type]
    assert loaded.source == "diffusers" and loaded.kind == kind and not loaded.is_demo
    assert_same_model(original, loaded)
    assert loaded.tokenizer_2("a cat!").input_ids == original.tokenizer_2("a cat!").input_ids


def test_pickle_weights_in_a_diffusers_folder_are_refused(tmp_path: Path, demo_base: SDXLComponents) -> None:
    folder = save_diffusers(demo_base, tmp_path / "m")
    marker = tmp_path / "marker"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    with pytest.raises(UnsafeFile):
        load_sdxl(folder)
    assert not marker.exists()


# -- single file ----------------------------------------------------------------------------------


class RecordingHandle:
    """Wraps a safe_open handle and records every tensor read."""

    def __init__(self, handle: Any, reads: list[str]) -> None:
        self._handle, self._reads = handle, reads

    def __enter__(self) -> RecordingHandle:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.__exit__(*exc)

    def get_tensor(self, key: str) -> torch.Tensor:
        self._reads.append(key)
        return self._handle.get_tensor(key)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_file_round_trip(tmp_path: Path, kind: str, demo_base: SDXLComponents, demo_refiner: SDXLComponents,
                                demo_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = demo_base if kind == "base" else demo_refiner
    path = save_single_file(original, tmp_path / f"demo_{kind}.safetensors")
    keys = set(load_file(str(path)))
    prefixes = LDM_PREFIXES[kind]
    assert all(k.startswith(tuple(prefixes.values())) for k in keys)
    reads: list[str] = []
    real_open = loading.open_safetensors_checked
    monkeypatch.setattr(loading, "open_safetensors_checked", lambda p: RecordingHandle(real_open(p), reads))
    loaded = load_sdxl(path, kind=kind, tokenizer_dir=demo_tokenizer_dir)  # type: ignore[arg-type]
    assert loaded.source == "single_file" and loaded.kind == kind and loaded.path == path
    assert_same_model(original, loaded)
    # Lean loading: every tensor is read from the file once (bigG's small text_projection twice,
    # once for its shape), and only logit_scale is never needed.
    repeated = {k for k in reads if reads.count(k) > 1}
    assert repeated == {prefixes["text_encoder_2"] + "text_projection"}
    assert keys - set(reads) == {prefixes["text_encoder_2"] + "logit_scale"}


def test_float16_file_loads_into_float32_models(tmp_path: Path, demo_base: SDXLComponents,
                                                demo_tokenizer_dir: Path) -> None:
    path = save_single_file(demo_base, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_sdxl(path, tokenizer_dir=demo_tokenizer_dir, dtype="float32")
    for part in PARTS:
        original, got = getattr(demo_base, part).state_dict(), getattr(loaded, part).state_dict()
        for key, value in got.items():
            if value.is_floating_point():
                assert value.dtype == torch.float32
                assert torch.equal(value, original[key].half().float()), (part, key)


def test_single_file_with_the_real_clip_tokenizer(tmp_path: Path, demo_base: SDXLComponents,
                                                  clip_tokenizer_dir: Path) -> None:
    loaded = load_sdxl(save_single_file(demo_base, tmp_path / "m.safetensors"), tokenizer_dir=clip_tokenizer_dir)
    reference = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    for text in ["a photo of a cat", "A (red:1.3) FOX, ((snowy)) forest!!", "héllo 日本"]:
        assert loaded.tokenizer(text).input_ids == reference(text).input_ids
        assert loaded.tokenizer_2(text).input_ids == reference(text).input_ids  # Fooocus tokenizes both alike
    assert loaded.tokenizer.pad_token_id == 49407 and loaded.tokenizer_2.pad_token_id == 0


def test_single_file_needs_tokenizer_files(tmp_path: Path, demo_base: SDXLComponents) -> None:
    path = save_single_file(demo_base, tmp_path / "m.safetensors")
    with pytest.raises(AssetsMissing):
        load_sdxl(path, hf_cache_dir=tmp_path / "empty-hub")
    with pytest.raises(AssetsMissing):
        load_sdxl(path, tokenizer_dir=tmp_path / "nothing-here")


def test_roles_and_wrong_checkpoints(tmp_path: Path, demo_base: SDXLComponents, demo_refiner: SDXLComponents,
                                     demo_tokenizer_dir: Path) -> None:
    refiner = save_single_file(demo_refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(ModelInvalid, match="refiner"):
        load_sdxl(refiner, kind="base", tokenizer_dir=demo_tokenizer_dir)
    base = save_single_file(demo_base, tmp_path / "base.safetensors")
    as_refiner = load_sdxl(base, kind="refiner", tokenizer_dir=demo_tokenizer_dir)  # spec §8: SDXL base as refiner
    assert as_refiner.kind == "base" and as_refiner.text_encoder is None and as_refiner.tokenizer is None
    assert states_equal(as_refiner.unet, demo_base.unet)
    # An SD 1.5 layout and a checkpoint lacking a tensor are refused.
    tensors = load_file(str(base))
    sd15 = {k.replace("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."): v
            for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelInvalid, match="SD 1.5"):
        load_sdxl(tmp_path / "sd15.safetensors", tokenizer_dir=demo_tokenizer_dir)
    metadata = {"hooocus.configs": json.dumps({p: demo_configs("base")[p] for p in COMPONENTS})}
    missing = {k: v for k, v in tensors.items() if not k.endswith("output_blocks.2.2.conv.weight")}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(ModelInvalid, match="lacks"):
        load_sdxl(tmp_path / "missing.safetensors", tokenizer_dir=demo_tokenizer_dir)
    # The tiny tensors against the real SDXL architecture: a clear shape error, not a crash.
    with pytest.raises(ModelInvalid, match="do not"):
        load_sdxl(base, tokenizer_dir=demo_tokenizer_dir, config_dir=config_dir("base"))


def test_pickle_renamed_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoints" / "evil.safetensors"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    with pytest.raises(UnsafeFile):
        load_sdxl(path)
    with pytest.raises(UnsafeFile):
        load_sdxl("evil", registry=ModelRegistry({"checkpoints": [path.parent]}))
    (tmp_path / "checkpoints" / "evil.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(UnknownModel):  # .ckpt files are not even listed
        load_sdxl("evil.ckpt", registry=ModelRegistry({"checkpoints": [path.parent]}))
    assert not marker.exists()


# -- names: registry and HF cache ---------------------------------------------------------------


def test_load_by_registry_name(tmp_path: Path, demo_base: SDXLComponents, demo_tokenizer_dir: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_single_file(demo_base, folder / "SDXL" / "tiny.safetensors")
    save_diffusers(demo_base, folder / "tiny-diffusers")
    registry = ModelRegistry({"checkpoints": [folder]})
    by_stem = load_sdxl("tiny", registry=registry, tokenizer_dir=demo_tokenizer_dir)
    assert by_stem.name == "tiny" and by_stem.source == "single_file"
    assert states_equal(by_stem.unet, demo_base.unet)
    assert load_sdxl("tiny-diffusers", registry=registry).source == "diffusers"
    for name in ("../tiny", "SDXL/../../x", "/etc/passwd", "nothere"):
        with pytest.raises(UnknownModel, match="available: SDXL/tiny.safetensors, tiny-diffusers"):
            load_sdxl(name, registry=registry, tokenizer_dir=demo_tokenizer_dir)
    with pytest.raises(UnknownModel):
        load_sdxl("nothere")


def fake_hf_cache(hub: Path, repo_id: str, files: Mapping[str, Path]) -> Path:
    """Lay files out like huggingface_hub: blobs, snapshots/<rev>/ symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    for index, (name, source) in enumerate(sorted(files.items())):
        blob = repo / "blobs" / f"blob{index:04d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hf_cache_lookup(tmp_path: Path, demo_base: SDXLComponents, demo_refiner: SDXLComponents,
                         demo_tokenizer_dir: Path) -> None:
    hub = tmp_path / "hub"
    folder = save_diffusers(demo_base, tmp_path / "src")
    fake_hf_cache(hub, "org/tiny-sdxl", {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()})
    from_cache = load_sdxl("org/tiny-sdxl", hf_cache_dir=hub)
    assert from_cache.source == "diffusers" and from_cache.name == "org/tiny-sdxl"
    assert_same_model(demo_base, from_cache)
    single = save_single_file(demo_refiner, tmp_path / "refiner.safetensors")
    fake_hf_cache(hub, "org/tiny-refiner", {"refiner.safetensors": single, "README.md": single})
    for spec in ("org/tiny-refiner", "org/tiny-refiner/refiner.safetensors"):
        refiner = load_sdxl(spec, kind="refiner", hf_cache_dir=hub, tokenizer_dir=demo_tokenizer_dir)
        assert refiner.source == "single_file" and states_equal(refiner.unet, demo_refiner.unet)
    for spec in ("org/absent", "org/tiny-refiner/other.safetensors", "org/../tiny-sdxl", "org/tiny-sdxl/../x"):
        with pytest.raises(UnknownModel):
            load_sdxl(spec, hf_cache_dir=hub)


def test_tokenizer_from_hf_cache(tmp_path: Path, demo_base: SDXLComponents, clip_tokenizer_dir: Path) -> None:
    hub = tmp_path / "hub"
    fake_hf_cache(hub, "openai/clip-vit-large-patch14",
                  {name: clip_tokenizer_dir / name for name in ("vocab.json", "merges.txt")})
    loaded = load_sdxl(save_single_file(demo_base, tmp_path / "m.safetensors"), hf_cache_dir=hub)
    assert loaded.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


# -- tokenizers -----------------------------------------------------------------------------------


def test_clip_tokenizers_match_the_reference(tmp_path: Path, clip_tokenizer_dir: Path) -> None:
    reference = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    tok, tok2 = load_clip_tokenizers(clip_tokenizer_dir)
    reference.save_pretrained(tmp_path / "json-only")  # transformers 5 writes tokenizer.json only
    from_json = load_clip_tokenizer(tmp_path / "json-only")
    for text in ["a photo of a cat!", "embedding:foo, (x:1.2) BREAK y", "  spaces   and\ttabs "]:
        expected = reference(text).input_ids
        assert tok(text).input_ids == tok2(text).input_ids == from_json(text).input_ids == expected
    assert tok.model_max_length == 77 and tok2.pad_token == "!" and tok2.pad_token_id == 0
    with pytest.raises(AssetsMissing):
        load_clip_tokenizer(tmp_path)


# -- VAE override ---------------------------------------------------------------------------------


def test_vae_override(tmp_path: Path, demo_base: SDXLComponents) -> None:
    other = build_demo_sdxl("base")
    with torch.no_grad():
        for p in other.vae.parameters():
            p.mul_(0.5)
    metadata = {"hooocus.configs": json.dumps({"vae": dict(other.vae.config)}, default=str)}
    diffusers_file = tmp_path / "vae_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in other.vae.state_dict().items()}, str(diffusers_file), metadata=metadata)
    ldm_file = tmp_path / "vae_ldm.safetensors"
    ldm = {k: v.contiguous() for k, v in to_ldm_state_dict(other).items() if k.startswith("first_stage_model.")}
    save_file(ldm, str(ldm_file), metadata=metadata)
    other.vae.save_pretrained(tmp_path / "vae_folder")
    registry = ModelRegistry({"vae": [tmp_path]})
    for vae in (diffusers_file, ldm_file, tmp_path / "vae_folder", "vae_ldm"):
        loaded = load_sdxl("demo", vae_path=vae, registry=registry)
        assert states_equal(loaded.vae, other.vae), vae
        assert not states_equal(loaded.vae, demo_base.vae)
    with pytest.raises(UnknownModel):
        load_sdxl("demo", vae_path="../vae_ldm", registry=registry)


# -- dtype ----------------------------------------------------------------------------------------


def test_choose_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_dtype("cpu") == torch.float32
    assert choose_dtype("cpu", "bfloat16") == torch.bfloat16
    assert choose_dtype("cuda", torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert choose_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert choose_dtype("cuda:0", "auto") == torch.float16
    assert vae_decode_dtype(torch.float16, True) == torch.float32
    assert vae_decode_dtype(torch.float16, False) == torch.float16  # the fp16-fix VAE
    assert vae_decode_dtype(torch.bfloat16, True) == torch.bfloat16
    assert vae_decode_dtype(torch.float32, True) == torch.float32


# -- bundled configs and the full-size key mapping -----------------------------------------------


def test_bundled_configs_equal_the_shared_sdxl_configs() -> None:
    shared = sdxl_configs_dir()
    bundled = sorted(p.relative_to(config_dir("base").parent) for p in config_dir("base").parent.rglob("*.json"))
    assert len(bundled) >= 13
    for rel in bundled:
        assert json.loads((config_dir("base").parent / rel).read_text()) == json.loads((shared / rel).read_text())
    assert component_config("refiner", "vae") == component_config("base", "vae")
    assert component_config("refiner", "unet")["cross_attention_dim"] == 1280


class RecordingMapping(Mapping[str, torch.Tensor]):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.read = tensors, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def test_full_size_sdxl_checkpoint_maps_completely_on_meta(caplog: pytest.LogCaptureFixture) -> None:
    """The 2,514 tensors of a real SDXL base checkpoint (parity key list) through the same
    conversion and assignment as a real load, on the meta device: every tensor but OpenCLIP's
    logit_scale is consumed, every parameter of the four modules is produced with the right shape,
    nothing is left over and no value is lost or duplicated."""
    entries = json.loads(sdxl_base_keys_file().read_text())
    tensors = {key: torch.empty(shape, device="meta") for key, shape, _dtype in entries}
    numel = {key: tensors[key].numel() for key in tensors}
    read: set[str] = set()
    caplog.set_level(logging.INFO, logger=loading.__name__)
    for part in PARTS:
        prefix = LDM_PREFIXES["base"][part]
        source = RecordingMapping({k: v for k, v in tensors.items() if k.startswith(prefix)})
        module = load_ldm_component(part, source, component_config("base", part), arch="base")
        params = list(module.parameters())
        assert all(p.is_meta for p in params)
        unused = set(source.tensors) - source.read
        assert sum(p.numel() for p in params) == sum(numel[k] for k in source.read), part
        assert sum(p.numel() for p in params) == sum(numel[k] for k in source.tensors) - sum(numel[k] for k in unused)
        read |= source.read
    assert set(tensors) - read == {"conditioner.embedders.1.model.logit_scale"}
    assert "ignoring" not in caplog.text  # no unexpected (unmapped) tensors either
