"""bench/gpu.py --tiny: the GPU benchmark's code paths on CPU, so the script never rots.

All three are slow tests (they start the bench's child processes: 25–100 s each on 2 cores, session 5
`--durations`): the cold path (this process's stock-diffusers case and the "cold" child: our engine end
to end with the compile dispatcher, the UNet TFLOP/s case, the static-cache expansion), every SDXL case
with each child process, and the FLUX.1 child.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.paths import STAND_IN_POSITIVE_WORDS, fooocus_data_dir

REPO = Path(__file__).resolve().parents[2]


def _load_bench() -> ModuleType:
    """bench/gpu.py as a module (it imports nothing heavy at module level)."""
    spec = importlib.util.spec_from_file_location("hooocus_bench_gpu", REPO / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _load_bench()

COLD_CASES = ("diffusers_stock_e2e_s", "hooocus_e2e_s", "hooocus_unet_tflops", "expansion_60tok_s", "peak_gib",
              "cold_start_s")


def bench_assets(folder: Path) -> Path:
    """--assets in the bench's layout: the repo's tokenizers and a made-up positive.txt (Fooocus's is
    CC BY-NC 4.0 and never in the repository; the bench times the expansion, whatever its words)."""
    folder.mkdir()
    for name in ("clip_tokenizer", "gpt2_tokenizer"):
        (folder / name).symlink_to(fooocus_data_dir() / name)
    (folder / "prompt_expansion").mkdir()
    (folder / "prompt_expansion" / "positive.txt").write_text("\n".join(STAND_IN_POSITIVE_WORDS), encoding="utf-8")
    return folder


def run_bench(tmp_path: Path, *extra: str, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--out-dir", str(tmp_path),
               "--assets", str(bench_assets(tmp_path / "assets")), *extra]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = list(tmp_path.glob("*-cpu-tiny.json"))
    assert len(files) == 1, done.stdout[-2000:]
    data = json.loads(files[0].read_text())
    assert "Hooocus GPU benchmark on cpu" in done.stdout  # the table is printed last
    return data


def check_common(data: dict) -> None:
    assert {"gpu", "torch", "diffusers", "cases"} <= data.keys()
    assert tuple(data["cases"]) == gpu.CASE_KEYS + gpu.FLUX_CASE_KEYS  # every documented key, in order
    assert data["gpu"] == "cpu" and data["tiny"] is True and data["errors"] == []


@pytest.mark.slow
def test_bench_tiny_cold_path(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--skip", "compiled,warm,lowvram,flux", timeout_s=240)
    check_common(data)
    for key in COLD_CASES:
        assert isinstance(data["cases"][key], float) and data["cases"][key] > 0, key
    details = data["details"]
    assert details["hooocus_e2e_s"]["recompiles_between_images"] == 0  # no recompiles between images
    assert details["hooocus_e2e_s"]["calls"]["unet"]["compiled"] > 0  # the compiled path really ran
    assert details["hooocus_unet_tflops"]["recompiles"] == 0
    assert details["expansion_60tok_s"]["new_tokens"] == gpu.EXPANSION_NEW_TOKENS
    assert details["expansion_60tok_s"]["same_text_as_eager"] is True
    assert sorted(s.split(":")[0] for s in data["skipped"]) == ["compiled", "flux", "lowvram", "warm"]
    assert data["ratios"]["hooocus_vs_stock (goal <= 0.45, stretch 0.35)"] is not None


@pytest.mark.slow
def test_bench_tiny_every_case(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--skip", "flux", timeout_s=600)  # FLUX.1: test_bench_tiny_flux
    check_common(data)
    for key in gpu.CASE_KEYS:
        assert isinstance(data["cases"][key], float) and data["cases"][key] > 0, key
    assert data["skipped"] == ["flux: --skip"]
    assert all(value is not None for key, value in data["ratios"].items() if not key.startswith("flux"))


@pytest.mark.slow
def test_bench_tiny_flux(tmp_path: Path) -> None:
    """The FLUX.1 child alone (issue 17): stock FluxPipeline dev- and schnell-style on the same random
    modules, then our Flux runner. The model CPU offload reference needs an accelerator (skipped on CPU).
    Our runner is a separate part of issue 17 (engine/flux/runner.py); where it is in the tree its cases
    must run (no error), where it is not they are listed as skipped, never silently empty."""
    import importlib.util

    data = run_bench(tmp_path, "--skip", "stock,compiled,cold,warm,lowvram", timeout_s=300)
    assert tuple(data["cases"]) == gpu.CASE_KEYS + gpu.FLUX_CASE_KEYS and data["errors"] == []
    for key in ("flux_stock_dev_e2e_s", "flux_stock_schnell_e2e_s"):
        assert isinstance(data["cases"][key], float) and data["cases"][key] > 0, key
        assert data["details"][key]["peak_gib"] > 0
    ours = ("flux_hooocus_dev_e2e_s", "flux_hooocus_schnell_e2e_s", "flux_lowvram_e2e_s")
    skipped = " ".join(data["skipped"])
    if importlib.util.find_spec("engine.flux.runner") is not None:
        assert all(isinstance(data["cases"][key], float) for key in ours)
        assert data["ratios"]["flux_dev_hooocus_vs_stock"] is not None
    else:
        assert all(data["cases"][key] is None and key in skipped for key in ours)
    assert "flux_stock_offload_e2e_s: model CPU offload needs an accelerator" in skipped
    assert all(data["cases"][key] is None for key in gpu.CASE_KEYS)  # the SDXL phases were skipped


def test_strip_internal_arguments() -> None:
    argv = ["--tiny", "--child", "cold", "--out-dir=/x", "--budget-s", "9", "--runs", "2"]
    assert gpu.strip_internal(argv) == ["--tiny", "--runs", "2"]
