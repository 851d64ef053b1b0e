"""Unit: the Image Prompt set-up groups (issue 16) install the files where the runner reads them, and
the IP-Adapter's nested pickle becomes the flat safetensors layout its loader reads."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

from engine.core.errors import ModelInvalid, UnsafeFile
from engine.io.setup import ALL_ASSETS, convert_pickle_to_safetensors, select_assets
from engine.sdxl.image_prompt import SETUP_FILES


def test_groups_install_every_file_the_runner_needs_pinned_where_it_matters() -> None:
    for slot_type, files in SETUP_FILES.items():
        for rel, group in files:
            assets = select_assets(ALL_ASSETS, [group])
            assert f"models/{rel}" in {a.dest for a in assets}, (slot_type, rel)
            assert all(a.optional for a in assets)  # never installed by default
            assert not set(assets) & set(select_assets(ALL_ASSETS, None))
            for asset in assets:  # every pickle is pinned and converted; the runner reads safetensors/ONNX only
                assert asset.dest.endswith((".safetensors", ".onnx"))
                assert asset.convert is None or asset.sha256 is not None
                if asset.dest.endswith(".onnx"):  # FaceSwap's detector: YuNet from opencv_zoo, pinned
                    assert asset.url.startswith("https://github.com/opencv/opencv_zoo/") and asset.sha256
                else:
                    assert asset.url.startswith("https://huggingface.co/lllyasviel/misc/resolve/main/")
    for group, upstream in (("ip-adapter", "ip-adapter-plus_sdxl_vit-h.bin"),
                            ("faceswap", "ip-adapter-plus-face_sdxl_vit-h.bin")):
        (adapter,) = [a for a in select_assets(ALL_ASSETS, [group]) if a.convert]
        assert adapter.convert == "nested_pickle_to_safetensors" and adapter.url.endswith(upstream)
    assert {rel for rel, _group in SETUP_FILES["FaceSwap"]} >= {rel for rel, _g in SETUP_FILES["ImagePrompt"]
                                                                 if not rel.endswith("plus_sdxl_vit-h.safetensors")}


def _nested_pickle() -> tuple[bytes, dict[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    state = {"image_proj": {"latents": torch.randn(1, 4, 8, generator=g), "proj_out.weight": torch.randn(8, 8, generator=g)},
             "ip_adapter": {"1.to_k_ip.weight": torch.randn(8, 8, generator=g),
                            "1.to_v_ip.weight": torch.randn(8, 8, generator=g)}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


def test_nested_ip_adapter_pickle_is_flattened_after_the_pin(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data, state = _nested_pickle()
    source = tmp_path / "ip-adapter-plus_sdxl_vit-h.bin"
    source.write_bytes(data)
    dest = tmp_path / "out.safetensors"
    with pytest.raises(UnsafeFile):  # a foreign pin: never unpickled
        convert_pickle_to_safetensors(source, dest, expected_sha256="0" * 64, kind="nested_pickle_to_safetensors")
    assert not dest.exists()
    convert_pickle_to_safetensors(source, dest, expected_sha256=hashlib.sha256(data).hexdigest(),
                                  kind="nested_pickle_to_safetensors")
    loaded = load_file(str(dest))
    expected = {f"{part}.{name}": t for part, inner in state.items() for name, t in inner.items()}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_flat_pickle_is_refused_by_the_nested_conversion(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buffer)
    source = tmp_path / "flat.bin"
    source.write_bytes(buffer.getvalue())
    with pytest.raises(ModelInvalid):
        convert_pickle_to_safetensors(source, tmp_path / "o.safetensors",
                                      expected_sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
                                      kind="nested_pickle_to_safetensors")
