"""Model memory management on the SDXL runner (issue 15): the per-device model cache keeps
switched-away checkpoints within the budget, evicts the least recently used beyond it (and the
memory really goes), keeps LoRA restore exact across switches, and ``unload_models`` frees all."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from engine.core.jobs import Job, JobState, RunContext, _process_rss_bytes
from engine.core.model_cache import tensor_bytes
from engine.core.request import GenerationRequest
from engine.core.settings import load_settings
from engine.sdxl import pipeline
from engine.sdxl.models.demo import build_demo_sdxl, save_single_file
from engine.sdxl.pipeline import SDXLRunner
from tests.engine.demo import StubEngine

log = logging.getLogger(__name__)

SMALL = {"width": 64, "height": 64, "steps": 1, "performance": "Speed", "styles": []}


@pytest.fixture(scope="module")
def demo_bytes() -> int:
    """What one demo checkpoint weighs once loaded (float32 on the CPU): the unit of the budgets."""
    c = build_demo_sdxl("base")
    return tensor_bytes(c.unet, c.vae, c.text_encoder, c.text_encoder_2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny checkpoints (the demo's weights, as single-file safetensors) and one LoRA."""
    data = tmp_path_factory.mktemp("data")
    base = build_demo_sdxl("base")
    for name in ("a", "b"):
        save_single_file(base, data / "models" / "checkpoints" / f"{name}.safetensors")
    base.tokenizer.save_pretrained(str(data / "models" / "clip_tokenizer"))  # the single-file loader needs it
    # A LoRA on the UNet's first attention query (diffusers-style kohya name).
    module = next(n for n, m in base.unet.named_modules() if n.endswith("attn1.to_q"))
    layer = base.unet.get_submodule(module)
    gen = torch.Generator().manual_seed(5)
    key = "lora_unet_" + module.replace(".", "_")
    (data / "models" / "loras").mkdir(parents=True)
    save_file({f"{key}.lora_up.weight": torch.randn(layer.out_features, 2, generator=gen) * 0.1,
               f"{key}.lora_down.weight": torch.randn(2, layer.in_features, generator=gen) * 0.1,
               f"{key}.alpha": torch.tensor(2.0)}, str(data / "models" / "loras" / "tiny.safetensors"))
    return data


def make_runner(data_dir: Path, budget_bytes: int) -> SDXLRunner:
    settings, _ = load_settings(cli={"data_dir": data_dir, "device": "cpu",
                                     "model_memory_gb": budget_bytes / 1024**3}, env={})
    return SDXLRunner(settings)


def run(runner: SDXLRunner, model: str, **fields: Any) -> Job:
    job = Job(f"j_{model}", GenerationRequest(prompt="fox", base_model=model, seed=1, **SMALL, **fields), "local")
    runner.run(RunContext(job, StubEngine()))  # type: ignore[arg-type]
    assert job.images, job.info()
    return job


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every checkpoint the runner reads from disk, in order."""
    seen: list[str] = []
    original = pipeline.load_sdxl

    def counting(spec: Any, **kw: Any) -> Any:
        seen.append(Path(str(spec)).name)
        return original(spec, **kw)

    monkeypatch.setattr(pipeline, "load_sdxl", counting)
    yield seen


def test_switching_a_b_a_within_the_budget_does_not_reload_a(data_dir: Path, demo_bytes: int,
                                                             loads: list[str]) -> None:
    runner = make_runner(data_dir, int(2.5 * demo_bytes))  # room for two
    for model in ("a.safetensors", "b.safetensors", "a.safetensors", "b.safetensors"):
        run(runner, model)
    assert loads == ["a.safetensors", "b.safetensors"]
    stats = runner.memory_stats()
    assert stats.entries == 2 and stats.evictions == 0
    assert 2 * demo_bytes <= stats.used_bytes <= stats.budget_bytes


def test_over_the_budget_the_least_recently_used_goes_and_its_memory_is_freed(
        data_dir: Path, demo_bytes: int, loads: list[str]) -> None:
    runner = make_runner(data_dir, int(1.5 * demo_bytes))  # room for one
    run(runner, "a.safetensors")
    unet_a = weakref.ref(runner.base_components.unet)  # type: ignore[union-attr]
    gc.collect()
    rss_with_a = _process_rss_bytes()
    run(runner, "b.safetensors")
    gc.collect()
    rss_after_switch = _process_rss_bytes()
    assert unet_a() is None  # nothing (cache, runner, accelerator hooks) kept a's weights alive
    assert [key[1] for key in runner.models.keys() if key[0] == "checkpoint"] == [str(Path("b.safetensors"))]
    assert runner.models.used_bytes == pytest.approx(demo_bytes, rel=0.01)
    assert runner.memory_stats().evictions == 1
    run(runner, "a.safetensors")  # back to a: read again (it was evicted)
    assert loads == ["a.safetensors", "b.safetensors", "a.safetensors"]
    # RSS is reported, not asserted: the allocator may keep freed pages (numbers go to the report).
    log.warning("RSS with a loaded %.1f MB, after switching to b %.1f MB (one demo model %.1f MB)",
                (rss_with_a or 0) / 1e6, (rss_after_switch or 0) / 1e6, demo_bytes / 1e6)


def test_lora_restore_stays_exact_across_model_switches(data_dir: Path, demo_bytes: int,
                                                        loads: list[str]) -> None:
    runner = make_runner(data_dir, int(2.5 * demo_bytes))
    run(runner, "a.safetensors")
    unet = runner.base_components.unet  # type: ignore[union-attr]
    pristine = {k: v.clone() for k, v in unet.state_dict().items()}
    run(runner, "a.safetensors", loras=[{"name": "tiny.safetensors", "weight": 1.0}])
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, pristine[k])]
    assert changed and all("attn1.to_q" in k for k in changed)  # the LoRA is merged into a's weights
    run(runner, "b.safetensors")  # a stays cached with its LoRA merged
    run(runner, "a.safetensors")  # no LoRA: a's merge is undone bit for bit, without a reload
    assert runner.base_components.unet is unet  # type: ignore[union-attr]
    assert all(torch.equal(v, pristine[k]) for k, v in unet.state_dict().items())
    assert loads == ["a.safetensors", "b.safetensors"]


def test_unload_models_frees_everything_and_the_next_job_loads_again(data_dir: Path, demo_bytes: int,
                                                                     loads: list[str]) -> None:
    runner = make_runner(data_dir, int(2.5 * demo_bytes))
    run(runner, "a.safetensors", refiner_model="b.safetensors", refiner_switch=0.5)
    assert len(runner.models) == 2  # a as base, b as refiner
    refs = [weakref.ref(m) for k in runner.models.keys()
            for m in runner.models.peek(k).components_modules()]
    released = runner.unload_models()
    gc.collect()
    assert released >= 2 * demo_bytes * 0.9  # the refiner has no CLIP-L: a bit under two models
    assert runner.models.used_bytes == 0 and len(runner.models) == 0 and runner.base_components is None
    assert all(ref() is None for ref in refs)
    job = run(runner, "a.safetensors")
    assert job.state is not JobState.FAILED and loads == ["a.safetensors", "b.safetensors", "a.safetensors"]


def test_out_of_memory_recovery_keeps_the_running_jobs_models_only(data_dir: Path, demo_bytes: int) -> None:
    runner = make_runner(data_dir, int(2.5 * demo_bytes))
    run(runner, "a.safetensors")
    run(runner, "b.safetensors")
    with runner.models.pinned() as hold:  # as inside a job that uses b
        hold(next(k for k in runner.models.keys() if "b.safetensors" in k[1]))
        runner.recover_after_oom()
        assert [k[1] for k in runner.models.keys()] == ["b.safetensors"]
    runner.recover_after_oom()  # after the job: nothing is pinned, everything goes
    assert len(runner.models) == 0


def test_the_upscaler_is_cached_and_a_replaced_file_drops_the_old_network(data_dir: Path, demo_bytes: int,
                                                                          tmp_path: Path) -> None:
    import os
    from types import SimpleNamespace

    from engine.imaging.upscaler import UPSCALE_MODELS_DIR, UPSCALER_FILE_NAME
    from engine.sdxl.models.demo import demo_upscaler_state_dict

    settings, _ = load_settings(cli={"data_dir": tmp_path, "device": "cpu",
                                     "model_memory_gb": 2.5 * demo_bytes / 1024**3}, env={})
    runner = SDXLRunner(settings)
    path = tmp_path / "models" / UPSCALE_MODELS_DIR / UPSCALER_FILE_NAME
    path.parent.mkdir(parents=True)
    save_file(demo_upscaler_state_dict(), str(path))
    resolved = SimpleNamespace(base_model="a.safetensors")  # not the demo: the set-up file
    first = runner._upscaler(resolved)  # type: ignore[arg-type]
    assert runner._upscaler(resolved) is first  # type: ignore[arg-type]
    old = weakref.ref(first.network)
    del first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    second = runner._upscaler(resolved)  # type: ignore[arg-type]
    gc.collect()
    assert old() is None and [k[0] for k in runner.models.keys()] == ["upscaler"]
    assert runner.models.used_bytes == tensor_bytes(second.network) > 0


def test_the_budget_follows_where_the_weights_live(tmp_path: Path) -> None:
    """Low-VRAM mode keeps the weights in CPU memory: the cache is the RAM's, under the CPU rule.
    (No GPU needed: nothing is loaded; the name says which memory the budget is for.)"""
    for low_vram, expected in ((True, "cpu"), (False, "cuda")):
        settings, _ = load_settings(cli={"data_dir": tmp_path, "device": "cuda", "low_vram": low_vram,
                                         "model_memory_gb": 3.0}, env={})
        runner = SDXLRunner(settings)
        assert runner.models.name == expected and runner.memory_stats().budget_bytes == 3 * 1024**3


def test_cpu_workers_share_the_automatic_ram_budget(tmp_path: Path) -> None:
    from engine.core.model_cache import default_budget_bytes

    one = SDXLRunner(load_settings(cli={"data_dir": tmp_path, "device": "cpu"}, env={})[0])
    two = SDXLRunner(load_settings(cli={"data_dir": tmp_path, "device": "cpu", "devices": ("cpu", "cpu")}, env={})[0])
    assert one.memory_stats().budget_bytes == default_budget_bytes("cpu")
    assert two.memory_stats().budget_bytes == default_budget_bytes("cpu") // 2
