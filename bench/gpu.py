#!/usr/bin/env python3
"""Hooocus vs stock diffusers on one GPU, side by side, in one command (issue "GPU performance").

Builds full-size SDXL base (+ refiner) with random weights from the configs bundled in
``engine/sdxl/models/configs`` (no network, no weight files) and times, in one run on one card:

  1. ``diffusers_stock_e2e_s``     stock ``StableDiffusionXLPipeline``, 1024², 30 steps, CFG, PIL out
  2. ``diffusers_compiled_e2e_s``  the same + fused QKV + channels_last + torch.compile (UNet, vae.decode)
  3. ``hooocus_e2e_s``             our engine, Fooocus Speed defaults (sharpness 2, adaptive CFG, negative
                                  ADM, dpmpp_2m_sde_gpu/karras, two style lines + Fooocus V2 expansion),
                                  request in → encoded PNG bytes out, through ``Engine`` + ``SDXLRunner``
  4. ``hooocus_refiner_e2e_s``     the same with the refiner swap at 0.8 (refiner UNet eager unless
                                  ``--compile-refiner``)
  5. ``hooocus_unet_tflops``       our UNet forward alone (batch 2, 128², 77-token context), FLOPs counted
  6. ``expansion_60tok_s``         Fooocus V2 expansion, 60 new tokens (static KV cache decode)
  7. ``peak_gib`` / ``lowvram_peak_gib`` / ``lowvram_e2e_s``  torch.cuda.max_memory_allocated; low-VRAM mode
  8. ``cold_start_s`` / ``warm_start_s``  process start → first image, empty vs warm compile cache
  9. ``model_switch_gib``          issue 15: torch.cuda.memory_allocated after switching base model A -> B
                                  with a model budget for one (A is evicted: ≈ one model), details: one
                                  model, both kept within a budget for two, after unload_models

Our engine runs in child processes (cold cache, warm cache, low-VRAM) so that start-up and peak
memory are measured per process; the stock pipeline runs in this process. Results: a table (last
lines of the output) and ``bench/results/<date>-<gpu>.json`` (also copied to ``$OUT`` when set),
rewritten after every case, so a run cut short still leaves data. Phases that would not fit
``--budget-s`` are skipped (listed under ``skipped``); a watchdog exits at ``--hard-deadline-s``.

    python3 bench/gpu.py                   # on the GPU machine: see bench/README.md for the one call
    python3 bench/gpu.py --tiny            # same code paths on CPU in seconds (tests/unit/test_bench_tiny.py)
    python3 bench/gpu.py --cpu-overhead    # demo model on CPU: engine vs a plain UNet loop, tricks on/off

Assets (``--assets``; default ``.hooocus/bench-assets``, ``$HOOOCUS_FOOOCUS_DATA`` or ../shared/fooocus-data):
a folder with ``clip_tokenizer/`` (vocab.json, merges.txt), ``gpt2_tokenizer/`` and
``prompt_expansion/positive.txt`` (the layout of shared/fooocus-data). Without it the byte-level demo
tokenizer is used and the expansion case is skipped (noted in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SPAWN_EPOCH = time.time()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASE_KEYS = ("diffusers_stock_e2e_s", "diffusers_compiled_e2e_s", "hooocus_e2e_s", "hooocus_refiner_e2e_s",
             "hooocus_unet_tflops", "expansion_60tok_s", "peak_gib", "lowvram_peak_gib", "lowvram_e2e_s",
             "cold_start_s", "warm_start_s", "model_switch_gib")
#: FLUX.1 cases (issue 17), run in the "flux" child: stock FluxPipeline vs our Flux runner, dev-style
#: (28 steps, guidance 3.5, 512 T5 tokens) and schnell-style (4 steps, 256 tokens), peak memory, low VRAM.
FLUX_CASE_KEYS = ("flux_stock_dev_e2e_s", "flux_stock_schnell_e2e_s", "flux_hooocus_dev_e2e_s",
                  "flux_hooocus_schnell_e2e_s", "flux_peak_gib", "flux_stock_offload_e2e_s",
                  "flux_stock_offload_peak_gib", "flux_lowvram_e2e_s", "flux_lowvram_peak_gib")
FLUX_STEPS = {"dev": 28, "schnell": 4}
FLUX_MAX_SEQUENCE = {"dev": 512, "schnell": 256}
FLUX_GUIDANCE = 3.5
#: Dense bf16 peak measured on this workplace's H100/H200 (spec/performance.md §2).
PEAK_BF16_TFLOPS = 790.0
GIB = 2**30
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality, watermark"
STYLES = ["Fooocus V2", "Hooocus Sharp", "Hooocus Cinematic"]  # two style lines + the expansion
EXPANSION_NEW_TOKENS = 60


# -- small helpers --------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.time() - SPAWN_EPOCH:7.1f}s] {message}", flush=True)


def default_assets() -> Path | None:
    for candidate in (REPO / ".hooocus" / "bench-assets", os.environ.get("HOOOCUS_FOOOCUS_DATA"),
                      REPO.parent / "shared" / "fooocus-data"):
        if candidate and (Path(candidate) / "clip_tokenizer" / "vocab.json").is_file():
            return Path(candidate)
    return None


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: Any) -> float:
    """``torch.cuda.max_memory_allocated``; on CPU (tiny runs) the process's peak RSS instead, so the
    case still reports something (not comparable with GPU numbers)."""
    import torch

    if torch.device(device).type != "cuda":
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3)


def timed_runs(fn: Callable[[], Any], device: Any, *, runs: int, warmup: int) -> dict[str, Any]:
    """Median wall time of ``runs`` calls after ``warmup`` calls, device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs_s": [round(t, 5) for t in times]}


class Results:
    """The JSON being built; written atomically after every case."""

    def __init__(self, path: Path | None, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.lock = threading.Lock()

    def case(self, key: str, value: float | None, **details: Any) -> None:
        with self.lock:
            self.data.setdefault("cases", {})[key] = None if value is None else round(float(value), 5)
            if details:
                self.data.setdefault("details", {}).setdefault(key, {}).update(details)
        self.write()

    def detail(self, key: str, **details: Any) -> None:
        with self.lock:
            self.data.setdefault("details", {}).setdefault(key, {}).update(details)
        self.write()

    def note(self, kind: str, text: str) -> None:
        with self.lock:
            self.data.setdefault(kind, []).append(text)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        with self.lock:
            text = json.dumps(self.data, indent=1, default=str)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


@contextlib.contextmanager
def guarded(results: Results, name: str) -> Iterator[None]:
    """Run one case; an error is recorded and the run goes on."""
    try:
        yield
    except Exception:  # noqa: BLE001 - a benchmark reports every failure and carries on
        results.note("errors", f"{name}: {traceback.format_exc()[-2500:]}")
        log(f"{name} FAILED: {traceback.format_exc().strip().splitlines()[-1]}")


# -- models with random weights -------------------------------------------------------------------


def model_configs(kind: str, *, tiny: bool, vocab_size: int) -> dict[str, dict[str, Any]]:
    """Full size: the bundled SDXL configs. Tiny: the demo model's configs (CPU-sized)."""
    from engine.sdxl.models.configs import component_config
    from engine.sdxl.models.demo import demo_configs

    if tiny:
        configs = {k: dict(v) for k, v in demo_configs(kind).items()}  # type: ignore[arg-type]
    else:
        parts = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if kind == "base" else [])
        configs = {part: component_config(kind, part) for part in parts}  # type: ignore[arg-type]
    for part in ("text_encoder", "text_encoder_2"):
        if part in configs:
            configs[part] = {**configs[part], "vocab_size": max(vocab_size, configs[part].get("vocab_size", 0))}
    return configs


def clip_tokenizers(assets: Path | None) -> tuple[Any, Any]:
    if assets is not None:
        from engine.sdxl.models.loading import load_clip_tokenizers

        return load_clip_tokenizers(assets / "clip_tokenizer")
    from engine.sdxl.models.demo import build_demo_tokenizer

    return build_demo_tokenizer(), build_demo_tokenizer(pad_token="!")


def random_components(kind: str, *, device: Any, dtype: Any, tiny: bool, assets: Path | None) -> Any:
    """SDXL base or refiner with random weights, initialised on the GPU when there is one (fast) and
    then moved to ``device`` (CPU in low-VRAM mode)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.io.modules import rebuild_position_ids
    from engine.sdxl.models.loading import SDXL_VAE_SCALING_FACTOR, SDXLComponents

    tokenizer, tokenizer_2 = clip_tokenizers(assets)
    configs = model_configs(kind, tiny=tiny, vocab_size=len(tokenizer.get_vocab()))
    init_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    modules: dict[str, Any] = {}
    with torch.device(init_device):
        modules["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        modules["vae"] = AutoencoderKL.from_config(configs["vae"])
        modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        if kind == "base":
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    for module in modules.values():
        if dtype != torch.float32:  # (diffusers logs a spurious warning for .to(float32))
            module.to(dtype=dtype)
        module.to(device).eval().requires_grad_(False)
        rebuild_position_ids(module)
    return SDXLComponents(
        unet=modules["unet"], vae=modules["vae"], text_encoder=modules.get("text_encoder"),
        text_encoder_2=modules["text_encoder_2"], tokenizer=tokenizer if kind == "base" else None,
        tokenizer_2=tokenizer_2, kind=kind, name=f"random-{kind}", source="bench", dtype=dtype,  # type: ignore[arg-type]
        device=torch.device(device), is_demo=False, vae_scaling_factor=SDXL_VAE_SCALING_FACTOR)


def install_random_loader(*, tiny: bool, assets: Path | None) -> None:
    """Make the runner load random full-size (or tiny) models for any model name."""
    import engine.sdxl.pipeline

    def load_random(spec: Any, *, kind: str = "base", device: Any = "cpu", dtype: Any = None, **_: Any) -> Any:
        return random_components(kind, device=device, dtype=dtype, tiny=tiny, assets=assets)

    engine.sdxl.pipeline.load_sdxl = load_random  # type: ignore[assignment]


def write_expansion_dir(folder: Path, *, tiny: bool, assets: Path | None) -> Path | None:
    """A Fooocus V2 expansion folder with random GPT-2 weights (small: 124M; tiny: 2 layers)."""
    if assets is None or not (assets / "gpt2_tokenizer").is_dir():
        return None
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    for path in (assets / "gpt2_tokenizer").iterdir():
        if path.name != "config.json":
            shutil.copy(path, folder / path.name)
    shutil.copy(assets / "prompt_expansion" / "positive.txt", folder / "positive.txt")
    if tiny:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=256, pad_token_id=50256)
    else:
        config = GPT2Config.from_json_file(str(assets / "gpt2_tokenizer" / "config.json"))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPT2LMHeadModel(config)
    model.to(torch.float16 if torch.cuda.is_available() else torch.float32).save_pretrained(folder)
    return folder


# -- FLOPs ------------------------------------------------------------------------------------------


def unet_flops(config: dict[str, Any], *, batch: int, height: int, width: int, context_tokens: int) -> int:
    """FLOPs of one UNet forward, counted on the meta device (2 per multiply-add)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with torch.device(meta):
        unet = UNet2DConditionModel.from_config(config).to(torch.bfloat16)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    args = (torch.empty(batch, 4, height, width, device=meta, dtype=torch.bfloat16), torch.ones(batch, device=meta))
    kwargs = {"encoder_hidden_states": torch.empty(batch, context_tokens, config["cross_attention_dim"], device=meta,
                                                   dtype=torch.bfloat16),
              "added_cond_kwargs": {"text_embeds": torch.empty(batch, pooled, device=meta, dtype=torch.bfloat16),
                                    "time_ids": torch.empty(batch, 6, device=meta, dtype=torch.bfloat16)},
              "return_dict": False}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*args, **kwargs)
    return int(counter.get_total_flops())


# -- stock diffusers (this process) ---------------------------------------------------------------


def stock_pipeline(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from engine.sdxl.models.configs import scheduler_config

    c = random_components("base", device=device, dtype=dtype, tiny=args.tiny, assets=args.assets)
    pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                     tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                     scheduler=EulerDiscreteScheduler.from_config(scheduler_config()),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_stock(pipe: Any, args: argparse.Namespace) -> Any:
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size,
                num_inference_steps=args.steps, guidance_scale=5.0, output_type="pil", generator=generator).images[0]


def case_stock_eager(pipe: Any, args: argparse.Namespace, results: Results) -> None:
    log("(1) stock diffusers, eager ...")
    reset_peak(args.device)
    timing = timed_runs(lambda: run_stock(pipe, args), args.device, runs=args.runs, warmup=1)
    results.case("diffusers_stock_e2e_s", timing["median_s"], peak_gib=peak_gib(args.device), **timing)
    log(f"(1) {timing['median_s']:.3f} s")


def case_stock_compiled(pipe: Any, args: argparse.Namespace, results: Results) -> None:
    import torch
    import torch._inductor.config as inductor_config

    log(f"(2) stock diffusers + fused QKV + channels_last + compile ({args.compile_mode}, {args.compile_backend}) ...")
    inductor_config.conv_1x1_as_mm = True
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    mode = None if args.compile_mode == "default" or args.compile_backend != "inductor" else args.compile_mode
    pipe.unet = torch.compile(pipe.unet, mode=mode, backend=args.compile_backend, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, backend=args.compile_backend, fullgraph=True)
    reset_peak(args.device)
    start = time.perf_counter()
    run_stock(pipe, args)
    sync(args.device)
    first = time.perf_counter() - start
    timing = timed_runs(lambda: run_stock(pipe, args), args.device, runs=args.runs, warmup=1)
    results.case("diffusers_compiled_e2e_s", timing["median_s"], peak_gib=peak_gib(args.device),
                 first_call_s=round(first, 3), **timing)
    log(f"(2) {timing['median_s']:.3f} s (first call {first:.1f} s)")


# -- our engine (child processes) -----------------------------------------------------------------


def engine_request(args: argparse.Namespace, *, refiner: bool = False, seed: int = 1234) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "styles": STYLES, "performance": "Speed",
                               "width": args.size, "height": args.size, "seed": seed, "image_number": 1}
    if args.steps != 30:
        request["steps"] = args.steps
    if refiner:
        request.update(refiner_model="demo-refiner", refiner_switch=0.8)
    return request


def run_job(engine: Any, request: dict[str, Any]) -> float:
    """Submit → Done, seconds; raises if the job did not finish with an image."""
    from engine.core.events import ImageReady

    start = time.perf_counter()
    job = engine.submit(request)
    if not job.wait(1800):
        raise TimeoutError("job did not finish")
    elapsed = time.perf_counter() - start
    if not any(isinstance(e, ImageReady) for e in job.events_after(0)):
        raise RuntimeError(f"job ended without an image: {job.info()}")
    return elapsed


def build_runner(args: argparse.Namespace, *, low_vram: bool = False) -> Any:
    from engine.core.settings import Settings
    from engine.sdxl.acceleration import Accelerator
    from engine.sdxl.pipeline import SDXLRunner

    install_random_loader(tiny=args.tiny, assets=args.assets)
    settings = Settings(data_dir=Path(args.data_dir), device=str(args.device), dtype=args.dtype,
                        compile=args.compile_backend != "none", low_vram=low_vram,
                        expansion_dir=Path(args.data_dir) / "expansion")
    runner = SDXLRunner(settings, model="bench-random")
    config = dataclasses.replace(runner.accelerator.config, compile_policy="blocking", compile_ahead_latents=(),
                                 compile_mode=None if args.compile_mode == "default" else args.compile_mode,
                                 compile_backend=args.compile_backend if args.compile_backend != "none" else "inductor")
    runner.accelerator = Accelerator(config)
    return runner


def graphs_compiled() -> int:
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def child_main(args: argparse.Namespace) -> int:
    import torch

    from engine import Engine

    results = Results(Path(args.child_out), {"cases": {}, "details": {}})
    deadline = args.deadline_epoch
    if args.child == "flux":
        flux_child(args, results)
        return 0

    def time_left() -> float:
        return deadline - time.time()

    runner = build_runner(args, low_vram=args.child == "lowvram")
    engine = Engine(runner, max_queue=4).start()
    device = args.device
    try:
        if args.child in ("cold", "warm"):
            with guarded(results, f"{args.child} start"):
                reset_peak(device)
                run_job(engine, engine_request(args))
                key = "cold_start_s" if args.child == "cold" else "warm_start_s"
                results.case(key, time.time() - args.spawn_epoch, compiled_graphs=graphs_compiled())
                log(f"{key}: {time.time() - args.spawn_epoch:.1f} s")
        if args.child == "cold":
            child_cold_cases(args, runner, engine, results, time_left)
        elif args.child == "warm":
            with guarded(results, "refiner"):
                if time_left() < args.refiner_cost_s:
                    raise TimeoutError(f"skipped: {time_left():.0f} s left")
                config = runner.accelerator.config
                runner.accelerator.config = dataclasses.replace(config, compile=config.compile and args.compile_refiner)
                request = engine_request(args, refiner=True)
                run_job(engine, request)  # loads the refiner
                reset_peak(device)
                times = [run_job(engine, engine_request(args, refiner=True, seed=s)) for s in range(args.runs)]
                results.case("hooocus_refiner_e2e_s", statistics.median(times), runs_s=times,
                             peak_gib=peak_gib(device), refiner_compiled=args.compile_refiner)
            with guarded(results, "model switch"):
                if time_left() < args.refiner_cost_s:  # three base loads, no sampling
                    raise TimeoutError(f"skipped: {time_left():.0f} s left")
                case_model_switch(runner, device, results)
        elif args.child == "lowvram":
            with guarded(results, "lowvram"):
                run_job(engine, engine_request(args))  # warm-up: pins weights, records the block order
                reset_peak(device)
                times = [run_job(engine, engine_request(args, seed=s)) for s in range(max(1, args.runs - 1))]
                applied = runner.accelerator.acceleration(runner.base_components)
                results.case("lowvram_e2e_s", statistics.median(times), runs_s=times)
                results.case("lowvram_peak_gib", peak_gib(device),
                             resident_unet_gib=round(applied.resident_unet_bytes / GIB, 3) if applied else None,
                             streamed_unet_gib=round(applied.streamed_bytes / GIB, 3) if applied else None)
    finally:
        engine.close(grace_s=0.0)
        del runner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def case_model_switch(runner: Any, device: Any, results: Results) -> None:
    """Issue 15: what switching base models leaves allocated. With a model budget for one, A -> B
    evicts A (the allocation stays at one model); with room for two both stay; unload_models frees
    all. torch.cuda.memory_allocated above the floor (on CPU, tiny: the model cache's own count)."""
    import torch

    def allocated() -> int:
        gc.collect()
        sync(device)
        if torch.device(device).type == "cuda":
            return int(torch.cuda.memory_allocated(device))
        return runner.models.used_bytes

    with torch.inference_mode():
        runner.unload_models()
        floor = allocated()
        runner._load_base("bench-random", vae=None)
        one_model = runner.models.used_bytes
        with_a = allocated() - floor
        runner.models.budget_bytes = int(1.5 * one_model)  # room for one: B evicts A
        runner._load_base("bench-random-b", vae=None)
        after_switch = allocated() - floor
        runner.models.budget_bytes = int(2.5 * one_model)  # room for two: A comes back, B stays
        runner._load_base("bench-random", vae=None)
        both = allocated() - floor
        evictions = runner.models.stats().evictions
        runner.unload_models()
        after_unload = allocated() - floor
    results.case("model_switch_gib", after_switch / GIB, one_model_gib=round(with_a / GIB, 4),
                 both_cached_gib=round(both / GIB, 4), after_unload_gib=round(after_unload / GIB, 4),
                 cache_model_gib=round(one_model / GIB, 4), evictions=evictions)
    log(f"model switch: one model {with_a / GIB:.3f} GiB, after A->B {after_switch / GIB:.3f}, both "
        f"{both / GIB:.3f}, after unload {after_unload / GIB:.3f}")


def child_cold_cases(args: argparse.Namespace, runner: Any, engine: Any, results: Results,
                     time_left: Callable[[], float]) -> None:
    import torch

    device = args.device
    with guarded(results, "hooocus e2e"):
        before = graphs_compiled()
        reset_peak(device)
        times = [run_job(engine, engine_request(args, seed=s)) for s in range(args.runs)]
        applied = runner.accelerator.acceleration(runner.base_components)
        calls = {name: {"compiled": c.compiled_calls, "eager": c.eager_calls} for name, c in
                 (applied.compiled.items() if applied else [])}
        results.case("hooocus_e2e_s", statistics.median(times), runs_s=times, calls=calls,
                     recompiles_between_images=graphs_compiled() - before,
                     fused_attention_layers=applied.fused_attention_layers if applied else 0)
        results.case("peak_gib", peak_gib(device))
        log(f"(3) hooocus e2e {statistics.median(times):.3f} s")
    with guarded(results, "hooocus eager e2e"):
        with runner.accelerator.eager():
            times = [run_job(engine, engine_request(args, seed=s)) for s in range(max(1, args.runs - 1))]
        results.detail("hooocus_e2e_s", eager_median_s=statistics.median(times), eager_runs_s=times)
    with guarded(results, "png encode"):
        import numpy as np

        from engine.io.imageio import encode_image

        rgb = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        timing = timed_runs(lambda: encode_image(rgb, fmt="png", parameters="x"), "cpu", runs=3, warmup=0)
        results.detail("hooocus_e2e_s", png_encode_noise_s=timing["median_s"])
    with guarded(results, "unet"):
        unet = runner.base_components.unet
        config = dict(unet.config)
        latent = args.size // 8
        dtype = runner.base_components.dtype
        g = torch.Generator(device="cpu").manual_seed(0)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(device, dtype)

        before = graphs_compiled()
        with torch.inference_mode():  # inference tensors, as the pipeline passes (else dynamo recompiles)
            sample_args = (rand(2, 4, latent, latent), torch.full((2,), 500, dtype=torch.long, device=device))
            kwargs = {"encoder_hidden_states": rand(2, 77, config["cross_attention_dim"]),
                      "added_cond_kwargs": {"text_embeds": rand(2, pooled), "time_ids": rand(2, 6)},
                      "return_dict": False}
            timing = timed_runs(lambda: unet(*sample_args, **kwargs), device, runs=args.unet_iters, warmup=3)
        timing["recompiles"] = graphs_compiled() - before
        flops = unet_flops(config, batch=2, height=latent, width=latent, context_tokens=77)
        tflops = flops / timing["median_s"] / 1e12
        results.case("hooocus_unet_tflops", tflops, flops=flops, fraction_of_790=round(tflops / PEAK_BF16_TFLOPS, 4),
                     **timing)
        log(f"(5) UNet {timing['median_s'] * 1e3:.2f} ms, {tflops:.1f} TFLOP/s")
    with guarded(results, "expansion"):
        case_expansion(args, runner, results)


def expansion_prompt(tokenizer: Any, prompt_tokens: int) -> str:
    """A prompt whose text + ',' is exactly ``prompt_tokens`` GPT-2 tokens (so 75 − that are new)."""
    words = "a majestic lighthouse on a rocky cliff at dusk with crashing waves under a purple sky and seagulls".split()
    for count in range(1, len(words) + 1):
        text = " ".join(words[:count])
        if len(tokenizer(text + ",")["input_ids"]) >= prompt_tokens:
            return text
    return " ".join(words)


def case_expansion(args: argparse.Namespace, runner: Any, results: Results) -> None:
    import torch

    from engine.prompts.expansion import expansion_token_budget, load_expansion
    from engine.sdxl.acceleration import fast_expansion

    folder = Path(args.data_dir) / "expansion"
    if not folder.is_dir():
        raise FileNotFoundError("no expansion assets (--assets): case skipped")
    dtype = torch.float16 if torch.device(args.device).type == "cuda" else torch.float32
    eager, _ = load_expansion(folder, device=args.device, dtype=dtype)
    fast, _ = load_expansion(folder, device=args.device, dtype=dtype)
    fast = fast_expansion(fast)  # what the runner does on CUDA (static KV cache; compiled decode there)
    prompt = expansion_prompt(eager.tokenizer, 75 - EXPANSION_NEW_TOKENS)
    new_tokens = expansion_token_budget(len(eager.prepare(prompt).input_ids))
    timing = timed_runs(lambda: fast(prompt, 7), args.device, runs=args.runs, warmup=2)
    eager_timing = timed_runs(lambda: eager(prompt, 7), args.device, runs=args.runs, warmup=1)
    same = all(fast(prompt, seed) == eager(prompt, seed) for seed in ((1,) if args.tiny else (1, 2, 3)))
    results.case("expansion_60tok_s", timing["median_s"], new_tokens=new_tokens, same_text_as_eager=same,
                 eager_median_s=eager_timing["median_s"], **timing)
    log(f"(6) expansion {new_tokens} tokens: {timing['median_s'] * 1e3:.1f} ms (eager "
        f"{eager_timing['median_s'] * 1e3:.1f} ms), same text as eager: {same}")


def spawn_child(kind: str, args: argparse.Namespace, results: Results, *, budget_s: float) -> None:
    """Run one child case-set; merge its cases into ``results`` (also after a timeout)."""
    child_out = Path(args.data_dir) / f"child-{kind}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-out", str(child_out),
               "--data-dir", args.data_dir, "--deadline-epoch", str(time.time() + budget_s - 5)]
    command += args.forward
    log(f"child '{kind}' (budget {budget_s:.0f} s) ...")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spawn = time.time()
    command += ["--spawn-epoch", str(spawn)]
    try:
        subprocess.run(command, env=env, timeout=max(10.0, budget_s), check=False)
    except subprocess.TimeoutExpired:
        results.note("errors", f"child {kind}: killed after {budget_s:.0f} s")
    if child_out.is_file():
        data = json.loads(child_out.read_text())
        for key, value in data.get("cases", {}).items():
            results.case(key, value, **data.get("details", {}).get(key, {}))
        for kind_ in ("errors", "skipped"):
            for text in data.get(kind_, []):
                results.note(kind_, f"child {kind}: {text}")
    else:
        results.note("errors", f"child {kind}: wrote no results")


# -- FLUX.1 (issue 17): the "flux" child -------------------------------------------------------------


def flux_tokenizers(assets: Path | None) -> tuple[Any, Any]:
    """(CLIP, T5) tokenizers without downloads. The T5 one is a small unigram vocabulary: both pipelines pad
    the T5 input to its fixed length (256/512 tokens), so the cost does not depend on the vocabulary."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Tokenizer

    clip, _ = clip_tokenizers(assets)
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *string.ascii_lowercase, *string.digits,
              *("\u2581" + c for c in string.ascii_lowercase)]
    unigram = Tokenizer(models.Unigram([(p, -1.0 if p.startswith("\u2581") else -2.0) for p in pieces], unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    t5 = T5Tokenizer(tokenizer_object=unigram, extra_ids=0, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return clip, t5


def flux_configs(*, tiny: bool, clip_vocab: int) -> dict[str, dict[str, Any]]:
    """Full size: the FLUX.1 [dev] configs bundled in engine/flux/configs. Tiny: CPU-sized ones, with FLUX.1's
    16 latent channels (the preview factors are per channel)."""
    from engine.flux.configs import bundled_config

    if tiny:
        return {"transformer": {"in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
                                "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 24,
                                "guidance_embeds": True, "axes_dims_rope": [2, 2, 4]},
                "vae": {"latent_channels": 16, "block_out_channels": [8, 16], "layers_per_block": 1,
                        "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
                        "up_block_types": ["UpDecoderBlock2D"] * 2, "use_quant_conv": False,
                        "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159},
                "text_encoder": {"vocab_size": clip_vocab, "hidden_size": 24, "intermediate_size": 48,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 24},
                "text_encoder_2": {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 1,
                                   "num_heads": 2, "feed_forward_proj": "gated-gelu", "is_gated_act": True}}
    configs = {part: bundled_config(part, "dev") for part in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    configs["text_encoder"]["vocab_size"] = max(clip_vocab, configs["text_encoder"]["vocab_size"])
    return configs


def flux_random_components(args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, Any]:
    """FLUX.1 [dev] and [schnell] with random weights, initialised on the GPU in ``dtype`` when there is one
    (12B + 4.7B parameters: seconds there), then moved to ``device`` (CPU for the offload cases). The schnell
    transformer shares every tensor with dev's except the guidance embedder (it has none), so both fit."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine.flux.components import FluxComponents
    from engine.flux.configs import bundled_config

    tokenizer, tokenizer_2 = flux_tokenizers(args.assets)
    configs = flux_configs(tiny=args.tiny, clip_vocab=len(tokenizer.get_vocab()))
    init_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: a float32 build of 17B parameters needs 68 GB
    try:
        with torch.device(init_device):
            dev = FluxTransformer2DModel.from_config(configs["transformer"])
            vae = AutoencoderKL.from_config(configs["vae"])
            clip = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
            t5 = T5EncoderModel(T5Config.from_dict(configs["text_encoder_2"]))
        with torch.device("meta"):
            schnell = FluxTransformer2DModel.from_config({**configs["transformer"], "guidance_embeds": False})
    finally:
        torch.set_default_dtype(previous)
    schnell.load_state_dict({k: v for k, v in dev.state_dict().items() if "guidance_embedder" not in k},
                            assign=True)
    for module in (dev, schnell, vae, clip, t5):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for buffer_owner in clip.modules():  # a non-persistent buffer is not moved by dtype; rebuild it on its device
        if "position_ids" in buffer_owner._buffers:
            ids = buffer_owner._buffers["position_ids"]
            buffer_owner._buffers["position_ids"] = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape)
    out = {}
    for variant, transformer in (("dev", dev), ("schnell", schnell)):
        out[variant] = FluxComponents(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                                      text_encoder_2=t5, tokenizer_2=tokenizer_2,
                                      scheduler_config=bundled_config("scheduler", variant),  # type: ignore[arg-type]
                                      variant=variant, name=f"bench-flux-{variant}")  # type: ignore[arg-type]
    return out


def flux_stock_pipeline(components: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config),
                        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                        text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
                        transformer=components.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_steps(args: argparse.Namespace, variant: str) -> int:
    return 2 if args.tiny else FLUX_STEPS[variant]


def run_flux_stock(pipe: Any, args: argparse.Namespace, variant: str) -> Any:
    import torch

    return pipe(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=flux_steps(args, variant),
                guidance_scale=FLUX_GUIDANCE, max_sequence_length=FLUX_MAX_SEQUENCE[variant], output_type="pil",
                generator=torch.Generator("cpu").manual_seed(0)).images[0]


def flux_request(args: argparse.Namespace, variant: str, seed: int = 1234) -> dict[str, Any]:
    """The same work as the stock call: no styles (no expansion), one image, the variant's steps."""
    return {"prompt": PROMPT, "styles": [], "width": args.size, "height": args.size, "seed": seed,
            "image_number": 1, "steps": flux_steps(args, variant)}


def flux_engine(args: argparse.Namespace, components: Any, *, low_vram: bool = False) -> Any:
    """Our Flux runner (``engine.flux.runner.FluxRunner``) on ``components`` behind an ``Engine``; None when
    this build has no Flux runner (the loader and the runner are separate parts of issue 17)."""
    import importlib.util

    if importlib.util.find_spec("engine.flux.runner") is None:
        return None
    from engine import Engine
    from engine.core.settings import Settings
    from engine.flux.runner import FluxRunner

    settings = Settings(data_dir=Path(args.data_dir), device=str(args.device), dtype=args.dtype, low_vram=low_vram,
                        expansion_dir=Path(args.data_dir) / "expansion")
    return Engine(FluxRunner(settings, components=components), max_queue=4).start()


def _remove_low_vram_hooks(components: Any) -> None:
    import importlib.util

    if importlib.util.find_spec("engine.flux.lowvram") is not None:
        from engine.flux.lowvram import remove_flux_low_vram

        remove_flux_low_vram(components)


def flux_child(args: argparse.Namespace, results: Results) -> None:
    """Stock FluxPipeline, then ours, on the same random modules; then both with the weights on the CPU."""
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    components = flux_random_components(args, device, dtype)
    for variant in ("dev", "schnell"):
        with guarded(results, f"flux stock {variant}"):
            pipe = flux_stock_pipeline(components[variant])
            reset_peak(device)
            timing = timed_runs(lambda p=pipe, v=variant: run_flux_stock(p, args, v), device, runs=args.runs,
                                warmup=1)
            results.case(f"flux_stock_{variant}_e2e_s", timing["median_s"], peak_gib=peak_gib(device), **timing)
            log(f"flux stock {variant}: {timing['median_s']:.3f} s")
    peaks = []
    for variant in ("dev", "schnell"):
        with guarded(results, f"flux hooocus {variant}"):
            engine = flux_engine(args, components[variant])
            if engine is None:
                results.note("skipped", f"flux_hooocus_{variant}_e2e_s: no engine.flux.runner in this build")
                continue
            try:
                run_job(engine, flux_request(args, variant))  # warm-up (text cache of another seed is fine)
                reset_peak(device)
                times = [run_job(engine, flux_request(args, variant, seed=s)) for s in range(args.runs)]
                peaks.append(peak_gib(device))
                results.case(f"flux_hooocus_{variant}_e2e_s", statistics.median(times), runs_s=times,
                             peak_gib=peaks[-1])
                log(f"flux hooocus {variant}: {statistics.median(times):.3f} s")
            finally:
                engine.close(grace_s=0.0)
    if peaks:
        results.case("flux_peak_gib", max(peaks))
    # Low VRAM: move the weights to the CPU; the stock reference is diffusers' model CPU offload.
    for module in {id(m): m for c in components.values() for m in (c.transformer, c.vae, c.text_encoder,
                                                                    c.text_encoder_2)}.values():
        module.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Ours in low-VRAM mode (engine/flux/lowvram.py): diffusers' group offloading, one transformer / T5
    # block on the GPU at a time, CLIP-L whole, the VAE per layer; the peak is what a 24 GB card must hold.
    with guarded(results, "flux hooocus low vram"):
        engine = flux_engine(args, components["dev"], low_vram=True)
        if engine is None:
            results.note("skipped", "flux_lowvram_e2e_s: no engine.flux.runner in this build")
        else:
            try:
                run_job(engine, flux_request(args, "dev"))
                reset_peak(device)
                times = [run_job(engine, flux_request(args, "dev", seed=s)) for s in range(max(1, args.runs - 1))]
                results.case("flux_lowvram_e2e_s", statistics.median(times), runs_s=times)
                results.case("flux_lowvram_peak_gib", peak_gib(device))
            finally:
                engine.close(grace_s=0.0)
                _remove_low_vram_hooks(components["dev"])  # diffusers' model offload below refuses hooked modules
    # Last: diffusers' offload hooks stay on the modules.
    if device.type != "cuda":
        results.note("skipped", "flux_stock_offload_e2e_s: model CPU offload needs an accelerator")
        return
    with guarded(results, "flux stock offload"):
        pipe = flux_stock_pipeline(components["dev"])
        pipe.enable_model_cpu_offload(device=device)
        reset_peak(device)
        timing = timed_runs(lambda: run_flux_stock(pipe, args, "dev"), device, runs=1, warmup=1)
        results.case("flux_stock_offload_e2e_s", timing["median_s"], **timing)
        results.case("flux_stock_offload_peak_gib", peak_gib(device))


# -- CPU orchestration overhead (a number for the report, not a goal) -----------------------------


def cpu_overhead(args: argparse.Namespace) -> None:
    """Demo model on CPU: engine job (tricks on / off) vs the same number of UNet calls in a loop."""
    import torch

    from engine import Engine
    from engine.core.settings import Settings
    from engine.sdxl.pipeline import SDXLRunner

    torch.set_num_threads(1)
    steps, size = 30, 64
    with tempfile.TemporaryDirectory() as tmp:
        runner = SDXLRunner(Settings(data_dir=Path(tmp), device="cpu"), model="demo")
        with Engine(runner, max_queue=4) as engine:
            base = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": size, "height": size, "steps": steps,
                    "seed": 3}
            on = {**base, "styles": ["Hooocus Sharp", "Hooocus Cinematic"]}
            off = {**base, "styles": [], "sharpness": 0.0, "adaptive_cfg": 4.0, "adm_scaler_positive": 1.0,
                   "adm_scaler_negative": 1.0, "adm_scaler_end": 0.0}
            run_job(engine, on)
            t_on = statistics.median(run_job(engine, on) for _ in range(3))
            t_off = statistics.median(run_job(engine, off) for _ in range(3))
            unet = runner.base_components.unet
            latent = size // 8
            x = torch.randn(2, 4, latent, latent)
            kwargs = {"encoder_hidden_states": torch.randn(2, 77, 64),
                      "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)},
                      "return_dict": False}
            with torch.inference_mode():
                loop = timed_runs(lambda: [unet(x, torch.full((2,), 500.0), **kwargs) for _ in range(steps)], "cpu",
                                  runs=3, warmup=1)["median_s"]
    print(json.dumps({"steps": steps, "size": size, "engine_tricks_on_s": round(t_on, 4),
                      "engine_tricks_off_s": round(t_off, 4), "plain_unet_loop_s": round(loop, 4),
                      "overhead_ms_per_step_on": round((t_on - loop) / steps * 1e3, 2),
                      "overhead_ms_per_step_off": round((t_off - loop) / steps * 1e3, 2),
                      "tricks_ms_per_step": round((t_on - t_off) / steps * 1e3, 2)}))


# -- summary ----------------------------------------------------------------------------------------


def ratios(cases: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> float | None:
        x, y = cases.get(a), cases.get(b)
        return round(x / y, 4) if x and y else None

    out = {"hooocus_vs_stock (goal <= 0.45, stretch 0.35)": ratio("hooocus_e2e_s", "diffusers_stock_e2e_s"),
           "hooocus_vs_compiled (goal <= 0.85)": ratio("hooocus_e2e_s", "diffusers_compiled_e2e_s"),
           "lowvram_vs_resident (goal <= 3)": ratio("lowvram_e2e_s", "hooocus_e2e_s")}
    tflops = cases.get("hooocus_unet_tflops")
    out["unet_fraction_of_790 (goal >= 0.60)"] = round(tflops / PEAK_BF16_TFLOPS, 4) if tflops else None
    out["flux_dev_hooocus_vs_stock"] = ratio("flux_hooocus_dev_e2e_s", "flux_stock_dev_e2e_s")
    out["flux_schnell_hooocus_vs_stock"] = ratio("flux_hooocus_schnell_e2e_s", "flux_stock_schnell_e2e_s")
    return out


def print_table(data: dict[str, Any]) -> None:
    cases, details = data.get("cases", {}), data.get("details", {})
    lines = ["", "=" * 86, f"Hooocus GPU benchmark on {data.get('gpu')} | torch {data.get('torch')} | diffusers "
             f"{data.get('diffusers')} | {data.get('size')}², {data.get('steps')} steps"
             + (" | TINY (CPU smoke run)" if data.get("tiny") else ""), "-" * 86,
             f"{'case':30s} {'median':>12s} {'peak GiB':>9s}  note"]
    for key in CASE_KEYS + FLUX_CASE_KEYS:
        value = cases.get(key)
        peak = details.get(key, {}).get("peak_gib")
        note = ""
        extra = details.get(key, {})
        if key == "diffusers_compiled_e2e_s" and "first_call_s" in extra:
            note = f"first call {extra['first_call_s']:.1f} s"
        if key == "hooocus_e2e_s" and "eager_median_s" in extra:
            note = f"eager {extra['eager_median_s']:.3f} s, recompiles {extra.get('recompiles_between_images')}"
        if key == "expansion_60tok_s" and "eager_median_s" in extra:
            note = f"eager {extra['eager_median_s']:.3f} s, same text {extra.get('same_text_as_eager')}"
        shown = "—" if value is None else f"{value:12.4f}"
        lines.append(f"{key:30s} {shown:>12s} {'' if peak is None else f'{peak:9.2f}':>9s}  {note}")
    lines.append("-" * 86)
    for name, value in data.get("ratios", {}).items():
        lines.append(f"{name:52s} {'—' if value is None else value}")
    for text in data.get("skipped", []):
        lines.append("skipped: " + text)
    for text in data.get("errors", []):
        lines.append("ERROR: " + text.strip().splitlines()[-1][:160])
    lines.append("=" * 86)
    print("\n".join(lines), flush=True)


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64 px, 2 steps, CPU: a smoke run")
    parser.add_argument("--cpu-overhead", action="store_true", help="demo-model orchestration overhead on CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (Speed), tiny 2")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 3, tiny 1)")
    parser.add_argument("--unet-iters", type=int, default=None)
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        choices=["reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--compile-backend", default=None,
                        help="inductor (GPU default) | eager (tiny default: dynamo only) | none (no compile)")
    parser.add_argument("--compile-refiner", action="store_true", help="also compile the refiner UNet (+~100 s)")
    parser.add_argument("--assets", type=Path, default=None, help="tokenizers + positive.txt (see docstring)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=540.0, help="soft budget: later cases are skipped")
    parser.add_argument("--hard-deadline-s", type=float, default=585.0, help="watchdog: write and exit")
    parser.add_argument("--skip", default="", help="comma list of: stock,compiled,cold,warm,lowvram,flux")
    # internal: child processes
    parser.add_argument("--child", choices=["cold", "warm", "lowvram", "flux"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--deadline-epoch", type=float, default=float("inf"), help=argparse.SUPPRESS)
    parser.add_argument("--spawn-epoch", type=float, default=SPAWN_EPOCH, help=argparse.SUPPRESS)
    parser.add_argument("--refiner-cost-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.runs = args.runs or (1 if args.tiny else 3)
    args.unet_iters = args.unet_iters or (2 if args.tiny else 20)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    args.assets = args.assets or default_assets()
    args.refiner_cost_s = args.refiner_cost_s if args.refiner_cost_s is not None else (5.0 if args.tiny else 45.0)
    args.forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.forward = strip_internal(args.forward) + (["--assets", str(args.assets)] if args.assets and
                                                   "--assets" not in args.forward else [])
    return args


def strip_internal(argv: list[str]) -> list[str]:
    internal = {"--child", "--child-out", "--data-dir", "--deadline-epoch", "--spawn-epoch", "--out-dir",
                "--budget-s", "--hard-deadline-s", "--skip"}
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in internal:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_overhead:
        cpu_overhead(args)
        return 0
    if args.child:
        return child_main(args)
    import diffusers
    import torch
    import transformers

    gpu = gpu_name(args.device)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ("-tiny" if args.tiny else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = Results(args.out_dir / f"{stamp}-{slug}.json", {
        "gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "tiny": args.tiny,
        "size": args.size, "steps": args.steps, "dtype": args.dtype, "runs": args.runs,
        "compile_mode": args.compile_mode, "compile_backend": args.compile_backend,
        "assets": str(args.assets) if args.assets else None, "argv": sys.argv[1:] if argv is None else argv,
        "cases": dict.fromkeys(CASE_KEYS + FLUX_CASE_KEYS), "details": {}, "skipped": [], "errors": []})
    if args.assets is None:
        results.note("skipped", "no --assets: demo tokenizer, no Fooocus V2 expansion (expansion case skipped)")
    skip = set(filter(None, args.skip.split(",")))
    watchdog = threading.Timer(args.hard_deadline_s, lambda: (results.note("errors", "watchdog: hard deadline"),
                                                              finish(results), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()

    def left() -> float:
        return args.budget_s - (time.time() - SPAWN_EPOCH)

    with tempfile.TemporaryDirectory(prefix="hooocus-bench-") as tmp:
        args.data_dir = tmp
        # a fresh compile cache for this process too, so stock compile times are cold as well
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "stock_inductor_cache")
        write_expansion_dir(Path(tmp) / "expansion", tiny=args.tiny, assets=args.assets)
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        pipe = None
        if "stock" not in skip:
            with guarded(results, "stock"):
                pipe = stock_pipeline(args, device, dtype)
                case_stock_eager(pipe, args, results)
        # Our engine, cold compile cache: the case that matters most goes first.
        # FLUX.1 last: a full run does not leave it time; run it alone (--skip stock,compiled,cold,warm,lowvram).
        plan = [("cold", 0.55), ("compiled", 0.45), ("warm", 0.6), ("lowvram", 1.0 if "flux" in skip else 0.5),
                ("flux", 1.0)]
        for phase, share in plan:
            if phase in skip:
                results.note("skipped", f"{phase}: --skip")
                continue
            budget = left() * share
            minimum = 20.0 if args.tiny else {"cold": 120.0, "compiled": 110.0, "warm": 40.0, "lowvram": 40.0,
                                              "flux": 150.0}[phase]
            if budget < minimum:
                results.note("skipped", f"{phase}: {budget:.0f} s of budget left, needs ~{minimum:.0f} s")
                continue
            if phase == "compiled":
                if pipe is None or args.compile_backend == "none":
                    results.note("skipped", "compiled: no stock pipeline or --compile-backend none")
                    continue
                with guarded(results, "stock compiled"):
                    case_stock_compiled(pipe, args, results)
                pipe = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                spawn_child(phase, args, results, budget_s=budget)
        watchdog.cancel()
        finish(results)
    return 0


def finish(results: Results) -> None:
    results.data["ratios"] = ratios(results.data.get("cases", {}))
    results.data["elapsed_s"] = round(time.time() - SPAWN_EPOCH, 1)
    results.write()
    out = os.environ.get("OUT")
    if out and results.path is not None:
        shutil.copy(results.path, Path(out) / results.path.name)
    print_table(results.data)
    if results.path is not None:
        print(f"results: {results.path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
