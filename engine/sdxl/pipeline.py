"""The SDXL runner: orchestration only (spec §1). Every Fooocus trick lives in its own pure module.

One job = resolve the request (performance overrides, sizes, seeds) → assemble the prompt texts
per image (styles, wildcards, V2 expansion) → load models + LoRAs (cached between jobs) → for each
image: encode texts, plan sigmas, draw noise, sample with the Fooocus denoiser (joint/separate
refiner swap), decode, encode the file with its metadata. The cancel token is checked at every
sampler step and before the VAE decode, so a cancel costs at most one step and skips the decode.

Runs only on the engine's worker thread; holds all torch state of the process.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import os
import random
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from engine.core.constants import (
    DEFAULT_ASPECT_RATIO,
    DEMO_MODEL,
    DEMO_REFINER,
    PERFORMANCE_NAMES,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SDXL_ASPECT_RATIOS,
)
from engine.core.errors import (
    AssetsMissing,
    HooocusError,
    InvalidRequest,
    JobCancelled,
    ModelMissing,
    UnknownLora,
    UnknownModel,
)
from engine.core.events import ImageReady
from engine.core.formats import MIME_BY_FORMAT
from engine.core.jobs import RunContext
from engine.core.model_cache import CacheStats, ModelCache, default_budget_bytes, tensor_bytes
from engine.core.request import GenerationRequest
from engine.core.settings import Settings
from engine.imaging.inpaint import (
    Box,
    color_correction,
    compute_initial_abcd,
    crop_mask_for_generation,
    fooocus_fill,
    paste_back,
    solve_abcd,
)
from engine.imaging.latent_mask import grey_filled_pixels, latent_mask
from engine.imaging.masks import (
    erode_or_dilate,
    invert_mask,
    merge_masks,
    morphological_open,
    needs_inpaint,
    outpaint_pad,
)
from engine.imaging.resize import resample_image
from engine.imaging.sizes import get_shape_ceil, set_image_shape_ceil_hw
from engine.imaging.upscaler import (
    UPSCALE_MODELS_DIR,
    UPSCALER_FILE_NAME,
    Upscaler,
    fast_upscale_2x,
    load_upscaler,
    upscale_image,
)
from engine.io.imageio import encode_image
from engine.io.metadata import MetadataInput, build_metadata_list, metadata_text
from engine.io.metadata.write import fast_upscale_metadata
from engine.io.registry import ModelRegistry
from engine.prompts.assembly import PromptPlan, PromptTask, process_resolved
from engine.prompts.expansion import FooocusExpansion, load_expansion
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import WildcardLibrary
from engine.sdxl.acceleration import AccelerationConfig, Accelerator
from engine.sdxl.conditioning.encode import TextEncoders, TextEncodingCache, encode_texts
from engine.sdxl.denoiser import (
    BatchedDenoiser,
    BatchItem,
    Guidance,
    SDXLDenoiser,
    Stage,
    base_branch,
    refiner_branch,
)
from engine.sdxl.image_prompt import (
    IP_ADAPTER_KINDS,
    ImagePromptRun,
    check_image_prompt_files,
    load_controlnet,
    load_face_detector,
    load_ip_models,
    prepare_image_prompts,
)
from engine.sdxl.img2img import inpaint_start_latent
from engine.sdxl.inpaint_unet import InpaintEngine
from engine.sdxl.models.freeu import apply_freeu_v2
from engine.sdxl.models.inpaint import (
    InpaintDenoiser,
    fooocus_patches_from_state_dict,
    inpaint_head_feature,
    inpaint_head_feed,
)
from engine.sdxl.models.loading import (
    SDXLComponents,
    bind_thread_to_device,
    choose_dtype,
    find_in_hf_cache,
    load_sdxl,
    resolve_device,
)
from engine.sdxl.models.lora import FOOOCUS_STORAGE_DTYPES, MergedLoras, load_lora, match_lora, merge_loras
from engine.sdxl.modes import PERFORMANCE_MODES
from engine.sdxl.preview import latent_to_rgb
from engine.sdxl.resolve import ResolvedRequest, resolve_request
from engine.sdxl.sampling.model_sampling import model_sampling_for
from engine.sdxl.sampling.noise import BrownianNoise, prepare_noise, randn_like
from engine.sdxl.sampling.samplers import NOT_ROW_INDEPENDENT, SDE_SAMPLERS, sample
from engine.sdxl.sampling.schedules import plan_sigmas
from engine.sdxl.vae_io import posterior_generator, vae_decode, vae_encode

log = logging.getLogger("hooocus.pipeline")

#: Where set-up installs the inpaint weights (engine/io/setup/catalogue.py), under the models folder.
INPAINT_MODELS_DIR = "inpaint"
INPAINT_HEAD_FILE = "fooocus_inpaint_head.safetensors"
#: The head tensor's name in the converted file (Fooocus's InpaintHead module has one parameter, ``head``).
INPAINT_HEAD_KEY = "head"
INPAINT_PATCH_FILES = {"v1": "inpaint.fooocus.patch.safetensors", "v2.5": "inpaint_v25.fooocus.patch.safetensors",
                       "v2.6": "inpaint_v26.fooocus.patch.safetensors"}
INPAINT_SETUP_GROUPS = {"v1": "inpaint-older", "v2.5": "inpaint-older", "v2.6": "inpaint"}
#: spec §12.2 crop step 3: crops below this shape ceil go through ESRGAN; every crop is then sized to it.
INPAINT_SHAPE_CEIL_PX = 1024
#: spec §12.2 crop step 5: fooocus_fill runs only for (near-)full denoise.
INPAINT_FILL_ABOVE_DENOISE = 0.99
EMPTY_MASK_WARNING = "mask is empty: inpaint skipped; generating from the prompt alone (as Fooocus does)"

#: spec §4 / §8: the SDXL refiner's aesthetic scores.
REFINER_POSITIVE_AESTHETIC = 6.0
REFINER_NEGATIVE_AESTHETIC = 2.5


class Trace(Protocol):
    """Observer for tests and the parity check: sees intermediate tensors, changes nothing."""

    def record(self, name: str, value: Any) -> None: ...


@dataclass
class LoadedModel:
    components: SDXLComponents
    key: tuple[Any, ...]
    hash10: str | None = None
    #: (file, weight) list currently merged into the weights, and how to undo it.
    loras: tuple[tuple[str, float], ...] = ()
    merged: MergedLoras | None = None
    text_cache: TextEncodingCache = field(default_factory=TextEncodingCache)

    def components_modules(self) -> list[torch.nn.Module]:
        """Every module holding this model's weights (what its memory is measured from)."""
        c = self.components
        return [m for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2) if m is not None]

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        c = self.components
        out: dict[str, torch.nn.Module] = {"unet": c.unet, "text_encoder_2": c.text_encoder_2}
        if c.text_encoder is not None:
            out["text_encoder"] = c.text_encoder
        return out


@dataclass
class InpaintPixels:
    """One job's inpaint inputs after the pixel steps of spec §12.2 (mask, outpaint, crop, fill)."""

    image: np.ndarray  # the (outpaint-padded) full image: what the result is pasted into
    soft_mask: np.ndarray  # morphological_open of the full mask: the colour_correction weight
    box: Box
    crop: np.ndarray  # the crop at its generation size (ESRGAN + shape ceil 1024)
    crop_mask: np.ndarray  # the crop mask at the generation size, 0/255
    fill: np.ndarray  # fooocus_fill of the crop (or the crop itself below full denoise)


@dataclass
class InpaintLatents:
    """The encoded inpaint inputs and the UNet changes, shared by every image of the job."""

    latent_fill: torch.Tensor  # VAE space
    mask: torch.Tensor  # latent mask, 1 = inpaint
    engine: InpaintEngine | None  # head + patch (None for the engine "None")
    pixels: InpaintPixels
    disable_initial_latent: bool


class SDXLRunner:
    """The engine's GPU side (``engine.core.jobs.Runner``) for SDXL base (+ refiner)."""

    #: Each image depends only on its own task seed, so the engine may run a job's images on
    #: several devices (``ctx.image_indices``) and get what one device makes.
    supports_image_subset = True

    def __init__(self, settings: Settings, *, model: str | os.PathLike[str] | None = None,
                 trace: Trace | None = None) -> None:
        self.settings = settings
        self.trace = trace
        self.registry = ModelRegistry.from_settings(settings)
        self.styles = StyleLibrary.load(_existing(settings.style_dirs, settings.data_dir / "sdxl_styles"))
        self.wildcards = WildcardLibrary(_existing(settings.wildcard_dirs, settings.data_dir / "wildcards"))
        self.device = resolve_device(settings.device)
        self.dtype = choose_dtype(self.device, settings.dtype)
        # acceleration hook: fast paths, torch.compile and low-VRAM residency (engine/sdxl/acceleration.py)
        self.accelerator = Accelerator(AccelerationConfig.from_settings(
            settings, self.device, compile_ahead=(DEFAULT_ASPECT_RATIO, "1024*1024")))
        self._operator_model = model if model is not None else settings.default_model
        #: Every loaded model of this device (issue 15): base checkpoints and refiners (each with its
        #: merged LoRAs and text cache), the upscaler, the inpaint patch, IP-Adapter + CLIP vision and
        #: Control-LoRA ControlNets, least recently used out first within the memory budget. The
        #: running job pins what it uses, so its base stays while its refiner or adapters load.
        # The budget follows where the weights live: in low-VRAM mode that is CPU memory (the GPU
        # only holds the streamed blocks), so the RAM rule applies there.
        weights_device = str(self.accelerator.load_device)
        cpu_workers = sum(1 for name in settings.devices if name == "cpu")  # they share the RAM
        self.models = ModelCache(default_budget_bytes(weights_device, configured_gb=settings.model_memory_gb,
                                                      ram_shares=cpu_workers),
                                 name=weights_device, after_evict=self._free_device_memory)
        #: The key of the base model the last job used (``base_components``); not a reference, so
        #: an evicted model is really freed.
        self._base_key: tuple[Any, ...] | None = None
        #: Set while a job runs: pins a cache key until the job ends.
        self._hold: Any = None
        self._expansion: FooocusExpansion | None = None
        self._expansion_checked = False
        self._expansion_warning: str | None = None
        #: FaceSwap's face detector (demo or set-up file), built once; it holds no GPU memory, so it
        #: stays out of the model cache.
        self._face_detector: tuple[bool, Any] | None = None
        self._enhance_masks: Any = None  # engine.masking.service.MaskGenerator, built on first use

    def enhance_masks(self) -> Any:
        """The Enhance mask models (engine/masking), loaded on first use, bounded cache."""
        if self._enhance_masks is None:
            from engine.masking.service import MaskGenerator

            self._enhance_masks = MaskGenerator(self.settings.models_dir, self.device)
        return self._enhance_masks

    @property
    def base_components(self) -> SDXLComponents | None:
        """The base model the last job used, None before the first load or after it was evicted
        (diagnostics, the parity test)."""
        loaded = self.models.peek(self._base_key) if self._base_key is not None else None
        return loaded.components if loaded is not None else None

    def memory_stats(self) -> CacheStats:
        """The model cache's budget, bytes and entries on this device (``/metrics``)."""
        return self.models.stats()

    def unload_models(self) -> int:
        """Free every loaded model of this device (after out-of-memory, or before another model
        family takes the device); the next job loads what it needs again. Returns the bytes the
        model cache released. On the worker thread, between jobs (it also drops the running job's pins)."""
        released = self.models.release()
        self._base_key = None
        self._expansion, self._expansion_checked, self._expansion_warning = None, False, None
        if self._enhance_masks is not None:
            self._enhance_masks.clear()
        self._free_device_memory()
        return released

    # -- names ---------------------------------------------------------------------------------

    @property
    def default_model_name(self) -> str:
        spec = self._operator_model
        if spec is None:
            names = self.registry.names("checkpoints")
            return names[0] if names else DEMO_MODEL
        path = Path(spec)
        return path.name if path.exists() else str(spec)

    def _model_spec(self, name: str) -> str | Path:
        """The loader spec for a model name. Only the operator's own model may be a path."""
        if name == DEMO_REFINER:
            return DEMO_MODEL
        operator = self._operator_model
        if operator is not None and name == self.default_model_name and Path(operator).exists():
            return Path(operator)
        return name

    def _model_known(self, name: str) -> bool:
        if name in (DEMO_MODEL, DEMO_REFINER, self.default_model_name):
            return True
        try:
            self.registry.resolve("checkpoints", name)
            return True
        except HooocusError:
            pass
        return "/" in name and find_in_hf_cache(name, cache_dir=self.settings.hf_cache_dir) is not None

    # -- Runner protocol -----------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        for field_name in ("base_model", "refiner_model"):
            name = getattr(request, field_name)
            if name is not None and name != "None" and not self._model_known(name):
                available = [DEMO_MODEL, *self.registry.names("checkpoints")]
                raise UnknownModel(f"unknown model {name!r}; available: {', '.join(available)}", loc=(field_name,))
        if request.styles is not None:
            self.styles.check(request.styles)
        if request.vae is not None:
            try:
                self.registry.resolve("vae", request.vae)
            except HooocusError as exc:
                exc.loc = ("vae",)  # the registry does not know which field the name came from
                raise
        mode_lora = PERFORMANCE_MODES[request.performance].lora
        base_name = request.base_model or self.default_model_name
        if mode_lora is not None and base_name != DEMO_MODEL and not self._lora_installed(mode_lora[0]):
            raise AssetsMissing(
                f"performance {request.performance!r} needs the LoRA {mode_lora[0]!r}: put it in a LoRA folder "
                f"({self.settings.models_dir / 'loras'}) or run 'hooocus setup --only performance-loras/{mode_lora[0]} "
                f"--data-dir {self.settings.data_dir}'", loc=("performance",))
        for index, lora in enumerate(request.loras):
            if lora.enabled and lora.name != "None":
                try:
                    self.registry.resolve("loras", lora.name)
                except HooocusError as exc:
                    raise UnknownLora(exc.message, loc=("loras", index, "name")) from None
        check_image_prompt_files(request.image_prompts, models_dir=self.settings.models_dir,
                                 data_dir=self.settings.data_dir, is_demo=base_name == DEMO_MODEL)
        if request.enhance is not None:
            self._check_enhance(request, is_demo=base_name == DEMO_MODEL)

    def _check_enhance(self, request: GenerationRequest, *, is_demo: bool) -> None:
        """model_missing for a tab's mask model or inpaint engine, before anything is queued."""
        from engine.masking.service import check_mask_files

        assert request.enhance is not None
        check_mask_files(self.settings.models_dir, request.enhance.tabs)
        if is_demo:
            return  # the demo model has in-memory inpaint weights
        for index, tab in enumerate(request.enhance.tabs):
            if tab.inpaint_engine == "None":
                continue
            for path in self._inpaint_files(tab.inpaint_engine):
                if not path.is_file():
                    group = INPAINT_SETUP_GROUPS[tab.inpaint_engine]
                    raise ModelMissing(f"enhance inpaint engine {tab.inpaint_engine} needs {path.name} in "
                                       f"{path.parent}: run 'hooocus setup --only {group} --data-dir "
                                       f"{self.settings.data_dir}'", loc=("enhance", "tabs", index, "inpaint_engine"))

    def options(self) -> dict[str, Any]:
        expansion_ok = self._expansion_available()
        models = list(dict.fromkeys([self.default_model_name, *self.registry.names("checkpoints"), DEMO_MODEL]))
        return {
            "models": models, "family": "sdxl", "model_families": dict.fromkeys(models, "sdxl"),  # issue 17
            "refiners": [*self.registry.names("checkpoints"), DEMO_REFINER],
            "loras": self.registry.names("loras"),
            "vaes": self.registry.names("vae"),
            "styles": self.styles.legal_names(),
            "default_styles": list(self.styles.default_styles(expansion_available=expansion_ok)),
            "samplers": list(SAMPLER_NAMES), "schedulers": list(SCHEDULER_NAMES),
            "aspect_ratios": list(SDXL_ASPECT_RATIOS), "performances": list(PERFORMANCE_NAMES),
            "expansion_available": expansion_ok,
            "defaults": GenerationRequest().model_dump(mode="json"),
        }

    def warmup(self) -> None:
        """Load the default model (and the expansion) before the first job; on the worker thread."""
        bind_thread_to_device(self.device)
        self._load_base(self.default_model_name, vae=None)
        self._expansion_available()

    def recover_after_oom(self) -> None:
        """Free every model the running job does not use (after a job: every model), then the
        allocator's cache. Inside a job (the VAE's tiled retry) the job's own models are pinned."""
        self.models.release_where(lambda _key: True)  # pinned entries stay
        if self._enhance_masks is not None:
            self._enhance_masks.clear()  # the mask models are reloaded on the next enhance pass
        self._free_device_memory()

    def _free_device_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, ctx: RunContext) -> None:
        bind_thread_to_device(self.device)  # several GPU workers: each thread on its own GPU
        with torch.inference_mode(), self.models.pinned() as self._hold:
            try:
                self._run(ctx)
            finally:
                self._hold = None

    # -- dynamic batching (issue 15) ---------------------------------------------------------

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """What jobs must share to run as one batched sampling loop; None = never batched.

        Batched: text-to-image without image prompts, with cfg ≉ 1 and a sampler whose rows stay
        independent (not heunpp2 / dpm_adaptive). A job of several images is several rows: loop
        ``i`` samples every job's image ``i`` (so a loop has at most as many rows as the batch has
        jobs). The key is what the sampling loop's shapes and weights depend on: model, VAE,
        performance (steps, sampler defaults, its LoRA), steps, size, sampler, scheduler, the refiner
        plan (model, switch, swap method), FreeU, the LoRA list. Prompts, seeds, image counts, cfg, sharpness, adaptive CFG, ADM scalers and clip skip
        are per job. Inline ``<lora:...>`` and wildcards are only known after resolution:
        :meth:`run_batch` splits a batch whose resolved plans differ."""
        if (request.image_task is not None or request.image_prompts or request.enhance is not None
                or math.isclose(request.cfg, 1.0)
                or request.sampler in NOT_ROW_INDEPENDENT):
            return None  # image prompts hook the UNet per job (issue 16): not in the batched loop yet
        size = (request.width, request.height) if request.width and request.height else request.aspect_ratio
        refiner = None if request.refiner_model in (None, "None") else (
            request.refiner_model, request.refiner_switch, request.refiner_switch_step, request.refiner_swap_method)
        # FreeU patches the shared UNet (its statistics are per image, so rows stay independent)
        freeu = request.freeu.model_dump_json() if request.freeu is not None and request.freeu.enabled else None
        return ("sdxl", request.base_model or self.default_model_name, request.vae, request.performance,
                request.steps, size, request.sampler, request.scheduler, refiner, freeu,
                tuple((lora.name, float(lora.weight), bool(lora.enabled)) for lora in request.loras))

    def run_batch(self, ctxs: list[RunContext]) -> list[BaseException | None]:
        """Run jobs whose :meth:`batch_key` agree as one batched sampling loop (UNet once per step for
        all of them); each job gets its own events in its own ctx.

        Returns one outcome per ctx, in order: None = finished, else the :class:`HooocusError` that
        ended it (:class:`JobCancelled` for a job cancelled mid-batch: its row leaves the batch at the
        next step, the others go on), exactly what ``run(ctx)`` would have raised. Any other
        exception is raised and ends every job of the batch, as it would end one ``run``.
        ``run_batch([ctx])`` is ``run(ctx)``."""
        if len(ctxs) == 1:
            try:
                self.run(ctxs[0])
            except HooocusError as exc:
                return [exc]
            return [None]
        with torch.inference_mode(), self.models.pinned() as self._hold:
            try:
                return self._run_batch(ctxs)
            finally:
                self._hold = None

    def _run_batch(self, ctxs: list[RunContext]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(ctxs)
        expansion_ok = self._expansion_available()
        available_loras = self.registry.names("loras")
        groups: dict[Hashable, list[_BatchJob]] = {}
        alone: list[int] = []
        for position, ctx in enumerate(ctxs):
            try:
                ctx.check_cancelled()
                if self.batch_key(ctx.request) is None:  # the engine should not send these; stay correct
                    alone.append(position)
                    continue
                resolved = self._resolve(ctx.request, expansion_ok, available_loras)
                if not _batchable(resolved):
                    alone.append(position)
                    continue
                resolved = self._announce(ctx, resolved)
                plan = process_resolved(resolved, style_library=self.styles, wildcards=self.wildcards,
                                        expansion=self._expansion, available_loras=available_loras)
                key = (resolved.base_model, resolved.vae, resolved.width, resolved.height, resolved.steps,
                       resolved.sampler, resolved.scheduler, resolved.denoise, tuple(plan.loras),
                       resolved.refiner_model, resolved.switch_step, resolved.refiner_swap_method,
                       resolved.freeu if resolved.freeu is not None and resolved.freeu.enabled else None)
                groups.setdefault(key, []).append(_BatchJob(position, ctx, resolved, plan))
            except HooocusError as exc:
                outcomes[position] = exc
        for jobs in groups.values():
            try:
                self._run_rows(jobs)
            except HooocusError as exc:  # e.g. a model that fails to load: every job of this group
                for job in jobs:
                    job.outcome = job.outcome or exc
            for job in jobs:
                outcomes[job.position] = job.outcome
        for position in alone:  # something the batched loop does not do (e.g. cfg 1): exactly run()
            try:
                self._run(ctxs[position])
            except HooocusError as exc:
                outcomes[position] = exc
        return outcomes

    def _run_rows(self, jobs: list[_BatchJob]) -> None:
        """Batched sampling for ``jobs`` (same resolved key; text-to-image). Loop ``i`` samples image
        ``i`` of every job that has one, so a loop never has more rows than the batch has jobs (the
        memory the engine's ``max_batch`` allows) and every job advances from the first loop on."""
        first = jobs[0].resolved
        warn = _WarnAll([job.ctx for job in jobs])
        base = self._load_base(first.base_model, vae=first.vae)
        refiner = self._load_refiner(first.refiner_model) if first.refiner_model else None
        self._apply_loras(base, jobs[0].plan.loras, warn)
        if refiner is not None:  # spec §8: performance LoRAs go to the base only
            perf = {first.performance_lora} if first.performance_lora else set()
            self._apply_loras(refiner, [entry for entry in jobs[0].plan.loras if entry not in perf], warn)
        for job in jobs:
            job.ctx.started(self._started_params(job.resolved, base, job.plan.tasks), job.resolved.seeds,
                            job.resolved.steps * len(job.plan.tasks))
        freeu = None
        if first.freeu is not None and first.freeu.enabled:
            f = first.freeu
            freeu = apply_freeu_v2(base.components.unet, b1=f.b1, b2=f.b2, s1=f.s1, s2=f.s2)
        try:
            for image in range(max(len(job.plan.tasks) for job in jobs)):
                rows = [(k, job, job.plan.tasks[image]) for k, job in enumerate(jobs)
                        if image < len(job.plan.tasks) and job.outcome is None]
                if rows:
                    self._sample_rows(base, refiner, rows)
        finally:
            if freeu is not None:
                freeu.remove()

    def _sample_rows(self, base: LoadedModel, refiner: LoadedModel | None,
                     rows: list[tuple[int, _BatchJob, PromptTask]]) -> None:
        """One batched sampling loop: row ``r`` is image ``task.index`` of batch job ``k``; the refiner
        swap (spec §8, joint or separate) happens for every row at the same step, as the key agrees."""
        first = rows[0][1].resolved
        comps = base.components
        device, dtype = comps.device, comps.dtype
        width, height = first.width, first.height
        ms = model_sampling_for(first.scheduler)
        sigma_plan = plan_sigmas(ms, first.sampler, first.scheduler, first.steps, denoise=first.denoise,
                                 fooocus_quirks=self.settings.fooocus_quirks)
        latent_shape = (1, 4, height // 8, width // 8)
        items: list[BatchItem] = []
        refiner_items: list[BatchItem] = []
        refiner_timed_adm = False
        noises: list[torch.Tensor] = []
        generators: list[torch.Generator] = []
        trees: list[BrownianNoise] = []
        for k, job, task in rows:
            r, ctx, prefix = job.resolved, job.ctx, _trace_prefix(k, task.index)
            ctx.progress(0, r.steps, stage="encode", image_index=task.index, image_count=len(job.plan.tasks))
            pos_cond, pos_pooled, neg_cond, neg_pooled = self._encode_prompts(base, r, task, prefix)
            adm = {"positive_scale": r.adm_scaler_positive, "negative_scale": r.adm_scaler_negative,
                   "device": device, "dtype": dtype}
            guidance = Guidance(cfg=r.cfg, sharpness=r.sharpness, adaptive_cfg=r.adaptive_cfg,
                                adm_scaler_end=r.adm_scaler_end)
            items.append(BatchItem(base_branch(pos_cond, pos_pooled, width, height, prompt_type="positive", **adm),
                                   base_branch(neg_cond, neg_pooled, width, height, prompt_type="negative", **adm),
                                   guidance))
            if refiner is not None:
                stage = self._refiner_stage(refiner, pos_cond, pos_pooled, neg_cond, neg_pooled, width, height,
                                            comps.text_encoder_2.config.hidden_size, adm)
                refiner_items.append(BatchItem(stage.positive, stage.negative, guidance))
                refiner_timed_adm = stage.timed_adm
            # each image its own seeded streams, exactly as when it runs alone (spec §7.4)
            noise, generator = prepare_noise(task.task_seed, latent_shape)
            noises.append(noise.to(device))
            generators.append(generator)
            trees.append(BrownianNoise(latent_shape, sigma_plan.brownian_sigma_min, sigma_plan.brownian_sigma_max,
                                       task.task_seed, device=device))
            self._record(f"{prefix}sigmas", sigma_plan.sigmas)
            self._record(f"{prefix}noise", noises[-1])
        denoiser = BatchedDenoiser(comps.unet, items, ms, compute_dtype=dtype)

        def drop_cancelled() -> None:
            for r, (_k, job, _task) in enumerate(rows):
                if denoiser.active[r] and _cancelled(job):
                    denoiser.active[r] = False

        denoiser.before_call = drop_cancelled  # a cancel between two UNet calls already saves the next
        drop_cancelled()
        steps = len(sigma_plan.sigmas) - 1
        switch = first.switch_step
        joint = refiner is not None and first.refiner_swap_method != "separate"
        step_offset = 0

        def swap_to_refiner() -> None:
            assert refiner is not None
            denoiser.unet, denoiser.items, denoiser.timed_adm = refiner.components.unet, refiner_items, refiner_timed_adm

        template = torch.zeros(latent_shape, device=device)
        sde = first.sampler in SDE_SAMPLERS

        def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            # per-image streams, concatenated in row order; a dropped row draws nothing (its stream
            # simply stops) and gets zeros, which its frozen row ignores
            parts = []
            for r in range(len(rows)):
                if not denoiser.active[r]:
                    parts.append(torch.zeros_like(template))
                elif sde:
                    parts.append(trees[r](sigma, sigma_next).to(device))
                else:
                    parts.append(randn_like(template, generators[r]))
            return torch.cat(parts)

        preview_every = self.settings.preview_every_n_steps

        def callback(state: dict[str, Any]) -> None:
            i = int(state["i"]) + step_offset
            drop_cancelled()
            if joint and i == switch:  # spec §8 quirk: the swap fires after step `switch` ran on the base
                swap_to_refiner()
            # joint: step `switch` itself still runs on the base; separate: the refiner starts at it
            refining = refiner is not None and (i > switch if joint else i >= switch)
            for r, (k, job, task) in enumerate(rows):
                if not denoiser.active[r]:
                    continue
                if self.trace is not None:
                    self._record(f"{_trace_prefix(k, task.index)}step{i:02d}.x", state["x"][r:r + 1])
                    self._record(f"{_trace_prefix(k, task.index)}step{i:02d}.denoised", state["denoised"][r:r + 1])
                job.ctx.progress(min(i + 1, steps), steps, stage="refine" if refining else "sample",
                                 image_index=task.index, image_count=len(job.plan.tasks))
                if (i + 1) % preview_every == 0 or i + 1 == steps:
                    job.ctx.preview(latent_to_rgb(state["denoised"][r].float()), step=min(i + 1, steps),
                                    image_index=task.index)
            if not any(denoiser.active):
                raise _BatchEmptied

        if not any(denoiser.active):
            return
        run = {"generator": None, "callback": callback, "model_sampling": ms, "noise_sampler": noise_sampler}
        noise = torch.cat(noises)
        try:
            if refiner is not None and not joint and 0 < switch < steps:
                # spec §8 "separate": base over sigmas[:switch+1], then the refiner continues from that
                # latent with zero new noise and the same per-row streams
                latent = sample(denoiser, first.sampler, sigma_plan.sigmas[: switch + 1], noise, **run)
                swap_to_refiner()
                step_offset = switch
                latent = sample(denoiser, first.sampler, sigma_plan.sigmas[switch:], torch.zeros_like(noise),
                                latent=latent, **run)
            else:
                latent = sample(denoiser, first.sampler, sigma_plan.sigmas, noise, **run)
        except _BatchEmptied:
            return
        for r, (k, job, task) in enumerate(rows):
            if not denoiser.active[r] or _cancelled(job):
                continue  # a cancel during the last step skips the decode
            try:
                self._record(f"{_trace_prefix(k, task.index)}latent", latent[r:r + 1])
                job.ctx.progress(steps, steps, stage="decode", image_index=task.index, image_count=len(job.plan.tasks))
                rgb = self._decode(comps, latent[r:r + 1], task.index, prefix=f"item{k}.")
                job.ctx.check_cancelled()
                overwrite_switch = job.ctx.request.refiner_switch_step or -1
                job.ctx.image(self._encode(job.resolved, task, base, refiner, rgb, task.index, job.plan.loras,
                                           overwrite_switch))
            except HooocusError as exc:
                job.outcome = exc

    # -- one job -------------------------------------------------------------------------------

    def _run(self, ctx: RunContext) -> None:
        ctx.check_cancelled()
        if ctx.request.enhance is not None:  # spec §12.6: passes of this same path (engine/sdxl/enhance.py)
            from engine.sdxl.enhance import EnhanceRun

            EnhanceRun(self, ctx).run()
            return
        expansion_ok = self._expansion_available()
        available_loras = self.registry.names("loras")  # one folder scan per job
        request = ctx.request
        image = ctx.inputs.get("input_image") if request.image_task is not None else None
        if request.image_task is not None and image is None:
            raise InvalidRequest("input_image was not resolved to pixels", loc=("input_image",))
        input_size = (int(image.shape[1]), int(image.shape[0])) if image is not None else None
        resolved = self._resolve(request, expansion_ok, available_loras, input_size)
        if getattr(ctx, "synthetic_refiner", None) is False and resolved.synthetic_refiner:
            # an Enhance pass (engine/sdxl/enhance.py) that Fooocus runs without the synthetic refiner
            resolved = dataclasses.replace(resolved, synthetic_refiner=False)
        if resolved.task == "upscale_fast":
            self._run_fast_upscale(ctx, resolved, image)
            return
        inpaint_pixels = None
        if resolved.task == "inpaint":
            inpaint_pixels = self._inpaint_pixels(ctx, resolved, image)
            if inpaint_pixels is None:
                # spec §12.2 step 4: no mask pixel > 127 and no outpaint side: Fooocus drops the inpaint
                # goal and runs text-to-image at the request's own size and prompt.
                ctx.warning("mask_empty", EMPTY_MASK_WARNING)
                plain = request.model_copy(update={"input_image": None, "inpaint_mask": None,
                                                   "inpaint_mask_upload": None, "outpaint_selections": []})
                resolved = dataclasses.replace(resolve_request(
                    plain, default_model=self.default_model_name,
                    default_styles=self.settings.default_styles or self.styles.default_styles(
                        expansion_available=expansion_ok),
                    style_library=self.styles, rng=random.SystemRandom(), available_loras=available_loras,
                    expansion_available=expansion_ok, fooocus_quirks=self.settings.fooocus_quirks),
                    seed=resolved.seed, seeds=resolved.seeds)
            else:
                self._inpaint_weights_present(resolved)  # model_missing before any model loads
        resolved = self._announce(ctx, resolved)
        uov_pixels = None
        if resolved.task in ("vary", "upscale"):
            uov_pixels = self._uov_pixels(resolved, image)
            if resolved.upscale_direct_return:  # spec §12.1 step 3: no diffusion above shape ceil 2800
                ctx.started({**resolved.to_public_dict(), "is_demo": False}, resolved.seeds[:1], 0)
                _keep_rgb(ctx, uov_pixels)
                ctx.image(self._pixels_image(resolved, uov_pixels, index=0, seed=resolved.seeds[0], metadata={}))
                return
        plan = process_resolved(resolved, style_library=self.styles, wildcards=self.wildcards,
                                expansion=self._expansion, available_loras=available_loras)
        base = self._load_base(resolved.base_model, vae=resolved.vae)
        refiner = self._load_refiner(resolved.refiner_model) if resolved.refiner_model else None
        self._apply_loras(base, plan.loras, ctx)
        if refiner is not None:  # spec §8: performance LoRAs go to the base only
            perf = {resolved.performance_lora} if resolved.performance_lora else set()
            self._apply_loras(refiner, [entry for entry in plan.loras if entry not in perf], ctx)
        uov_latent = None
        if uov_pixels is not None:
            # spec §12.1: one posterior-sampled encode per Generate (tiled for Upscale); every image of
            # the job starts from it. The generation size is the latent's (the encode crops to 8s).
            uov_latent = vae_encode(base.components.vae, _to_bchw(uov_pixels), posterior_generator(),
                                    tiled=resolved.task == "upscale")
            self._record("uov.latent", uov_latent)
            resolved = dataclasses.replace(resolved, width=int(uov_latent.shape[-1]) * 8,
                                           height=int(uov_latent.shape[-2]) * 8)
        inpaint = None
        if inpaint_pixels is not None:
            inpaint = self._inpaint_latents(resolved, base, inpaint_pixels)
            resolved = dataclasses.replace(resolved, width=int(inpaint.latent_fill.shape[-1]) * 8,
                                           height=int(inpaint.latent_fill.shape[-2]) * 8)
        ctx.started(self._started_params(resolved, base, plan.tasks), resolved.seeds, resolved.steps * len(plan.tasks))
        image_prompts = self._image_prompts(ctx, resolved, base)
        freeu = None
        if resolved.freeu is not None and resolved.freeu.enabled:
            f = resolved.freeu
            freeu = apply_freeu_v2(base.components.unet, b1=f.b1, b2=f.b2, s1=f.s1, s2=f.s2)
        try:
            wanted = getattr(ctx, "image_indices", None)  # a share of a job split over devices (engine)
            for task in plan.tasks:
                if wanted is None or task.index in wanted:
                    self._run_image(ctx, resolved, task, base, refiner, len(plan.tasks), plan.loras, uov_latent,
                                    inpaint, image_prompts)
        finally:
            if image_prompts is not None:
                image_prompts.remove()  # never leave IP-Adapter processors in the model cache
            if inpaint is not None and inpaint.engine is not None:
                inpaint.engine.remove()  # never leave a patched UNet in the model cache
            if freeu is not None:
                freeu.remove()

    def _run_image(self, ctx: RunContext, resolved: ResolvedRequest, task: PromptTask, base: LoadedModel,
                   refiner: LoadedModel | None, image_count: int, loras: list[tuple[str, float]],
                   uov_latent: torch.Tensor | None = None, inpaint: InpaintLatents | None = None,
                   image_prompts: ImagePromptRun | None = None) -> None:
        ctx.check_cancelled()
        index = task.index
        width, height = resolved.width, resolved.height
        comps = base.components
        ctx.progress(0, resolved.steps, stage="encode", image_index=index, image_count=image_count)
        pos_cond, pos_pooled, neg_cond, neg_pooled = self._encode_prompts(base, resolved, task, f"image{index}.")

        device, dtype = comps.device, comps.dtype
        adm = {"positive_scale": resolved.adm_scaler_positive, "negative_scale": resolved.adm_scaler_negative,
               "device": device, "dtype": dtype}
        base_stage = Stage(comps.unet,
                           base_branch(pos_cond, pos_pooled, width, height, prompt_type="positive", **adm),
                           base_branch(neg_cond, neg_pooled, width, height, prompt_type="negative", **adm),
                           timed_adm=True)
        refiner_stage = None
        if refiner is not None:
            refiner_stage = self._refiner_stage(refiner, pos_cond, pos_pooled, neg_cond, neg_pooled, width, height,
                                                comps.text_encoder_2.config.hidden_size, adm)

        ms = model_sampling_for(resolved.scheduler)
        sigma_plan = plan_sigmas(ms, resolved.sampler, resolved.scheduler, resolved.steps,
                                 denoise=resolved.denoise, fooocus_quirks=self.settings.fooocus_quirks)
        self._record(f"image{index}.sigmas", sigma_plan.sigmas)
        latent_shape = (1, 4, height // 8, width // 8)
        noise, generator = prepare_noise(task.task_seed, latent_shape)
        noise = noise.to(device)
        self._record(f"image{index}.noise", noise)
        brownian = BrownianNoise(latent_shape, sigma_plan.brownian_sigma_min, sigma_plan.brownian_sigma_max,
                                 task.task_seed, device=device)
        guidance = Guidance(cfg=resolved.cfg, sharpness=resolved.sharpness, adaptive_cfg=resolved.adaptive_cfg,
                            adm_scaler_end=resolved.adm_scaler_end)
        denoiser = SDXLDenoiser(base_stage, ms, guidance, compute_dtype=dtype)
        denoiser.guide = self.accelerator.guidance()
        if self.trace is not None:
            denoiser.unet_observers.append(self._unet_observer(index, denoiser))
        if image_prompts is not None:  # control residuals + the IP rows, per UNet call (spec §12.3/§12.4)
            denoiser.unet_extra = image_prompts.unet_kwargs
        steps = len(sigma_plan.sigmas) - 1
        switch = resolved.switch_step
        joint = refiner_stage is not None and resolved.refiner_swap_method != "separate"
        model: Any = denoiser
        engine = inpaint.engine if inpaint is not None else None
        # spec §8: with an inpaint engine and no user refiner, the last steps run without head and patch
        synthetic = engine is not None and refiner_stage is None and resolved.synthetic_refiner
        if inpaint is not None:
            # spec §12.2: the wrapper (its own (seed+1) generator) around the guided x0, every step, every stage
            wrapper = InpaintDenoiser(inpaint.latent_fill, inpaint.mask, task.task_seed,
                                      scaling_factor=comps.vae_scaling_factor)

            def model(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return wrapper(lambda x_in: denoiser(x_in, sigma, **kwargs), x, sigma)

            uov_latent = inpaint_start_latent(inpaint.latent_fill,
                                              disable_initial_latent=inpaint.disable_initial_latent)
        preview_every = self.settings.preview_every_n_steps
        step_offset = 0

        def callback(state: dict[str, Any]) -> None:
            ctx.check_cancelled()
            i = int(state["i"]) + step_offset
            if self.trace is not None:  # no name formatting or copies per step unless observed
                self._record(f"image{index}.step{i:02d}.x", state["x"])
                self._record(f"image{index}.step{i:02d}.denoised", state["denoised"])
            if joint and i == switch:  # spec §8 quirk: the swap fires after step `switch` ran on the base
                denoiser.stage = refiner_stage
                if image_prompts is not None:  # spec §12.4: the IP patches leave at the refiner swap
                    image_prompts.remove()
            if synthetic and i == switch and engine is not None:  # the synthetic refiner (same swap point)
                engine.remove()
            # joint: step `switch` itself still runs on the base; separate: the refiner starts at it
            refining = (refiner_stage is not None and (i > switch if joint else i >= switch)) or (synthetic and i > switch)
            stage_name = "refine" if refining else "sample"
            ctx.progress(min(i + 1, steps), steps, stage=stage_name, image_index=index, image_count=image_count)
            if (i + 1) % preview_every == 0 or i + 1 == steps:
                ctx.preview(latent_to_rgb(state["denoised"][0].float()), step=min(i + 1, steps), image_index=index)

        run = {"generator": generator, "brownian": brownian, "callback": callback, "model_sampling": ms}
        start = None if uov_latent is None else (uov_latent * comps.vae_scaling_factor).to(device)
        if engine is not None:  # the base UNet gets head + patch for this image's sampling only
            engine.remove()  # idempotent; the previous image's synthetic refiner already took them off
            engine.apply()
        if image_prompts is not None:
            image_prompts.install()
        try:
            if refiner_stage is not None and not joint and 0 < switch < steps:
                # spec §8 "separate": base over sigmas[:switch+1] (no forced 0), then the refiner continues
                # from that latent with zero new noise and the same Brownian tree.
                latent = sample(model, resolved.sampler, sigma_plan.sigmas[: switch + 1], noise, latent=start, **run)
                denoiser.stage = refiner_stage
                if image_prompts is not None:
                    image_prompts.remove()
                step_offset = switch
                latent = sample(model, resolved.sampler, sigma_plan.sigmas[switch:], torch.zeros_like(noise),
                                latent=latent, **run)
            else:
                latent = sample(model, resolved.sampler, sigma_plan.sigmas, noise, latent=start, **run)
        finally:
            if engine is not None:
                engine.remove()
            if image_prompts is not None:
                image_prompts.remove()
        self._record(f"image{index}.latent", latent)
        ctx.check_cancelled()  # a cancel during the last step skips the decode
        ctx.progress(steps, steps, stage="decode", image_index=index, image_count=image_count)
        rgb = self._decode(comps, latent, index, tiled=resolved.task == "upscale")
        if inpaint is not None:  # spec §12.2 post-processing: paste the crop back, blend with the soft mask
            px = inpaint.pixels
            rgb = color_correction(px.image, paste_back(px.image, rgb, px.box), px.soft_mask)
        ctx.check_cancelled()
        overwrite_switch = ctx.request.refiner_switch_step or -1  # Fooocus writes the user's override
        _keep_rgb(ctx, rgb)
        ctx.image(self._encode(resolved, task, base, refiner, rgb, index, loras, overwrite_switch))

    def _refiner_stage(self, refiner: LoadedModel, pos_cond: torch.Tensor, pos_pooled: torch.Tensor,
                       neg_cond: torch.Tensor, neg_pooled: torch.Tensor, width: int, height: int, g_width: int,
                       adm: dict[str, Any]) -> Stage:
        comps = refiner.components
        if comps.kind == "base":  # an SDXL base as refiner: conditioning unchanged (spec §8)
            return Stage(comps.unet,
                         base_branch(pos_cond, pos_pooled, width, height, prompt_type="positive", **adm),
                         base_branch(neg_cond, neg_pooled, width, height, prompt_type="negative", **adm),
                         timed_adm=True)
        # The SDXL refiner keeps the CLIP-G channels and the pooled vector (spec §8 clip_separate).
        args = {"device": comps.device, "dtype": comps.dtype}
        return Stage(comps.unet,
                     refiner_branch(pos_cond[..., -g_width:], pos_pooled, width, height,
                                    aesthetic_score=REFINER_POSITIVE_AESTHETIC, **args),
                     refiner_branch(neg_cond[..., -g_width:], neg_pooled, width, height,
                                    aesthetic_score=REFINER_NEGATIVE_AESTHETIC, **args),
                     timed_adm=False)

    def _decode(self, comps: SDXLComponents, latent: torch.Tensor, index: int, *, tiled: bool = False,
                prefix: str = "") -> np.ndarray:
        """VAE decode → clamp((x+1)/2) → uint8 by truncation, as Fooocus saves it (parity README).
        ``tiled``: Fooocus's tiled decode (spec §12.1 step 4, Upscale)."""
        vae = comps.vae
        if tiled:
            decoded01 = vae_decode(vae, (latent / comps.vae_scaling_factor).float(), tiled=True)
            image = decoded01[0].permute(1, 2, 0).cpu()
        else:
            z = (latent / comps.vae_scaling_factor).to(vae.device, vae.dtype)
            try:
                decoded = vae.decode(z, return_dict=False)[0]
            except torch.OutOfMemoryError:
                # Reliability matrix row 18: one retry with the tiled decoder, then give up.
                self.recover_after_oom()
                decoded = vae.tiled_decode(z, return_dict=False)[0]
            image = torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 0).cpu()
        self._record(f"{prefix}image{index}.decoded", image)
        return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)

    def _encode(self, resolved: ResolvedRequest, task: PromptTask, base: LoadedModel, refiner: LoadedModel | None,
                rgb: np.ndarray, index: int, loras: list[tuple[str, float]], overwrite_switch: int) -> ImageReady:
        scheme = None if resolved.metadata_scheme == "none" else resolved.metadata_scheme
        styles = list(task.styles)
        if task.expansion:
            styles = ["Fooocus V2", *styles]
        inp = MetadataInput(
            prompt=task.log_positive_prompt, negative_prompt=task.log_negative_prompt, expansion=task.expansion,
            styles=styles, performance=resolved.performance, steps=resolved.steps, width=resolved.width,
            height=resolved.height, cfg=resolved.cfg, sharpness=resolved.sharpness,
            adm=(resolved.adm_scaler_positive, resolved.adm_scaler_negative, resolved.adm_scaler_end),
            base_model=base.components.name, base_model_hash=self._hash10(base) if scheme else "",
            full_prompt=task.positive, full_negative_prompt=task.negative, seed=task.task_seed,
            sampler=resolved.sampler, scheduler=resolved.scheduler,
            refiner_model=refiner.components.name if refiner else None,
            refiner_model_hash=(self._hash10(refiner) if scheme else "") if refiner else None,
            refiner_switch=resolved.refiner_switch,
            overwrite_switch=overwrite_switch, refiner_swap_method=resolved.refiner_swap_method,
            adaptive_cfg=resolved.adaptive_cfg, clip_skip=resolved.clip_skip, vae=resolved.vae,
            freeu=(resolved.freeu.b1, resolved.freeu.b2, resolved.freeu.s1, resolved.freeu.s2)
            if resolved.freeu is not None and resolved.freeu.enabled else None,
            loras=[(name, weight, self.registry.hash10("loras", name) if scheme else "") for name, weight in loras],
            metadata_scheme=scheme, is_demo=base.components.is_demo)
        text = metadata_text(inp) if scheme else None
        data = encode_image(rgb, fmt=resolved.output_format, parameters=text, scheme=scheme)
        metadata = {key: value for _label, key, value in build_metadata_list(inp)}
        if base.components.is_demo:
            metadata["demo"] = "output of the built-in random-weight demo model, not a real image model"
        height, width = rgb.shape[:2]
        return ImageReady(job_id="", index=index, seed=task.task_seed, data=data,
                          mime=MIME_BY_FORMAT[resolved.output_format], width=width, height=height,
                          sha256=hashlib.sha256(data).hexdigest(), metadata=metadata)

    # -- shared steps of run and run_batch -----------------------------------------------------

    def _resolve(self, request: GenerationRequest, expansion_ok: bool, available_loras: list[str],
                 input_size: tuple[int, int] | None = None) -> ResolvedRequest:
        return resolve_request(
            request, default_model=self.default_model_name,
            default_styles=self.settings.default_styles or self.styles.default_styles(expansion_available=expansion_ok),
            style_library=self.styles, rng=random.SystemRandom(), available_loras=available_loras,
            expansion_available=expansion_ok, fooocus_quirks=self.settings.fooocus_quirks,
            input_size=input_size)

    def _announce(self, ctx: RunContext, resolved: ResolvedRequest) -> ResolvedRequest:
        """Emit the resolution's warnings (and the expansion's licence notice); drop a performance LoRA
        the demo model cannot have."""
        for code, message in resolved.warnings:
            ctx.warning(code, message)
        if resolved.use_expansion and self._expansion is not None:
            notice = self._expansion.take_notice()
            if notice:
                ctx.warning("non_commercial", notice)
        if (resolved.performance_lora is not None and resolved.base_model == DEMO_MODEL
                and not self._lora_installed(resolved.performance_lora[0])):
            # The demo model cannot use a real LoRA anyway: run the mode's sampler settings without it.
            ctx.warning("assets_missing", f"{resolved.performance_lora[0]} is not installed; the demo model runs "
                                          f"{resolved.performance} without it")
            resolved = dataclasses.replace(resolved, performance_lora=None, loras=resolved.user_loras)
        return resolved

    def _started_params(self, resolved: ResolvedRequest, base: LoadedModel, tasks: list[PromptTask]) -> dict[str, Any]:
        params = resolved.to_public_dict()
        params["base_model"] = base.components.name
        params["prompts"] = [{"seed": str(t.task_seed), "positive": t.positive, "negative": t.negative,
                              "expansion": t.expansion, "styles": t.styles} for t in tasks]
        params["is_demo"] = base.components.is_demo
        return params

    def _encode_prompts(self, base: LoadedModel, resolved: ResolvedRequest, task: PromptTask,
                        prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positive cond, pooled, negative cond, pooled) of one image, recorded under ``prefix``."""
        comps = base.components
        encoders = TextEncoders(comps.text_encoder, comps.text_encoder_2, comps.tokenizer, comps.tokenizer_2)
        pos_cond, pos_pooled = encode_texts(encoders, task.positive, pool_top_k=task.positive_top_k,
                                            clip_skip=resolved.clip_skip, cache=base.text_cache)
        if task.negative_is_positive:
            neg_cond, neg_pooled = pos_cond, pos_pooled
        else:
            neg_cond, neg_pooled = encode_texts(encoders, task.negative, pool_top_k=task.negative_top_k,
                                                clip_skip=resolved.clip_skip, cache=base.text_cache)
        self._record(f"{prefix}positive.cond", pos_cond)
        self._record(f"{prefix}positive.pooled", pos_pooled)
        self._record(f"{prefix}negative.cond", neg_cond)
        self._record(f"{prefix}negative.pooled", neg_pooled)
        return pos_cond, pos_pooled, neg_cond, neg_pooled

    # -- image tasks ---------------------------------------------------------------------------

    def _upscaler(self, resolved: ResolvedRequest) -> Upscaler:
        """The ESRGAN: the demo model's tiny in-memory one, else the set-up file (model_missing if absent)."""
        if resolved.base_model == DEMO_MODEL:
            from engine.sdxl.models.demo import build_demo_upscaler

            return self._cached(("upscaler", "demo", str(self.device)), lambda: build_demo_upscaler(self.device),
                                size_of=lambda up: tensor_bytes(up.network))
        path = self.settings.models_dir / UPSCALE_MODELS_DIR / UPSCALER_FILE_NAME
        try:  # keyed by size and mtime too, so a replaced file is reloaded
            stat = path.resolve().stat()
        except OSError:
            self.models.release_where(lambda key: key[0] == "upscaler" and key[1] != "demo")
            return load_upscaler(path, self.device)  # raises model_missing
        key = ("upscaler", str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(self.device))
        # A replaced file: its old network is stale, it goes now rather than when the LRU reaches it.
        self.models.release_where(lambda k: k[0] == "upscaler" and k[1] != "demo" and k != key)
        return self._cached(key, lambda: load_upscaler(path, self.device), size_of=lambda up: tensor_bytes(up.network),
                            size_hint_bytes=stat.st_size)

    def _uov_pixels(self, resolved: ResolvedRequest, image: np.ndarray) -> np.ndarray:
        """spec §12.1: Vary resizes to its clamped shape ceil; Upscale runs ESRGAN 4x, then resizes to the
        planned size (both LANCZOS). Sizes come from resolve (engine/imaging/sizes.py)."""
        if resolved.task == "upscale":
            image = upscale_image(self._upscaler(resolved), image)
        if image.shape[:2] != (resolved.height, resolved.width):
            image = resample_image(image, resolved.width, resolved.height)
        return image

    def _inpaint_pixels(self, ctx: RunContext, resolved: ResolvedRequest, image: np.ndarray) -> InpaintPixels | None:
        """spec §12.2 mask preparation, outpaint, crop, ESRGAN, fill; None when there is nothing to inpaint."""
        params = resolved.inpaint
        assert params is not None
        height, width = image.shape[:2]
        masks = []
        for name in ("inpaint_mask", "inpaint_mask_upload"):
            mask = ctx.inputs.get(name)
            if mask is not None and mask.shape[:2] != (height, width):
                mask = resample_image(mask, width, height)  # Fooocus resamples a mask to the image (LANCZOS)
            masks.append(mask)
        drawn, uploaded = masks
        if drawn is None:
            drawn = np.zeros((height, width), dtype=np.uint8)
        mask = merge_masks(drawn, uploaded)
        mask = erode_or_dilate(mask, params.erode_or_dilate)
        if params.invert_mask:
            mask = invert_mask(mask)
        sides = [side.lower() for side in params.outpaint_selections]
        if not needs_inpaint(mask, sides):
            return None
        if sides:
            padded = outpaint_pad(image, mask, sides)
            image, mask = padded.image, padded.mask
        full_h, full_w = image.shape[:2]
        box = solve_abcd(full_h, full_w, compute_initial_abcd(mask), params.respective_field)
        a, b, c, d = box
        crop, crop_mask = image[a:b, c:d], mask[a:b, c:d]
        if get_shape_ceil(*crop.shape[:2]) < INPAINT_SHAPE_CEIL_PX:
            crop = upscale_image(self._upscaler(resolved), crop)  # super-resolve small crops (spec §12.2 step 3)
        gen_h, gen_w = set_image_shape_ceil_hw(crop.shape[0], crop.shape[1], INPAINT_SHAPE_CEIL_PX)
        crop = np.array(resample_image(crop, gen_w, gen_h))  # writable: torch.from_numpy warns on read-only
        crop_mask = crop_mask_for_generation(crop_mask, gen_h, gen_w)
        fill = fooocus_fill(crop, crop_mask) if params.denoise > INPAINT_FILL_ABOVE_DENOISE else crop.copy()
        return InpaintPixels(image=image, soft_mask=morphological_open(mask), box=box, crop=crop,
                             crop_mask=crop_mask, fill=fill)

    def _inpaint_files(self, engine_version: str) -> tuple[Path, Path]:
        folder = self.settings.models_dir / INPAINT_MODELS_DIR
        return folder / INPAINT_HEAD_FILE, folder / INPAINT_PATCH_FILES[engine_version]

    def _inpaint_weights_present(self, resolved: ResolvedRequest) -> None:
        """model_missing naming the file and the set-up command, before anything loads or samples."""
        params = resolved.inpaint
        if params is None or params.engine == "None" or resolved.base_model == DEMO_MODEL:
            return
        for path in self._inpaint_files(params.engine):
            if not path.is_file():
                group = INPAINT_SETUP_GROUPS[params.engine]
                raise ModelMissing(f"inpaint engine {params.engine} needs {path.name} in {path.parent}: run "
                                   f"'hooocus setup --only {group} --data-dir {self.settings.data_dir}'",
                                   loc=("inpaint_engine",))

    def _inpaint_weights(self, resolved: ResolvedRequest, unet: torch.nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        """(head weight, patches): the demo's in-memory ones, else the set-up files (patch cached by path)."""
        params = resolved.inpaint
        assert params is not None
        if resolved.base_model == DEMO_MODEL:
            from engine.sdxl.models.demo import demo_inpaint_head, demo_inpaint_patches

            return demo_inpaint_head(unet), demo_inpaint_patches(unet, params.engine)
        from safetensors.torch import load_file

        self._inpaint_weights_present(resolved)
        head_path, patch_path = self._inpaint_files(params.engine)
        head = load_file(str(head_path))
        if INPAINT_HEAD_KEY not in head:
            raise ModelMissing(f"{head_path} has no {INPAINT_HEAD_KEY!r} tensor: not an inpaint head file; re-run "
                               "'hooocus setup --only inpaint'", loc=("inpaint_engine",))
        # The v2.6 patch file is 1.3 GB: read once and kept (within the budget); its tensors are as
        # big as the file, so the file size is its size.
        size = patch_path.stat().st_size
        patches = self._cached(("inpaint_patch", str(patch_path)),
                               lambda: fooocus_patches_from_state_dict(load_file(str(patch_path))),
                               size_of=lambda _patches: size, size_hint_bytes=size)
        return head[INPAINT_HEAD_KEY], patches

    def _inpaint_latents(self, resolved: ResolvedRequest, base: LoadedModel, px: InpaintPixels) -> InpaintLatents:
        """spec §12.2 "Latents" + head: one posterior generator for the task's encodes, in Fooocus's order
        (the grey-filled crop, then the fill); the head feature and the patch on the LoRA-merged UNet."""
        params = resolved.inpaint
        assert params is not None
        comps = base.components
        gen = posterior_generator()
        latent_inpaint = vae_encode(comps.vae, grey_filled_pixels(px.crop, px.crop_mask), gen)
        latent_fill = vae_encode(comps.vae, _to_bchw(px.fill), gen)
        lmask = latent_mask(px.crop_mask, (int(latent_fill.shape[-2]), int(latent_fill.shape[-1])))
        self._record("inpaint.latent_inpaint", latent_inpaint)
        self._record("inpaint.latent_fill", latent_fill)
        self._record("inpaint.latent_mask", lmask)
        engine = None
        if params.engine != "None":
            head, patches = self._inpaint_weights(resolved, comps.unet)
            feature = inpaint_head_feature(
                inpaint_head_feed(lmask.to(latent_inpaint), latent_inpaint, scaling_factor=comps.vae_scaling_factor),
                head.float())
            try:
                engine = InpaintEngine(comps.unet, patches, feature)
            except ValueError as exc:  # a patch made for another architecture
                raise InvalidRequest(str(exc), loc=("inpaint_engine",)) from None
        return InpaintLatents(latent_fill=latent_fill, mask=lmask, engine=engine, pixels=px,
                              disable_initial_latent=params.disable_initial_latent)

    def _image_prompts(self, ctx: RunContext, resolved: ResolvedRequest, base: LoadedModel) -> ImagePromptRun | None:
        """The job's image prompts at its final generation size (spec §12.3): demo weights for the demo
        model, else the set-up files (cached per base model and LoRA set)."""
        slots = ctx.request.image_prompts
        if not slots:
            return None
        unet = base.components.unet
        demo = resolved.base_model == DEMO_MODEL
        key = (base.key, base.loras)

        def ip_models(kind: str) -> Any:
            # Both kinds share the one CLIP vision tower, as in Fooocus: reuse the other kind's if loaded.
            others = (self.models.peek(("ip_adapter", base.key, k)) for k in IP_ADAPTER_KINDS if k != kind)
            shared = None if demo else next((m.vision for m in others if m is not None), None)

            def load() -> Any:
                if demo:
                    from engine.sdxl.models.demo import demo_ip_adapter

                    return demo_ip_adapter(unet, kind)
                return load_ip_models(self.settings.models_dir, unet, kind, vision=shared)

            # Built for this base model: it goes with it (see _load's on_evict). A shared vision tower is
            # counted in both entries: either may outlive the other, so the budget errs on the safe side.
            return self._cached(("ip_adapter", base.key, kind), load, size_of=lambda m: tensor_bytes(
                m.vision, m.resampler, m.kv, m.negative_tokens))

        def face_detector() -> Any:
            if self._face_detector is None or self._face_detector[0] != demo:
                if demo:
                    from engine.sdxl.models.demo import demo_face_detector

                    self._face_detector = (demo, demo_face_detector())
                else:
                    self._face_detector = (demo, load_face_detector(self.settings.models_dir))
            return self._face_detector[1]

        def controlnet_for(control_type: str) -> torch.nn.Module:
            def load() -> torch.nn.Module:
                if demo:
                    from engine.sdxl.models.demo import demo_controlnet

                    return demo_controlnet(unet, control_type)
                return load_controlnet(self.settings.models_dir, control_type, unet)

            # A copy of the LoRA-merged UNet: keyed by the base and its LoRA set; other LoRA sets'
            # copies are stale and go now rather than waiting for the LRU.
            self.models.release_where(lambda k: k[0] == "controlnet" and k[1] == control_type and k[2] != key)
            return self._cached(("controlnet", control_type, key), load, size_of=tensor_bytes)

        ctx.check_cancelled()
        return prepare_image_prompts(slots, ctx.inputs, width_px=resolved.width, height_px=resolved.height,
                                     base_unet=unet, model_sampling=model_sampling_for(resolved.scheduler),
                                     ip_models=ip_models, controlnet_for=controlnet_for, face_detector=face_detector)

    def _run_fast_upscale(self, ctx: RunContext, resolved: ResolvedRequest, image: np.ndarray) -> None:
        """Upscale (Fast 2x): ESRGAN then LANCZOS to 2x; no diffusion, no prompt processing (spec §12.1)."""
        ctx.started(resolved.to_public_dict(), resolved.seeds[:1], 0)
        pixels = fast_upscale_2x(self._upscaler(resolved), image)
        ctx.check_cancelled()
        scheme = None if resolved.metadata_scheme == "none" else resolved.metadata_scheme
        text, items = fast_upscale_metadata(scheme)
        _keep_rgb(ctx, pixels)
        ctx.image(self._pixels_image(resolved, pixels, index=0, seed=resolved.seeds[0],
                                     metadata={key: value for _label, key, value in items}, parameters=text))

    def _pixels_image(self, resolved: ResolvedRequest, rgb: np.ndarray, *, index: int, seed: int,
                      metadata: dict[str, Any], parameters: str | None = None) -> ImageReady:
        scheme = None if resolved.metadata_scheme == "none" else resolved.metadata_scheme
        data = encode_image(rgb, fmt=resolved.output_format, parameters=parameters,
                            scheme=scheme if parameters else None)
        height, width = rgb.shape[:2]
        return ImageReady(job_id="", index=index, seed=seed, data=data, mime=MIME_BY_FORMAT[resolved.output_format],
                          width=width, height=height, sha256=hashlib.sha256(data).hexdigest(), metadata=metadata)

    # -- models --------------------------------------------------------------------------------

    def _cached(self, key: tuple[Any, ...], load: Any, *, size_of: Any, size_hint_bytes: int = 0,
                on_evict: Any = None) -> Any:
        """``key`` from the model cache (else loaded), pinned for the running job."""
        value = self.models.get_or_load(key, load, size_of=size_of, size_hint_bytes=size_hint_bytes,
                                        on_evict=on_evict)
        if self._hold is not None:
            self._hold(key)
        return value

    def _load(self, name: str, *, kind: str, vae: str | None) -> LoadedModel:
        spec = self._model_spec(name)
        vae_path = self.registry.resolve("vae", vae) if vae else None
        key = ("checkpoint", str(spec), kind, str(vae_path), str(self.device), str(self.dtype))

        def load() -> LoadedModel:
            log.info("loading %s model %s", kind, name)
            components = load_sdxl(spec, kind=kind, device=self.accelerator.load_device, dtype=self.dtype,
                                   registry=self.registry, tokenizer_dir=self._tokenizer_dir(),
                                   hf_cache_dir=self.settings.hf_cache_dir, vae_path=vae_path)
            self.accelerator.apply(components)  # acceleration hook
            return LoadedModel(components, key)

        def unload(model: LoadedModel) -> None:
            self.accelerator.forget(model.components)  # acceleration hook: compiled calls hold the modules
            # Adapters built from this model's UNet hold parts of it: they go with it.
            self.models.release_where(lambda k: k[0] in ("ip_adapter", "controlnet") and _built_for(k, model.key))

        return self._cached(key, load, size_of=lambda m: tensor_bytes(*m.components_modules()),
                            size_hint_bytes=self._weights_file_bytes(spec), on_evict=unload)

    def _weights_file_bytes(self, spec: str | Path) -> int:
        """The checkpoint's size on disk: a lower bound of its loaded size (a float16 file loaded in
        float32 doubles), used to evict old models before the new one is read."""
        try:
            path = Path(spec) if Path(spec).exists() else self.registry.resolve("checkpoints", str(spec))
            if path.is_file():
                return path.stat().st_size
            return sum(p.stat().st_size for p in path.rglob("*.safetensors"))
        except (HooocusError, OSError):
            return 0  # the demo, a repo id: measured after loading

    def _load_base(self, name: str, *, vae: str | None) -> LoadedModel:
        loaded = self._load(name, kind="base", vae=vae)
        self._base_key = loaded.key
        return loaded

    def _load_refiner(self, name: str) -> LoadedModel:
        return self._load(name, kind="refiner", vae=None)

    def _tokenizer_dir(self) -> Path | None:
        if self.settings.clip_tokenizer_dir is not None:
            return self.settings.clip_tokenizer_dir
        candidate = self.settings.models_dir / "clip_tokenizer"
        return candidate if candidate.is_dir() else None

    def _apply_loras(self, model: LoadedModel, loras: list[tuple[str, float]], ctx: RunContext) -> None:
        """Merge exactly ``loras`` into the weights (spec §11.1: merged at load, not a runtime adapter)."""
        wanted = tuple((name, float(weight)) for name, weight in loras if float(weight) != 0.0)
        if wanted == model.loras:
            return
        modules = model.modules
        if model.merged is not None:
            model.merged.restore(modules)
            model.merged = None
        model.loras = ()
        model.text_cache.clear()
        matches = []
        c = model.components
        for name, weight in wanted:
            lora_file = load_lora(self.registry.resolve("loras", name))
            match = match_lora(lora_file, c.unet, [c.text_encoder, c.text_encoder_2])
            if match.warning:
                ctx.warning("lora_mismatch", match.warning)
            if not match.skipped:
                matches.append((match, weight))
        # Fooocus's CLIP weights stay float16 (so do its merged LoRAs); quirks off keeps full precision.
        model.merged = merge_loras(modules, matches,
                                   storage_dtypes=FOOOCUS_STORAGE_DTYPES if self.settings.fooocus_quirks else None)
        model.loras = wanted

    def _lora_installed(self, name: str) -> bool:
        try:
            self.registry.resolve("loras", name)
        except HooocusError:
            return False
        return True

    def _hash10(self, model: LoadedModel) -> str:
        if model.hash10 is None:
            path = model.components.path
            digest = self.registry.sha256(path) if path is not None else None
            model.hash10 = (digest or "")[:10] if digest else ("demo" if model.components.is_demo else "")
        return model.hash10

    def expansion(self) -> FooocusExpansion | None:
        """The Fooocus V2 expansion (loaded on first use), None when it is not installed; the FLUX.1
        runner of the same device uses this one rather than loading a second copy (engine/core/families.py)."""
        self._expansion_available()
        return self._expansion

    def _expansion_available(self) -> bool:
        if not self._expansion_checked:
            self._expansion_checked = True
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._expansion, self._expansion_warning = load_expansion(
                self.settings.resolved_expansion_dir, device=self.device, dtype=dtype)
            self._expansion = self.accelerator.expansion(self._expansion)  # acceleration hook
            if self._expansion_warning:
                log.warning("%s", self._expansion_warning)
        return self._expansion is not None

    # -- tracing -------------------------------------------------------------------------------

    def _record(self, name: str, value: Any) -> None:
        if self.trace is not None:
            self.trace.record(name, value.detach().clone() if isinstance(value, torch.Tensor) else value)

    def _unet_observer(self, index: int, denoiser: SDXLDenoiser):
        calls = {"n": 0}

        def observe(timestep: torch.Tensor, x_in: torch.Tensor, eps: torch.Tensor, rows: list[int]) -> None:
            # Fooocus's cond_or_uncond labels per batch row: 0 = positive, 1 = negative.
            cond_or_uncond = [0 if row == id(denoiser.stage.positive) else 1 for row in rows]
            self._record(f"image{index}.unet{calls['n']:02d}", {"timestep": timestep.clone(), "x_in": x_in.clone(),
                                                                 "eps": eps.clone(), "cond_or_uncond": cond_or_uncond})
            calls["n"] += 1

        return observe


def _built_for(adapter_key: Hashable, model_key: tuple[Any, ...]) -> bool:
    """Whether a cached adapter's key names ``model_key`` as the model it was built from."""
    parts = adapter_key if isinstance(adapter_key, tuple) else (adapter_key,)
    return any(part == model_key or (isinstance(part, tuple) and model_key in part) for part in parts)


def _keep_rgb(ctx: Any, rgb: np.ndarray) -> None:
    """Hand a finished image's pixels to an Enhance pass's context (engine/sdxl/enhance.py), which
    feeds them to the next pass without re-decoding the encoded file."""
    keep = getattr(ctx, "keep_rgb", None)
    if keep is not None:
        keep(rgb)


def _to_bchw(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> [1, 3, H, W] float32 in [0, 1] (what the VAE encode takes)."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).div(255.0).permute(2, 0, 1)[None]


def _existing(configured: tuple[Path, ...], default: Path) -> list[Path]:
    """Configured folders, else the set-up default when it exists (our own styles always load)."""
    if configured:
        return list(configured)
    return [default] if default.is_dir() else []


class _BatchEmptied(Exception):
    """Every row of a batch was cancelled: stop the sampler (each row's outcome is already set)."""


@dataclass
class _BatchJob:
    """One job of a batch: its place in ``run_batch``'s list, its context, its plan, how it ended."""

    position: int
    ctx: RunContext
    resolved: ResolvedRequest
    plan: PromptPlan
    outcome: BaseException | None = None


def _trace_prefix(k: int, index: int) -> str:
    """Trace names of image ``index`` of batch job ``k``."""
    return f"item{k}.image{index}."


def _cancelled(job: _BatchJob) -> bool:
    """Record a cancel as the job's outcome (its rows leave the batch); True once cancelled."""
    if isinstance(job.outcome, JobCancelled):
        return True
    try:
        job.ctx.check_cancelled()
    except JobCancelled as exc:
        job.outcome = exc
        return True
    return False


class _WarnAll:
    """A LoRA warning at the batch's shared merge goes to every job that uses those LoRAs."""

    def __init__(self, ctxs: list[RunContext]) -> None:
        self._ctxs = ctxs

    def warning(self, code: str, message: str) -> None:
        for ctx in self._ctxs:
            ctx.warning(code, message)


def _batchable(resolved: ResolvedRequest) -> bool:
    """After resolution: what the batched loop does (text-to-image, two branches, row-independent)."""
    return (resolved.task == "txt2img" and not math.isclose(resolved.cfg, 1.0)
            and resolved.sampler not in NOT_ROW_INDEPENDENT)
