"""The k-diffusion model callable for SDXL with Fooocus's guidance (spec §4–§6, §3.4, §8).

``SDXLDenoiser(x, sigma) -> denoised x0`` does, per sampler call:
1. the integer UNet timestep of sigma (spec §7.1) and the scaled input x/sqrt(σ²+1);
2. the ADM time ids for this timestep: emphasized sizes while t > 999·(1 − adm_scaler_end), then the
   consistent ones (spec §4, base model only; the refiner gets its aesthetic-score ids);
3. the UNet for the positive (and, unless cfg ≈ 1, the negative) conditioning — in one batch when
   the token lengths allow repetition to their LCM (ratio ≤ 4), else in two calls, as Fooocus does
   (spec §3.4; either way is exact in float32, this keeps the op order close to Fooocus's);
4. sharpness + adaptive CFG on the x0 predictions (spec §5, §6).

The joint refiner swap (spec §8) replaces ``self.stage`` from the sampler callback; the sampler's
history and the Brownian tree continue untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.sdxl.conditioning.adm import adm_time_ids, refiner_time_ids, use_emphasized_adm
from engine.sdxl.sampling.guidance import guided_x0, progress_tensor, sharpness_sampling_function
from engine.sdxl.sampling.model_sampling import ModelSampling


@dataclass
class BranchCond:
    """One side (positive or negative) of the conditioning for one model."""

    cond: torch.Tensor  # [1, 77·k, C] context
    pooled: torch.Tensor  # [1, P] summed pooled vector (spec §3.5)
    time_ids_emphasized: torch.Tensor  # [1, 6] (base) or [1, 5] (refiner)
    time_ids_consistent: torch.Tensor


@dataclass
class Stage:
    """A UNet with its conditioning: the base, or the refiner after the swap."""

    unet: torch.nn.Module
    positive: BranchCond
    negative: BranchCond
    timed_adm: bool  # Fooocus switches the ADM sizes only for the SDXL base (5632-wide y)


@dataclass(frozen=True)
class Guidance:
    cfg: float
    sharpness: float
    adaptive_cfg: float
    adm_scaler_end: float


def base_branch(cond: torch.Tensor, pooled: torch.Tensor, width: int, height: int, *, prompt_type: str,
                positive_scale: float, negative_scale: float, device: torch.device,
                dtype: torch.dtype) -> BranchCond:
    """SDXL base conditioning with Fooocus's scaled 'original size' (spec §4)."""
    emphasized, consistent = adm_time_ids(width, height, prompt_type, positive_scale=positive_scale,
                                          negative_scale=negative_scale)
    return BranchCond(cond.to(device, dtype), pooled.to(device, dtype),
                      torch.tensor([emphasized], device=device, dtype=dtype),
                      torch.tensor([consistent], device=device, dtype=dtype))


def refiner_branch(cond_g: torch.Tensor, pooled: torch.Tensor, width: int, height: int, *, aesthetic_score: float,
                   device: torch.device, dtype: torch.dtype) -> BranchCond:
    """SDXL refiner conditioning: CLIP-G channels only, [h, w, 0, 0, aesthetic] ids, no timed switch."""
    ids = torch.tensor([refiner_time_ids(width, height, aesthetic_score)], device=device, dtype=dtype)
    return BranchCond(cond_g.to(device, dtype), pooled.to(device, dtype), ids, ids)


def _repeat_to(cond: torch.Tensor, length: int) -> torch.Tensor:
    return cond.repeat(1, length // cond.shape[1], 1)


class SDXLDenoiser:
    """Callable ``(x [B,4,h,w] float32, sigma [B]) -> denoised [B,4,h,w] float32``."""

    def __init__(self, stage: Stage, model_sampling: ModelSampling, guidance: Guidance, *,
                 compute_dtype: torch.dtype) -> None:
        self.stage = stage
        self.model_sampling = model_sampling
        self.guidance = guidance
        self.compute_dtype = compute_dtype
        #: The guidance function (spec §5+§6); the accelerator may swap in a compiled equivalent.
        self.guide = sharpness_sampling_function
        #: Observers for tests/parity: called with (timestep, x_in, eps, branch rows) per UNet call.
        self.unet_observers: list = []
        #: Image Prompt (engine/sdxl/image_prompt.py ``ImagePromptRun.unet_kwargs``): called before each
        #: UNet call with (unet, sigma, sample, t, context, added_cond_kwargs, cond_or_uncond), returns
        #: extra UNet keyword arguments (control residuals). cond_or_uncond: 0 positive, 1 negative per chunk.
        self.unet_extra: Callable[..., dict[str, Any]] | None = None

    @property
    def single_branch(self) -> bool:
        # spec §6: cfg == 1 evaluates the positive branch only (math.isclose, as Fooocus).
        return math.isclose(self.guidance.cfg, 1.0)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        ms = self.model_sampling
        timestep = ms.timestep(sigma)
        x_in = ms.calculate_input(sigma, x)
        stage = self.stage
        t_value = float(timestep.reshape(-1)[0])
        emphasized = stage.timed_adm and use_emphasized_adm(t_value, self.guidance.adm_scaler_end)
        if self.single_branch:
            (eps_pos,) = self._unet(stage, x_in, timestep, [stage.positive], emphasized, sigma)
            return ms.calculate_denoised(sigma, eps_pos, x)
        eps_neg, eps_pos = self._unet(stage, x_in, timestep, [stage.negative, stage.positive], emphasized, sigma)
        x0_pos = ms.calculate_denoised(sigma, eps_pos, x)
        x0_neg = ms.calculate_denoised(sigma, eps_neg, x)
        return self.guide(x, x0_pos, x0_neg, cfg=self.guidance.cfg,
                                           sharpness=self.guidance.sharpness,
                                           adaptive_cfg=self.guidance.adaptive_cfg, timestep=timestep)

    def _unet(self, stage: Stage, x_in: torch.Tensor, timestep: torch.Tensor, branches: list[BranchCond],
              emphasized: bool, sigma: torch.Tensor | None = None) -> list[torch.Tensor]:
        """eps for each branch, batching branches whose token lengths repeat to an LCM ≤ 4× (spec §3.4)."""
        lengths = [b.cond.shape[1] for b in branches]
        lcm = math.lcm(*lengths)
        if lcm // min(lengths) <= 4:
            groups = [branches]
        else:
            groups = [[b] for b in branches]
        outputs: list[torch.Tensor] = []
        for group in groups:
            length = math.lcm(*(b.cond.shape[1] for b in group))
            batch = len(group) * x_in.shape[0]
            context = torch.cat([_repeat_to(b.cond, length).expand(x_in.shape[0], -1, -1) for b in group])
            pooled = torch.cat([b.pooled.expand(x_in.shape[0], -1) for b in group])
            ids = torch.cat([(b.time_ids_emphasized if emphasized else b.time_ids_consistent).expand(x_in.shape[0], -1)
                             for b in group])
            sample = x_in.to(self.compute_dtype).repeat(len(group), 1, 1, 1)
            t = timestep.to(sample.device).reshape(-1).repeat(len(group))
            added = {"text_embeds": pooled, "time_ids": ids}
            extra: dict[str, Any] = {}
            if self.unet_extra is not None and sigma is not None:
                cond_or_uncond = [0 if b is stage.positive else 1 for b in group]
                extra = self.unet_extra(stage.unet, sigma, sample, t, context, added, cond_or_uncond)
            eps = stage.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False,
                             **extra)[0]
            eps = eps.float()
            for observer in self.unet_observers:
                observer(t, sample, eps, [id(b) for b in group])
            outputs.extend(eps.chunk(len(group)))
            del batch
        return outputs


#: spec §3.4: branches share one UNet call when their token lengths repeat to an LCM at most this
#: many times the shortest (Fooocus's cond/uncond rule, applied across a batch's items too).
MAX_CONTEXT_REPEAT = 4


def lcm_groups(lengths: list[int], max_repeat: int = MAX_CONTEXT_REPEAT) -> list[list[int]]:
    """Indices of ``lengths`` grouped so that each group's LCM is ≤ ``max_repeat`` × its shortest.

    Greedy over the lengths in ascending order (stable): for two lengths this is exactly
    :meth:`SDXLDenoiser._unet`'s rule (one group if the ratio allows, else one each)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            shortest = lengths[group[0]]
            if math.lcm(*(lengths[j] for j in group), lengths[i]) // shortest <= max_repeat:
                group.append(i)
                continue
        groups.append([i])
    return groups


@dataclass(frozen=True)
class BatchItem:
    """One item of a batched sampling loop: its own conditioning and guidance values."""

    positive: BranchCond
    negative: BranchCond
    guidance: Guidance


class BatchedDenoiser:
    """:class:`SDXLDenoiser` for N items at once (issue 15 dynamic batching): row ``k`` of ``x`` is
    item ``k``. One UNet call per step covers every active item's negative and positive branch
    (context repeated to the common LCM, spec §3.4; split into groups only where the ratio rule
    forbids one call); cfg, sharpness, adaptive CFG and the ADM switch are per-item values.

    ``active[k] = False`` drops item ``k`` (a cancelled job): its row is left out of the UNet call
    and its denoised output is ``x`` itself, so every sampler's step leaves that row where it is
    and the other rows go on unchanged. All items must run the same sigmas (the batch key) and
    cfg ≉ 1 (the two-branch path; the batch key keeps cfg ≈ 1 requests out)."""

    def __init__(self, unet: torch.nn.Module, items: list[BatchItem], model_sampling: ModelSampling, *,
                 compute_dtype: torch.dtype, timed_adm: bool = True) -> None:
        self.unet = unet
        self.items = items
        self.model_sampling = model_sampling
        self.compute_dtype = compute_dtype
        self.timed_adm = timed_adm
        self.active = [True] * len(items)
        #: Called before every UNet call (may clear ``active`` entries): the pipeline drops cancelled
        #: jobs here, so a cancel between two calls already saves the next one.
        self.before_call: Callable[[], None] | None = None
        #: Observers for tests: called with (timestep, x_in, eps, item indices) per UNet call.
        self.unet_observers: list = []

    def _per_item(self, rows: list[int], name: str, like: torch.Tensor) -> torch.Tensor:
        # [R, 1, 1, 1] so it broadcasts over each item's latent (guided_x0 takes tensor scalars)
        values = [getattr(self.items[k].guidance, name) for k in rows]
        return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        if self.before_call is not None:
            self.before_call()
        out = x.clone()  # dropped rows: denoised = x, so the sampler's step for them is zero
        rows = [k for k, on in enumerate(self.active) if on]
        if not rows:
            return out
        index = torch.tensor(rows, device=x.device)
        xs, sig = x.index_select(0, index), sigma.index_select(0, index)
        ms = self.model_sampling
        timestep = ms.timestep(sig)
        x_in = ms.calculate_input(sig, xs)
        t_value = float(timestep.reshape(-1)[0])
        # branch list: every active item's negative, then every active item's positive (uncond first,
        # as the single-item call orders them); each with its own row of x_in and its ADM ids
        branches: list[tuple[int, BranchCond, bool]] = []
        for side in ("negative", "positive"):
            for r, k in enumerate(rows):
                item = self.items[k]
                emphasized = self.timed_adm and use_emphasized_adm(t_value, item.guidance.adm_scaler_end)
                branches.append((r, getattr(item, side), emphasized))
        eps = self._unet(x_in, timestep, branches)
        n = len(rows)
        eps_neg, eps_pos = torch.cat(eps[:n]), torch.cat(eps[n:])
        x0_pos = ms.calculate_denoised(sig, eps_pos, xs)
        x0_neg = ms.calculate_denoised(sig, eps_neg, xs)
        guided = guided_x0(xs, x0_pos, x0_neg, progress=progress_tensor(timestep),
                           cfg=self._per_item(rows, "cfg", xs), adaptive_cfg=self._per_item(rows, "adaptive_cfg", xs),
                           sharpness=self._per_item(rows, "sharpness", xs))
        out.index_copy_(0, index, guided)
        return out

    def _unet(self, x_in: torch.Tensor, timestep: torch.Tensor,
              branches: list[tuple[int, BranchCond, bool]]) -> list[torch.Tensor]:
        """eps [1, 4, h, w] for each (row, branch, emphasized), in the order given."""
        outputs: list[torch.Tensor | None] = [None] * len(branches)
        for group in lcm_groups([b.cond.shape[1] for _r, b, _e in branches]):
            length = math.lcm(*(branches[j][1].cond.shape[1] for j in group))
            context = torch.cat([_repeat_to(branches[j][1].cond, length) for j in group])
            pooled = torch.cat([branches[j][1].pooled for j in group])
            ids = torch.cat([branches[j][1].time_ids_emphasized if branches[j][2]
                             else branches[j][1].time_ids_consistent for j in group])
            row_index = torch.tensor([branches[j][0] for j in group], device=x_in.device)
            sample = x_in.index_select(0, row_index).to(self.compute_dtype)
            t = timestep.to(sample.device).reshape(-1).index_select(0, row_index.to(sample.device))
            eps = self.unet(sample, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)[0]
            eps = eps.float()
            for observer in self.unet_observers:
                observer(t, sample, eps, group)
            for j, row in zip(group, eps.split(1), strict=True):
                outputs[j] = row
        return [e for e in outputs if e is not None]
