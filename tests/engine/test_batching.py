"""Issue 15 dynamic batching on the built-in demo model: jobs run as ONE batched sampling loop
(engine/sdxl/pipeline.py ``SDXLRunner.run_batch``, engine/sdxl/denoiser.py ``BatchedDenoiser``)
give each image what the same request gives alone (different prompt lengths, seeds, cfg, sharpness,
ADM values; several images per job; the refiner swap, joint and separate; FreeU); a cancelled job
leaves the batch at the next step while the others go on; ``run_batch([ctx])`` is ``run(ctx)``;
``batch_key`` keeps out what the batched loop does not do; every sampler it allows keeps rows
independent with per-row noise streams.

Tolerances: the parity README's latent rel ≤ 5e-5 and its PNG rule (max |diff| ≤ 1 on ≤ 1 % of
pixels). Batching changes only the UNet's batch size (and, for the guidance, float32 per-item
tensors instead of Python floats); measured on this machine with these requests (the BATCH lines
printed with -s): latent rel 1.5e-6 – 2.9e-6, so 5e-5 leaves a > 15× margin and still catches a
wrong row, noise stream or conditioning (those give rel ≈ 1).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core.constants import DEMO_REFINER, SAMPLER_NAMES
from engine.core.errors import JobCancelled
from engine.core.events import ImageReady, Preview, Progress, Started
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.core.settings import load_settings
from engine.sdxl.denoiser import lcm_groups
from engine.sdxl.pipeline import SDXLRunner
from engine.sdxl.sampling.guidance import guided_x0
from engine.sdxl.sampling.model_sampling import model_sampling_for
from engine.sdxl.sampling.noise import BrownianNoise, prepare_noise, randn_like
from engine.sdxl.sampling.samplers import NOT_ROW_INDEPENDENT, SDE_SAMPLERS, sample
from engine.sdxl.sampling.schedules import plan_sigmas
from tests.engine.demo import StubEngine
from tests.parity.recorded import Recorder, rel

#: parity README tolerances (tests/parity/test_parity.py uses the same numbers)
LATENT_REL = 5e-5
PNG_MAX_DIFF = 1
PNG_DIFF_FRACTION = 0.01

# Fooocus's CLIP chunk is 75 tokens + 2: this prompt is ~3 chunks (231 tokens of context), the
# others 1 and 2, so the batch's LCM rule must split the UNet call into two groups (462/77 > 4).
LONG = ", ".join(["a small red fox sitting in deep fresh snow under tall dark pine trees"] * 12)
MEDIUM = ", ".join(["a wooden house on a green hill at sunset with warm light"] * 6)
SHORT = "a cat"
BASE = {"styles": [], "steps": 3, "width": 64, "height": 64, "metadata_scheme": "none"}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SDXLRunner]:
    settings, _ = load_settings(cli={"data_dir": tmp_path_factory.mktemp("data"), "device": "cpu"}, env={})
    yield SDXLRunner(settings, model="demo", trace=Recorder())


def _ctx(name: str, **fields: Any) -> RunContext:
    request = GenerationRequest.parse({**BASE, **fields})
    return RunContext(Job(name, request, "local"), StubEngine())  # type: ignore[arg-type]


def _images(ctx: RunContext) -> list[ImageReady]:
    return [e for e in ctx.job.events_after(0) if isinstance(e, ImageReady)]


def _alone(runner: SDXLRunner, name: str, **fields: Any) -> tuple[bytes, torch.Tensor]:
    ctx = _ctx(name, **fields)
    runner.run(ctx)
    (image,) = _images(ctx)
    return image.data, runner.trace.values["image0.latent"]  # type: ignore[union-attr]


def _png_close(a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    pa = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    pb = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    diff = np.abs(pa - pb)
    return int(diff.max()) <= PNG_MAX_DIFF and float((diff.max(axis=-1) > 0).mean()) <= PNG_DIFF_FRACTION


def _unet_batch_sizes(runner: SDXLRunner) -> tuple[list[int], Any]:
    sizes: list[int] = []
    runner.warmup()
    unet = runner.base_components.unet  # type: ignore[union-attr]
    hook = unet.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    return sizes, hook


REQUESTS = [
    {"prompt": LONG, "negative_prompt": "blurry", "seed": 11, "cfg": 4.0, "sharpness": 2.0},
    {"prompt": SHORT, "negative_prompt": MEDIUM, "seed": 12, "cfg": 9.0, "sharpness": 10.0,
     "adaptive_cfg": 5.0, "adm_scaler_end": 0.6, "adm_scaler_positive": 1.2},
    {"prompt": MEDIUM, "seed": 13, "cfg": 7.0, "sharpness": 0.0, "clip_skip": 1},
]


# dpmpp_2m_sde_gpu draws from each image's Brownian tree, euler_ancestral from each image's generator.
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde_gpu", "euler_ancestral"])
def test_each_batched_image_equals_the_same_request_alone(runner: SDXLRunner, sampler: str) -> None:
    alone = [_alone(runner, f"a{i}", sampler=sampler, **fields) for i, fields in enumerate(REQUESTS)]
    ctxs = [_ctx(f"b{i}", sampler=sampler, **fields) for i, fields in enumerate(REQUESTS)]
    assert len({runner.batch_key(ctx.request) for ctx in ctxs}) == 1
    previews: list[list[int]] = [[] for _ in ctxs]
    for ctx, seen in zip(ctxs, previews, strict=True):  # previews are live-only (not kept for replay)
        ctx.job.subscribe(lambda e, seen=seen: seen.append(e.step) if isinstance(e, Preview) else None)
    sizes, hook = _unet_batch_sizes(runner)
    try:
        outcomes = runner.run_batch(ctxs)
    finally:
        hook.remove()
    assert outcomes == [None, None, None]
    # one loop: every UNet call covers the three items' two branches (the LCM rule splits the
    # 231-token prompt into its own call: 2 calls per step, 6 rows in all)
    assert sum(sizes) == 6 * 3 and len(sizes) == 2 * 3, sizes
    for k, (ctx, (png, latent)) in enumerate(zip(ctxs, alone, strict=True)):
        measured = rel(runner.trace.values[f"item{k}.image0.latent"], latent)  # type: ignore[union-attr]
        print(f"BATCH {sampler} item{k} latent rel {measured:.3g}")
        assert measured <= LATENT_REL
        (image,) = _images(ctx)
        assert _png_close(image.data, png)
        assert image.seed == REQUESTS[k]["seed"]
        events = ctx.job.events_after(0)
        assert isinstance(events[0], Started) and events[0].total_steps == 3
        sample_steps = [e.step for e in events if isinstance(e, Progress) and e.stage == "sample"]
        assert sample_steps == [1, 2, 3]
        assert previews[k] and previews[k][-1] == 3
    # the images differ from each other (each row kept its own prompt and seed)
    assert len({_images(ctx)[0].sha256 for ctx in ctxs}) == 3


def test_a_cancelled_job_leaves_the_batch_and_the_others_go_on(runner: SDXLRunner) -> None:
    fields = {"prompt": "a fox", "seed": 21, "steps": 4}
    other = {"prompt": MEDIUM, "seed": 22, "steps": 4, "cfg": 6.0}
    png_alone, latent_alone = _alone(runner, "alone", **other)
    victim, survivor = _ctx("v", **fields), _ctx("s", **other)

    def cancel_after_step_2(event: Any) -> None:
        if isinstance(event, Progress) and event.stage == "sample" and event.step == 2:
            victim.job.cancel_token.cancel("user")

    victim.job.subscribe(cancel_after_step_2)
    sizes, hook = _unet_batch_sizes(runner)
    try:
        outcomes = runner.run_batch([victim, survivor])
    finally:
        hook.remove()
    assert isinstance(outcomes[0], JobCancelled) and outcomes[1] is None
    assert sizes == [4, 4, 2, 2]  # two items × two branches, then the survivor alone
    assert not _images(victim)
    assert max(e.step for e in victim.job.events_after(0) if isinstance(e, Progress)) == 2
    (image,) = _images(survivor)
    assert rel(runner.trace.values["item1.image0.latent"], latent_alone) <= LATENT_REL  # type: ignore[union-attr]
    assert _png_close(image.data, png_alone)


def test_jobs_of_several_images_run_image_by_image_in_the_batch(runner: SDXLRunner) -> None:
    two = {"prompt": "a fox", "seed": 41, "image_number": 2, "cfg": 5.0}
    one = {"prompt": MEDIUM, "seed": 51, "sharpness": 6.0}
    ctx = _ctx("alone2", **two)
    runner.run(ctx)
    alone_two = ([e.data for e in _images(ctx)],
                 [runner.trace.values[f"image{i}.latent"] for i in range(2)])  # type: ignore[union-attr]
    png_one, latent_one = _alone(runner, "alone1", **one)
    jobs = [_ctx("b2", **two), _ctx("b1", **one)]
    sizes, hook = _unet_batch_sizes(runner)
    try:
        assert runner.run_batch(jobs) == [None, None]
    finally:
        hook.remove()
    assert sizes == [4] * 3 + [2] * 3  # loop 0: both jobs' image 0; loop 1: the first job's image 1
    values = runner.trace.values  # type: ignore[union-attr]
    for i in range(2):
        assert rel(values[f"item0.image{i}.latent"], alone_two[1][i]) <= LATENT_REL
        assert _png_close(_images(jobs[0])[i].data, alone_two[0][i])
    assert [e.index for e in _images(jobs[0])] == [0, 1] and [e.seed for e in _images(jobs[0])] == [41, 42]
    started = jobs[0].job.events_after(0)[0]
    assert isinstance(started, Started) and started.total_steps == 2 * 3
    assert rel(values["item1.image0.latent"], latent_one) <= LATENT_REL
    assert _png_close(_images(jobs[1])[0].data, png_one)


@pytest.mark.parametrize("swap", ["joint", "separate"])
def test_the_refiner_swap_happens_for_every_row_and_each_equals_itself_alone(runner: SDXLRunner, swap: str) -> None:
    shared = {"steps": 4, "refiner_model": DEMO_REFINER, "refiner_switch_step": 2, "refiner_swap_method": swap,
              "sampler": "dpmpp_2m_sde_gpu"}
    requests = [{"prompt": "a fox", "seed": 71, **shared}, {"prompt": MEDIUM, "seed": 72, "cfg": 8.0, **shared}]
    alone = [_alone(runner, f"r{i}", **fields) for i, fields in enumerate(requests)]
    ctxs = [_ctx(f"rb{i}", **fields) for i, fields in enumerate(requests)]
    assert runner.batch_key(ctxs[0].request) == runner.batch_key(ctxs[1].request) is not None
    assert runner.run_batch(ctxs) == [None, None]
    for k, (ctx, (png, latent)) in enumerate(zip(ctxs, alone, strict=True)):
        assert rel(runner.trace.values[f"item{k}.image0.latent"], latent) <= LATENT_REL  # type: ignore[union-attr]
        assert _png_close(_images(ctx)[0].data, png)
        stages = [e.stage for e in ctx.job.events_after(0) if isinstance(e, Progress) and e.stage != "encode"]
        refine_from = 3 if swap == "joint" else 2  # joint: step `switch` itself still runs on the base
        assert stages == ["sample"] * refine_from + ["refine"] * (4 - refine_from) + ["decode"]


def test_freeu_is_applied_once_for_the_batch_and_each_image_equals_itself_alone(runner: SDXLRunner) -> None:
    requests = [{"prompt": "a fox", "seed": 81, "freeu": {"enabled": True}},
                {"prompt": MEDIUM, "seed": 82, "sharpness": 4.0, "freeu": {"enabled": True}}]
    alone = [_alone(runner, f"f{i}", **fields) for i, fields in enumerate(requests)]
    ctxs = [_ctx(f"fb{i}", **fields) for i, fields in enumerate(requests)]
    assert runner.run_batch(ctxs) == [None, None]
    for k, (ctx, (png, latent)) in enumerate(zip(ctxs, alone, strict=True)):
        assert rel(runner.trace.values[f"item{k}.image0.latent"], latent) <= LATENT_REL  # type: ignore[union-attr]
        assert _png_close(_images(ctx)[0].data, png)
    unet = runner.base_components.unet  # type: ignore[union-attr]
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())  # FreeU taken off again


def test_a_job_the_loop_cannot_batch_runs_alone_inside_run_batch(runner: SDXLRunner) -> None:
    plain = {"prompt": "a fox", "seed": 61}
    single_branch = {"prompt": "a cat", "seed": 62, "cfg": 1.0}  # cfg 1: positive branch only (spec §6)
    png_plain, _latent = _alone(runner, "p", **plain)
    png_single, _latent = _alone(runner, "s", **single_branch)
    ctxs = [_ctx("bs", **single_branch), _ctx("bp", **plain)]
    sizes, hook = _unet_batch_sizes(runner)
    try:
        assert runner.run_batch(ctxs) == [None, None]
    finally:
        hook.remove()
    assert sorted(sizes) == [1] * 3 + [2] * 3  # the cfg-1 job through run (1 row), the other in the loop
    assert _images(ctxs[0])[0].data == png_single  # run() itself: byte-equal
    assert _png_close(_images(ctxs[1])[0].data, png_plain)


def test_a_cancelled_job_of_several_images_gets_no_later_loop(runner: SDXLRunner) -> None:
    victim, survivor = _ctx("v2", prompt="a fox", seed=91, image_number=2), _ctx("s2", prompt="a cat", seed=92)

    def cancel_after_step_1(event: Any) -> None:
        if isinstance(event, Progress) and event.stage == "sample" and event.step == 1:
            victim.job.cancel_token.cancel("user")

    victim.job.subscribe(cancel_after_step_1)
    sizes, hook = _unet_batch_sizes(runner)
    try:
        outcomes = runner.run_batch([victim, survivor])
    finally:
        hook.remove()
    assert isinstance(outcomes[0], JobCancelled) and outcomes[1] is None
    assert sizes == [4, 2, 2]  # its image 1 never starts a second loop
    assert not _images(victim) and len(_images(survivor)) == 1


def test_run_batch_of_one_is_run(runner: SDXLRunner) -> None:
    fields = {"prompt": "a fox", "seed": 31, "cfg": 5.0}
    png_alone, latent_alone = _alone(runner, "alone", **fields)
    ctx = _ctx("one", **fields)
    assert runner.run_batch([ctx]) == [None]
    (image,) = _images(ctx)
    assert image.data == png_alone
    # the batched loop itself with one row (what a partner-less job of a split batch runs)
    single = _ctx("loop", **fields)
    assert runner._run_batch([single]) == [None]
    assert rel(runner.trace.values["item0.image0.latent"], latent_alone) <= LATENT_REL  # type: ignore[union-attr]
    assert _png_close(_images(single)[0].data, png_alone)


def test_batch_key_agrees_on_per_item_values_and_excludes_what_it_cannot_batch(runner: SDXLRunner) -> None:
    def key(**fields: Any) -> Any:
        return runner.batch_key(GenerationRequest.parse({**BASE, **fields}))

    same = key(prompt="a", seed=1, cfg=4.0, sharpness=2.0)
    assert same is not None
    assert key(prompt="b c d", negative_prompt="x", seed=2, cfg=9.0, sharpness=0.0, adaptive_cfg=3.0,
               adm_scaler_end=0.5, clip_skip=1) == same
    for change in ({"steps": 4}, {"width": 128}, {"sampler": "euler"}, {"scheduler": "normal"},
                   {"performance": "Quality"}, {"loras": [{"name": "x.safetensors", "weight": 0.5}]}):
        assert key(**change) not in (None, same), change
    assert key(image_number=3) == same  # a job of several images is several rows
    assert key(refiner_model=DEMO_REFINER) not in (None, same)
    assert key(refiner_model=DEMO_REFINER, refiner_switch_step=2) != key(refiner_model=DEMO_REFINER)
    for excluded in ({"cfg": 1.0}, {"sampler": "heunpp2"}, {"sampler": "dpm_adaptive"},
                     {"uov_method": "Vary (Subtle)", "input_image": "sha256:" + "0" * 64},
                     {"image_prompts": [{"image": "sha256:" + "0" * 64, "type": "ImagePrompt"}]}):
        assert key(**excluded) is None, excluded


def test_lcm_groups_follow_the_single_call_rule() -> None:
    assert lcm_groups([77, 154]) == [[0, 1]]  # ratio 2: one call, as SDXLDenoiser
    assert lcm_groups([77, 385]) == [[0], [1]]  # ratio 5: two calls, as SDXLDenoiser
    assert lcm_groups([154, 77, 231, 77]) == [[1, 3, 0], [2]]  # lcm 462 = 6 × 77: 231 gets its own call
    assert lcm_groups([231, 154, 308]) == [[1, 0], [2]]  # 462/154 = 3 ok; then lcm 924 = 6 × 154


def test_guidance_takes_per_item_tensors_equal_to_per_item_scalars() -> None:
    gen = torch.Generator().manual_seed(0)
    x, pos, neg = (torch.randn(3, 4, 16, 16, generator=gen) for _ in range(3))
    cfg, adaptive, sharp = [4.0, 9.0, 7.0], [7.0, 5.0, 7.0], [2.0, 10.0, 0.0]

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).reshape(-1, 1, 1, 1)

    batched = guided_x0(x, pos, neg, progress=torch.tensor(0.25), cfg=col(cfg), adaptive_cfg=col(adaptive),
                        sharpness=col(sharp))
    for k in range(3):
        alone = guided_x0(x[k:k + 1], pos[k:k + 1], neg[k:k + 1], progress=0.25, cfg=cfg[k],
                          adaptive_cfg=adaptive[k], sharpness=sharp[k])
        # float32 alpha = 0.001·s·p rounds once more than Python's double: a few ulps, far below 1e-6
        assert rel(batched[k:k + 1], alone) <= 1e-6


@pytest.mark.parametrize("sampler", [name for name in SAMPLER_NAMES if name not in NOT_ROW_INDEPENDENT])
def test_every_batchable_sampler_keeps_rows_independent(sampler: str) -> None:
    """The sampler with per-row noise streams concatenated (what the batched loop passes) gives each
    row what it gives alone with its own generator / Brownian tree. A per-row nonlinear toy model
    stands in for the UNet; pure element-wise float32 ops, so the rows agree to a few ulps."""
    ms = model_sampling_for("karras")
    sigmas = plan_sigmas(ms, sampler, "karras", 4, denoise=1.0, fooocus_quirks=False).sigmas
    shape = (1, 4, 8, 8)

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        return torch.tanh(x / (1.0 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5) * 0.8

    seeds = [5, 6, 7]
    alone = []
    for seed in seeds:
        noise, generator = prepare_noise(seed, shape)
        tree = BrownianNoise(shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seed)
        alone.append(sample(model, sampler, sigmas, noise, generator=generator, brownian=tree, model_sampling=ms))
    streams = [prepare_noise(seed, shape) for seed in seeds]
    trees = [BrownianNoise(shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seed) for seed in seeds]
    template = torch.zeros(shape)

    def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if sampler in SDE_SAMPLERS:
            return torch.cat([tree(sigma, sigma_next) for tree in trees])
        return torch.cat([randn_like(template, generator) for _noise, generator in streams])

    batched = sample(model, sampler, sigmas, torch.cat([noise for noise, _g in streams]), model_sampling=ms,
                     noise_sampler=noise_sampler)
    for k in range(len(seeds)):
        assert rel(batched[k:k + 1], alone[k]) <= 1e-6, (sampler, k)
