"""SDXLDenoiser: ADM switch per timestep, Fooocus batching rule, cfg = 1 fast path, refiner ids."""

from __future__ import annotations

import pytest
import torch

from engine.sdxl.denoiser import BranchCond, Guidance, SDXLDenoiser, Stage, base_branch, refiner_branch
from engine.sdxl.models.demo import build_demo_sdxl
from engine.sdxl.sampling.model_sampling import model_sampling_for


class SpyUNet(torch.nn.Module):
    """Records each call's batch, context length and time ids; eps depends on all inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, sample, t, *, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        self.calls.append({"batch": sample.shape[0], "tokens": encoder_hidden_states.shape[1],
                           "time_ids": added_cond_kwargs["time_ids"].clone(), "t": t.clone()})
        ctx = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        ids = added_cond_kwargs["time_ids"].sum(dim=1).view(-1, 1, 1, 1) * 1e-4
        pooled = added_cond_kwargs["text_embeds"].mean(dim=1).view(-1, 1, 1, 1)
        return (0.1 * sample + ctx + ids + pooled,)


def branch(tokens: int, value: float, prompt_type: str) -> BranchCond:
    cond = torch.full((1, tokens, 8), value)
    return base_branch(cond, torch.full((1, 4), value), 320, 224, prompt_type=prompt_type, positive_scale=1.5,
                       negative_scale=0.8, device=torch.device("cpu"), dtype=torch.float32)


def make(pos_tokens: int, neg_tokens: int, cfg: float = 4.0) -> tuple[SDXLDenoiser, SpyUNet]:
    unet = SpyUNet()
    stage = Stage(unet, branch(pos_tokens, 0.3, "positive"), branch(neg_tokens, -0.2, "negative"), timed_adm=True)
    guidance = Guidance(cfg=cfg, sharpness=2.0, adaptive_cfg=7.0, adm_scaler_end=0.3)
    return SDXLDenoiser(stage, model_sampling_for("karras"), guidance, compute_dtype=torch.float32), unet


def test_time_ids_follow_spec_4_including_bankers_rounding() -> None:
    pos = branch(77, 0.3, "positive")
    neg = branch(77, 0.3, "negative")
    # 320x224: emphasised positive [int(1.5h), int(1.5w), 0, 0, r64(h), r64(w)] with r64(224) = 256
    assert pos.time_ids_emphasized.tolist() == [[336.0, 480.0, 0.0, 0.0, 256.0, 320.0]]
    assert neg.time_ids_emphasized.tolist() == [[179.0, 256.0, 0.0, 0.0, 256.0, 320.0]]
    assert pos.time_ids_consistent.tolist() == [[256.0, 320.0, 0.0, 0.0, 256.0, 320.0]]


def test_adm_switch_happens_at_t_699() -> None:
    denoiser, unet = make(77, 77)
    x = torch.randn(1, 4, 28, 40)
    ms = denoiser.model_sampling
    for t, emphasised in ((999, True), (700, True), (699, False), (0, False)):
        unet.calls.clear()
        denoiser(x, ms.sigma(torch.tensor([float(t)])))
        ids = unet.calls[0]["time_ids"]
        assert (ids[:, 0] != ids[:, 4]).all().item() is emphasised, t
        assert unet.calls[0]["t"].tolist() == [float(t)] * 2


@pytest.mark.parametrize(("pos", "neg", "calls", "tokens"), [(77, 77, 1, [77]), (77, 231, 1, [231]),
                                                              (77, 385, 2, [385, 77]), (154, 385, 2, [385, 154])])
def test_batching_repeats_to_the_lcm_only_up_to_4x(pos: int, neg: int, calls: int, tokens: list[int]) -> None:
    denoiser, unet = make(pos, neg)
    denoiser(torch.randn(1, 4, 8, 8), torch.tensor([1.0]))
    assert len(unet.calls) == calls
    assert [c["tokens"] for c in unet.calls] == tokens


def test_batched_and_separate_calls_give_the_same_result() -> None:
    unet = build_demo_sdxl("base").unet
    ms = model_sampling_for("karras")
    guidance = Guidance(cfg=6.0, sharpness=2.0, adaptive_cfg=7.0, adm_scaler_end=0.3)
    gen = torch.Generator().manual_seed(0)
    pos_cond, neg_cond = torch.randn(1, 77, 64, generator=gen), torch.randn(1, 77, 64, generator=gen)
    pooled = torch.randn(1, 32, generator=gen)
    kw = {"positive_scale": 1.5, "negative_scale": 0.8, "device": torch.device("cpu"), "dtype": torch.float32}
    pos = base_branch(pos_cond, pooled, 64, 64, prompt_type="positive", **kw)
    neg = base_branch(neg_cond, pooled, 64, 64, prompt_type="negative", **kw)
    batched = SDXLDenoiser(Stage(unet, pos, neg, True), ms, guidance, compute_dtype=torch.float32)
    # the negative repeated 5x attends identically but forces separate UNet calls (ratio 5 > 4)
    neg5 = base_branch(neg_cond.repeat(1, 5, 1), pooled, 64, 64, prompt_type="negative", **kw)
    separate = SDXLDenoiser(Stage(unet, pos, neg5, True), ms, guidance, compute_dtype=torch.float32)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    sigma = torch.tensor([2.0])
    with torch.inference_mode():
        a, b = batched(x, sigma), separate(x, sigma)
    # repeating context tokens leaves attention unchanged (spec §3.4): equal up to float32 op order,
    # measured as the parity README does (relative L2); a wrong batching would be off by O(1)
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-5, rel


def test_cfg_one_runs_only_the_positive_branch() -> None:
    denoiser, unet = make(77, 385, cfg=1.0)
    x = torch.randn(1, 4, 8, 8)
    out = denoiser(x, torch.tensor([1.0]))
    assert len(unet.calls) == 1 and unet.calls[0]["batch"] == 1 and unet.calls[0]["tokens"] == 77
    assert out.shape == x.shape


def test_refiner_branch_uses_aesthetic_ids_without_timed_switch() -> None:
    cond = torch.zeros(1, 77, 32)
    ref = refiner_branch(cond, torch.zeros(1, 32), 1152, 896, aesthetic_score=6.0, device=torch.device("cpu"),
                         dtype=torch.float32)
    assert ref.time_ids_emphasized.tolist() == [[896.0, 1152.0, 0.0, 0.0, 6.0]]
    assert torch.equal(ref.time_ids_emphasized, ref.time_ids_consistent)


@pytest.mark.parametrize(("pos", "neg", "cfg", "codes"), [
    (77, 77, 4.0, [[1, 0]]),  # one batched call: [negative, positive] chunks
    (77, 385, 4.0, [[1], [0]]),  # 5x apart: two calls, negative first
    (77, 77, 1.0, [[0]]),  # cfg 1: the positive branch alone
])
def test_unet_extra_sees_cond_or_uncond_per_call_and_its_kwargs_reach_the_unet(
        pos: int, neg: int, cfg: float, codes: list[list[int]]) -> None:
    # Image Prompt's per-call hook (engine/sdxl/image_prompt.py): it must see which chunk is which branch
    # (Fooocus's cond_or_uncond: 0 positive, 1 negative) and whatever it returns goes into the UNet call.
    denoiser, unet = make(pos, neg, cfg=cfg)
    seen: list[list[int]] = []
    sigma = torch.tensor([2.0])

    def extra(stage_unet, sigma_in, sample, t, context, added, cond_or_uncond):
        assert stage_unet is unet and torch.equal(sigma_in, sigma) and sample.shape[0] == len(cond_or_uncond)
        assert context.shape[0] == sample.shape[0] and set(added) == {"text_embeds", "time_ids"}
        seen.append(list(cond_or_uncond))
        return {"marker": len(seen)}

    received: list[int] = []
    forward = unet.forward

    def forward_with_marker(sample, t, *, marker, **kwargs):
        received.append(marker)
        return forward(sample, t, **kwargs)

    unet.forward = forward_with_marker  # type: ignore[method-assign]
    denoiser.unet_extra = extra
    denoiser(torch.randn(1, 4, 8, 8), sigma)
    assert seen == codes and received == list(range(1, len(codes) + 1))
