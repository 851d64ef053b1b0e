"""Every fast path of engine/sdxl/acceleration/ against the eager path, on CPU with the demo model.

Tolerances (float32 on CPU): fused QKV and channels_last ≤ 1e-5 relative to the output's largest
magnitude (same math, other GEMM/conv blocking); dynamo-only compile ("eager"/CompileCounter
backends) and low-VRAM streaming are bit-exact (the same kernels run); the compile-friendly
guidance ≤ 1e-5 relative (device-side progress/alpha may round one ulp apart); inductor
(@slow) ≤ 1e-4 relative; the static-cache expansion gives the very same tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from engine.core.settings import Settings
from engine.sdxl.acceleration import (
    AccelerationConfig,
    Accelerator,
    CompiledCall,
    StaticCacheGenerator,
    compiled_guidance,
    fuse_qkv_views,
    latent_size,
    plan_streaming,
    stream_units,
    to_channels_last,
    use_sdpa,
)
from engine.sdxl.models.demo import build_demo_sdxl
from engine.sdxl.sampling.guidance import guidance_tensors, sharpness_sampling_function
from tests.paths import STAND_IN_POSITIVE_WORDS, fooocus_data_dir

CPU = torch.device("cpu")


def unet_inputs(*, context_tokens: int = 77, height: int = 8, width: int = 8, batch: int = 2,
                seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=g)
    timestep = torch.full((batch,), 500.0)
    kwargs = {"encoder_hidden_states": torch.randn(batch, context_tokens, 64, generator=g),
              "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                    "time_ids": torch.randn(batch, 6, generator=g)},
              "return_dict": False}
    return (sample, timestep), kwargs


def run_unet(unet: torch.nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    args, kwargs = inputs
    with torch.inference_mode():
        return unet(*args, **kwargs)[0]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item()


@pytest.fixture
def demo():
    return build_demo_sdxl("base")


class ToyUNet(torch.nn.Module):
    """The UNet's calling convention in a few layers: fast to trace for the dispatcher tests."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.context = torch.nn.Linear(64, 8)
        self.block = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = True) -> tuple[torch.Tensor]:
        h = self.conv_in(sample) + timestep[:, None, None, None] * 1e-3
        h = h + self.context(encoder_hidden_states).mean(1)[:, :, None, None]
        h = h + added_cond_kwargs["time_ids"].mean(1)[:, None, None, None]
        return (self.conv_out(torch.nn.functional.silu(self.block(h))),)


# -- configuration -------------------------------------------------------------------------------


def test_config_from_settings(tmp_path: Path) -> None:
    cpu = AccelerationConfig.from_settings(Settings(data_dir=tmp_path), CPU)
    assert not (cpu.fuse_qkv or cpu.channels_last or cpu.compile or cpu.low_vram or cpu.fast_expansion)
    assert cpu.load_device == CPU
    cuda = AccelerationConfig.from_settings(Settings(data_dir=tmp_path, compile=True), torch.device("cuda"),
                                            compile_ahead=("1152*896",))
    assert cuda.fuse_qkv and cuda.channels_last and cuda.compile and cuda.fast_expansion
    assert cuda.cache_dir == tmp_path / "compile_cache" and cuda.compile_ahead_latents == ((112, 144),)
    low = AccelerationConfig.from_settings(Settings(data_dir=tmp_path, compile=True, low_vram=True),
                                           torch.device("cuda"))
    # streamed weights move between calls: no compile, no fused views
    assert low.low_vram and not low.compile and not low.fuse_qkv and low.load_device == CPU
    assert latent_size("1024*1024") == (128, 128)


# -- SDPA, fused QKV, channels_last ----------------------------------------------------------------


def test_sdpa_is_enforced(demo) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    inputs = unet_inputs()
    reference = run_unet(demo.unet, inputs)
    demo.unet.set_attn_processor(AttnProcessor())  # the eager softmax(QK^T)V path
    use_sdpa(demo)
    assert all(isinstance(p, AttnProcessor2_0) for p in demo.unet.attn_processors.values())
    assert demo.text_encoder_2.config._attn_implementation == "sdpa"
    assert_close_rel(run_unet(demo.unet, inputs), reference, 1e-5)


def test_fused_qkv_matches_and_shares_storage(demo) -> None:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    inputs = unet_inputs(context_tokens=154)
    reference = run_unet(demo.unet, inputs)
    fused = fuse_qkv_views(demo.unet)
    attentions = [m for m in demo.unet.modules() if isinstance(m, Attention)]
    assert fused == len(attentions) > 0
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in demo.unet.attn_processors.values())
    assert_close_rel(run_unet(demo.unet, inputs), reference, 1e-5)
    for attn in attentions:  # views, not copies: no extra memory
        whole = (attn.to_kv if attn.is_cross_attention else attn.to_qkv).weight
        assert attn.to_v.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_fused_qkv_sees_in_place_lora_writes(demo) -> None:
    unfused = copy.deepcopy(demo.unet)
    fuse_qkv_views(demo.unet)
    inputs = unet_inputs()
    before = run_unet(demo.unet, inputs)
    with torch.inference_mode():  # what merge_loras/restore do: param.copy_(new_value)
        for model in (unfused, demo.unet):
            for name, param in model.named_parameters():
                if name.endswith(("attn1.to_k.weight", "attn2.to_v.weight")):
                    param.copy_(param * 1.5 + 0.01)
    after = run_unet(demo.unet, inputs)
    assert (after - before).abs().max() > 1e-3  # the write reached the fused GEMM
    assert_close_rel(after, run_unet(unfused, inputs), 1e-5)


def test_channels_last_matches(demo) -> None:
    inputs = unet_inputs()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference_image = demo.vae.decode(latent, return_dict=False)[0]
    reference = run_unet(demo.unet, inputs)
    to_channels_last(demo.unet, demo.vae)
    assert demo.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(run_unet(demo.unet, inputs), reference, 1e-5)
    with torch.inference_mode():
        assert_close_rel(demo.vae.decode(latent, return_dict=False)[0], reference_image, 1e-5)


# -- compile dispatcher ----------------------------------------------------------------------------


def test_blocking_compile_one_graph_per_size_any_context_length(demo) -> None:
    counter = CompileCounter()
    reference = copy.deepcopy(demo.unet)
    call = CompiledCall(demo.unet, "forward", mode=None, backend=counter, policy="blocking",
                        dynamic={"encoder_hidden_states": 1})
    for tokens in (77, 154, 231, 77):  # prompts of 1, 2, 3 chunks: no recompile for one size
        inputs = unet_inputs(context_tokens=tokens, seed=tokens)
        assert torch.equal(run_unet(demo.unet, inputs), run_unet(reference, inputs))
    assert counter.frame_count == 1 and call.compiled_calls == 4 and call.eager_calls == 0
    run_unet(demo.unet, unet_inputs(height=16, width=8))
    assert counter.frame_count == 2 and len(call.compiled_keys) == 2
    call.remove()
    assert "forward" not in vars(demo.unet)
    run_unet(demo.unet, unet_inputs(height=8, width=16))
    assert counter.frame_count == 2


def test_background_compile_runs_eager_until_ready_and_compiles_ahead() -> None:
    counter = CompileCounter()
    unet = ToyUNet()
    reference = copy.deepcopy(unet)
    call = CompiledCall(unet, "forward", mode=None, backend=counter, policy="background",
                        dynamic={"encoder_hidden_states": 1})
    call.compile_ahead([(16, 8)])
    first = unet_inputs(seed=1)
    assert torch.equal(run_unet(unet, first), run_unet(reference, first))
    assert call.eager_calls == 1 and call.compiled_calls == 0  # the worker did not wait
    assert call.wait_idle(120)
    assert counter.frame_count == 2  # the job's size, then the one compiled ahead
    for inputs in (unet_inputs(seed=2, context_tokens=154), unet_inputs(seed=3, height=16, width=8)):
        assert torch.equal(run_unet(unet, inputs), run_unet(reference, inputs))
    assert call.eager_calls == 1 and counter.frame_count == 2 and call.compiled_calls >= 2


def test_background_compile_never_recompiles_on_the_worker() -> None:
    """A guard change the shape key cannot see (FreeU installs hooks) runs eager, hooks included,
    while the new graph compiles in the background (whose thread sees our dynamo config)."""
    counter = CompileCounter()
    unet = ToyUNet()
    reference = copy.deepcopy(unet)
    call = CompiledCall(unet, "forward", mode=None, backend=counter, policy="background",
                        dynamic={"encoder_hidden_states": 1})
    inputs = unet_inputs()
    run_unet(unet, inputs)
    call.wait_idle(120)
    run_unet(unet, inputs)
    assert counter.frame_count == 1 and call.compiled_calls == 2

    def scale_hidden(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * 1.1, *args[1:])

    for model in (unet, reference):
        model.block.register_forward_pre_hook(scale_hidden)
    eager_before = call.eager_calls
    assert torch.equal(run_unet(unet, inputs), run_unet(reference, inputs))
    assert call.eager_calls == eager_before + 1
    call.wait_idle(120)
    assert counter.frame_count == 2
    assert torch.equal(run_unet(unet, inputs), run_unet(reference, inputs))
    assert call.eager_calls == eager_before + 1


def test_compile_failure_falls_back_to_eager() -> None:
    def broken_backend(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("backend exploded")

    unet = ToyUNet()
    reference = copy.deepcopy(unet)
    call = CompiledCall(unet, "forward", mode=None, backend=broken_backend, policy="blocking",
                        dynamic={"encoder_hidden_states": 1})
    inputs = unet_inputs()
    assert torch.equal(run_unet(unet, inputs), run_unet(reference, inputs))
    assert call.failed_keys and call.eager_calls == 1
    run_unet(unet, inputs)
    assert call.eager_calls == 2  # not retried


@pytest.mark.slow
def test_inductor_unet_matches_eager(demo, tmp_path: Path) -> None:
    """Real inductor code generation (≈2 min cold on 2 CPU cores)."""
    from engine.sdxl.acceleration import configure_compile

    configure_compile(tmp_path / "cache")
    reference = copy.deepcopy(demo.unet)
    CompiledCall(demo.unet, "forward", mode=None, backend="inductor", policy="blocking",
                 dynamic={"encoder_hidden_states": 1})
    for tokens in (77, 154):
        inputs = unet_inputs(context_tokens=tokens, seed=tokens)
        assert_close_rel(run_unet(demo.unet, inputs), run_unet(reference, inputs), 1e-4)


# -- guidance ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "adaptive", "sharpness"), [(4.0, 7.0, 2.0), (7.0, 4.0, 2.0), (9.0, 7.0, 30.0)])
def test_guidance_tensors_match_reference(cfg: float, adaptive: float, sharpness: float) -> None:
    g = torch.Generator().manual_seed(int(cfg * 10))
    for timestep in (999.0, 620.0, 3.0):
        x, x0_pos, x0_neg = (torch.randn(1, 4, 24, 16, generator=g) * 3 for _ in range(3))
        expected = sharpness_sampling_function(x, x0_pos, x0_neg, cfg=cfg, sharpness=sharpness,
                                               adaptive_cfg=adaptive, timestep=torch.tensor([timestep]))
        actual = guidance_tensors(x, x0_pos, x0_neg, torch.tensor([timestep]), torch.tensor(cfg),
                                  torch.tensor(adaptive), torch.tensor(sharpness))
        assert_close_rel(actual, expected, 1e-5)


def test_compiled_guidance_one_graph_for_all_steps_and_jobs() -> None:
    counter = CompileCounter()
    guide = compiled_guidance(backend=counter)
    g = torch.Generator().manual_seed(5)
    for cfg, adaptive, timestep in ((4.0, 7.0, 900.0), (4.0, 7.0, 40.0), (9.0, 7.0, 500.0)):
        x, x0_pos, x0_neg = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
        kwargs = {"cfg": cfg, "sharpness": 2.0, "adaptive_cfg": adaptive, "timestep": torch.tensor([timestep])}
        assert_close_rel(guide(x, x0_pos, x0_neg, **kwargs), sharpness_sampling_function(x, x0_pos, x0_neg, **kwargs),
                         1e-5)
    assert counter.frame_count == 1
    x = torch.randn(1, 4, 16, 16, generator=g)
    assert torch.equal(guide(x, x, None, cfg=1.0, sharpness=2.0, adaptive_cfg=7.0, timestep=5.0), x)


# -- low-VRAM -------------------------------------------------------------------------------------------


def test_plan_streaming_meets_the_target_and_spreads() -> None:
    sizes = [10] * 20
    assert plan_streaming(sizes, 0) == [False] * 20
    assert plan_streaming(sizes, 10_000) == [True] * 20
    plan = plan_streaming(sizes, 100)
    assert sum(s for s, take in zip(sizes, plan) if take) >= 100
    assert plan.count(True) == 10 and not any(a and b for a, b in zip(plan, plan[1:]))  # alternating
    mixed = [5, 50, 5, 50, 5, 5, 80]
    for need in range(0, sum(mixed) + 1, 7):
        chosen = plan_streaming(mixed, need)
        assert sum(s for s, take in zip(mixed, chosen) if take) >= need


def low_vram_accelerator(budget_bytes: int, prefetch: int = 1) -> Accelerator:
    return Accelerator(AccelerationConfig(device=CPU, low_vram=True, vram_budget_bytes=budget_bytes,
                                          prefetch_blocks=prefetch))


def test_low_vram_streams_blocks_and_matches(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.sdxl.acceleration.lowvram as lowvram

    monkeypatch.setattr(lowvram, "UNET_ACTIVATION_RESERVE_BYTES_BF16", 0)
    reference = copy.deepcopy(demo.unet)
    total = sum(p.numel() * 4 for p in demo.unet.parameters())
    accelerator = low_vram_accelerator(budget_bytes=total // 2)
    applied = accelerator.apply(demo)
    assert applied.streamed_bytes > 0 and applied.resident_unet_bytes < total
    streamer = next(g.streamer for g in applied.groups if g.streamer is not None)
    assert 0 < len(streamer.units) < len(stream_units(demo.unet))
    homes = {name: p.data_ptr() for name, p in demo.unet.named_parameters()}
    unit = streamer.units[-1]
    unit_home = next(unit.parameters()).data_ptr()
    seen_during: list[int] = []
    unit.register_forward_pre_hook(lambda m, a: seen_during.append(next(m.parameters()).data_ptr()))
    for seed in range(3):
        inputs = unet_inputs(seed=seed, context_tokens=77 * (seed + 1))
        assert torch.equal(run_unet(demo.unet, inputs), run_unet(reference, inputs))
        assert next(unit.parameters()).data_ptr() == unit_home  # streamed out again after its forward
    assert streamer.max_loaded <= 2 and not streamer.recording  # current + 1 prefetched
    assert len(seen_during) == 3 and unit_home not in seen_during  # it computed on a device copy
    # the VAE evicts the UNet: every UNet weight is back at home
    with torch.inference_mode():
        demo.vae.decode(torch.randn(1, 4, 8, 8), return_dict=False)
    assert {name: p.data_ptr() for name, p in demo.unet.named_parameters()} == homes


def test_low_vram_keeps_writes_made_while_loaded(demo) -> None:
    reference = copy.deepcopy(demo.unet)
    accelerator = low_vram_accelerator(budget_bytes=2**40)  # everything resident
    accelerator.apply(demo)
    inputs = unet_inputs()
    run_unet(demo.unet, inputs)  # the UNet group is loaded now
    with torch.inference_mode():
        for model in (demo.unet, reference):
            model.conv_in.weight.copy_(model.conv_in.weight * 0.5)
        demo.vae.decode(torch.randn(1, 4, 8, 8), return_dict=False)  # evicts the UNet
    assert torch.equal(run_unet(demo.unet, inputs), run_unet(reference, inputs))


def small_job(tmp_path: Path, *, refiner: bool = True, **overrides: Any) -> list[bytes]:
    from engine import Engine
    from engine.core.events import ImageReady
    from engine.sdxl.pipeline import SDXLRunner

    runner = SDXLRunner(Settings(data_dir=tmp_path, device="cpu"), model="demo")
    if overrides:
        runner.accelerator = Accelerator(dataclasses.replace(runner.accelerator.config, **overrides))
    request = {"prompt": "a (red:1.2) fox", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3,
               "seed": 11}
    if refiner:
        request.update(refiner_model="demo-refiner", refiner_switch=0.5)
    with Engine(runner, max_queue=2) as engine:
        job = engine.submit(request)
        assert job.wait(120), job.info()
        return [e.data for e in job.events_after(0) if isinstance(e, ImageReady)]


def test_low_vram_job_gives_the_same_png(tmp_path: Path) -> None:
    """Text encoders, both UNets (joint refiner swap) and the VAE move in and out per use; the
    image is byte-identical to the resident run."""
    resident = small_job(tmp_path / "a")
    assert resident and small_job(tmp_path / "b", low_vram=True, vram_budget_bytes=0) == resident


@pytest.mark.slow
def test_compiled_job_gives_the_same_png(tmp_path: Path) -> None:
    """The pipeline's real UNet and VAE calls go through the compiled graphs (dynamo with the
    'eager' backend: the graph capture, guards and dispatch are what is tested here). ≈20 s; the
    fast suite covers the same call path through tests/unit/test_bench_tiny.py."""
    eager = small_job(tmp_path / "a", refiner=False)
    compiled = dict(compile=True, compile_backend="eager", compile_policy="blocking")
    assert small_job(tmp_path / "b", refiner=False, **compiled) == eager  # bit-exact
    # + fused QKV and channels_last: float32 rounding may move a pixel by one 8-bit level
    fast = small_job(tmp_path / "c", refiner=False, fuse_qkv=True, channels_last=True, **compiled)
    assert np.abs(pixels(fast[0]) - pixels(eager[0])).max() <= 1


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


# -- expansion -----------------------------------------------------------------------------------------


def test_static_cache_expansion_gives_the_same_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from engine.prompts.expansion import FooocusExpansion, load_positive_words

    source = fooocus_data_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / "gpt2_tokenizer" / name, tmp_path / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=256, pad_token_id=50256)
    model = GPT2LMHeadModel(config).eval()
    (tmp_path / "positive.txt").write_text("\n".join(STAND_IN_POSITIVE_WORDS), encoding="utf-8")  # not Fooocus's
    words = load_positive_words(tmp_path / "positive.txt")
    eager = FooocusExpansion.from_components(tokenizer, model, words)
    fast = FooocusExpansion.from_components(tokenizer, StaticCacheGenerator(model), words)
    for seed, prompt in ((1, "a cat"), (2**32 + 7, "a lighthouse at dusk, oil painting"), (99, "portrait")):
        assert fast(prompt, seed) == eager(prompt, seed)


def test_lora_merge_and_restore_on_a_fused_unet(demo, tmp_path: Path) -> None:
    """The real LoRA code (kohya names → to_q/to_k/to_v, in-place merge, restore) on a fused UNet."""
    from engine.sdxl.models.lora import load_lora, match_lora, merge_loras
    from tests.lora_models import write_qkv_lora

    unfused = copy.deepcopy(demo.unet)
    fuse_qkv_views(demo.unet)
    path = write_qkv_lora(unfused, tmp_path / "qkv_lora.safetensors", seed=3, scale=0.1)
    inputs = unet_inputs(context_tokens=154)
    before = run_unet(demo.unet, inputs)
    merged = {}
    with torch.inference_mode():
        for name, unet in (("fused", demo.unet), ("unfused", unfused)):
            match = match_lora(load_lora(path), unet, [])
            assert not match.skipped
            merged[name] = merge_loras({"unet": unet}, [(match, 0.8)])
    after = run_unet(demo.unet, inputs)
    assert (after - before).abs().max() > 1e-3
    assert_close_rel(after, run_unet(unfused, inputs), 1e-5)
    with torch.inference_mode():
        merged["fused"].restore({"unet": demo.unet})
    assert torch.equal(run_unet(demo.unet, inputs), before)


def test_forget_undoes_hooks_and_dispatchers(demo) -> None:
    """A model being unloaded leaves with its weights at home and its eager methods back."""
    counter = CompileCounter()
    accelerator = Accelerator(AccelerationConfig(device=CPU, compile=True, compile_backend=counter,
                                                 compile_policy="blocking", compile_vae=True))
    applied = accelerator.apply(demo)
    assert set(applied.compiled) == {"unet", "vae"} and "forward" in vars(demo.unet)
    assert accelerator.acceleration(demo) is applied
    accelerator.forget(demo)
    assert "forward" not in vars(demo.unet) and "decode" not in vars(demo.vae)
    assert accelerator.acceleration(demo) is None

    other = build_demo_sdxl("base")
    original = [p.data_ptr() for p in other.unet.parameters()]
    low = low_vram_accelerator(budget_bytes=0)
    low.apply(other)
    run_unet(other.unet, unet_inputs())
    hooks = sum(len(m._forward_pre_hooks) for m in other.unet.modules())
    assert hooks > 0
    low.forget(other)
    assert sum(len(m._forward_pre_hooks) for m in other.unet.modules()) == 0
    assert [p.data_ptr() for p in other.unet.parameters()] == original  # back at home (CPU copies gone)
    assert counter.frame_count == 0  # nothing was called while compiled


def test_accelerator_guidance_behind_the_dispatcher() -> None:
    counter = CompileCounter()
    off = Accelerator(AccelerationConfig(device=CPU))
    assert off.guidance() is sharpness_sampling_function
    on = Accelerator(AccelerationConfig(device=CPU, compile=True, compile_backend=counter,
                                        compile_policy="blocking"))
    guide = on.guidance()
    assert on.guidance() is guide
    g = torch.Generator().manual_seed(8)
    for timestep in (800.0, 100.0):
        x, x0_pos, x0_neg = (torch.randn(1, 4, 16, 8, generator=g) for _ in range(3))
        kwargs = {"cfg": 4.0, "sharpness": 2.0, "adaptive_cfg": 7.0, "timestep": torch.tensor([timestep])}
        assert_close_rel(guide(x, x0_pos, x0_neg, **kwargs), sharpness_sampling_function(x, x0_pos, x0_neg, **kwargs),
                         1e-5)
    assert counter.frame_count == 1
