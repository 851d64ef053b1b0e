"""The FLUX.1 runner (issue 17): the engine's ``Runner`` for FLUX.1 [schnell] and [dev] models.

One job = the variant's defaults and the refusals (engine/flux/semantics.py) → the prompt texts
per image through Fooocus's text features (styles, wildcards, arrays, V2 expansion; engine/prompts)
→ for each image: encode (CLIP-L pooled + T5), seeded start noise, the flow-matching Euler loop
(engine/flux/sampling.py) with the cancel token checked at every step, progress and Latent2RGB
previews, then the VAE decode and the file with its metadata. Not a wrapper around
``FluxPipeline.__call__``; its latents agree with it (tests/flux/test_flux_vs_diffusers.py).

Runs only on the engine's worker thread; holds all torch state of the Flux model.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import importlib
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.constants import (
    DEMO_FLUX_DEV_MODEL,
    DEMO_FLUX_MODEL,
    FOOOCUS_V2_STYLE,
    MAX_SEED,
    SDXL_ASPECT_RATIOS,
)
from engine.core.errors import HooocusError, ModelInvalid, ModelMissing, UnknownLora, UnknownModel
from engine.core.events import ImageReady
from engine.core.formats import MIME_BY_FORMAT
from engine.core.jobs import RunContext
from engine.core.request import GenerationRequest
from engine.core.settings import Settings
from engine.flux.components import FluxComponents
from engine.flux.demo import build_demo_flux
from engine.flux.encode import T5_MAX_TOKENS, FluxTextCache, FluxTextEmbedding, encode_prompt
from engine.flux.lora import (
    MergedFluxLoras,
    load_flux_lora,
    lora_fit_problem,
    match_flux_lora,
    merge_flux_loras,
    unmerge_flux_loras,
)
from engine.flux.lowvram import apply_flux_low_vram
from engine.flux.preview import flux_latent_to_rgb
from engine.flux.sampling import (
    denoised,
    euler_step,
    flux_sigmas,
    image_ids,
    latent_hw,
    model_timestep,
    start_noise,
    text_ids,
    unpack_latents,
)
from engine.flux.semantics import FluxSettings, check_flux_request, flux_settings
from engine.io.imageio import encode_image
from engine.io.metadata import MetadataInput, build_metadata_list, metadata_text
from engine.io.registry import ModelRegistry
from engine.prompts.assembly import PromptTask, process_prompt
from engine.prompts.expansion import FooocusExpansion, load_expansion
from engine.prompts.inline_loras import LoraEntry, canonical_lora_name
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import WildcardLibrary

log = logging.getLogger("hooocus.flux")

FAMILY = "flux"
#: The built-in tiny models: ``demo-flux`` is schnell-style, ``demo-flux-dev`` guidance-distilled.
DEMO_FLUX_VARIANTS = {DEMO_FLUX_MODEL: "schnell", DEMO_FLUX_DEV_MODEL: "dev"}
#: How the positive texts of one image (prompt, style lines, expansion) become FLUX.1's one prompt:
#: T5 reads a single sequence, so they are joined as one comma-separated text.
PROMPT_JOINER = ", "
#: How many LoRA files' fit results a runner remembers (a LoRA folder larger than this is re-checked).
MAX_LORA_FITS = 1024

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def is_demo_flux(name: str | os.PathLike[str] | None) -> bool:
    return name is not None and str(name) in DEMO_FLUX_VARIANTS


def sample_flux(components: FluxComponents, text: FluxTextEmbedding, *, seed: int, width: int, height: int,
                steps: int, guidance: float | None, device: torch.device | str, dtype: torch.dtype,
                callback: StepCallback | None = None) -> torch.Tensor:
    """The packed latent [1, L, 64] after ``steps`` Euler steps from ``seed``'s noise (FluxPipeline's
    ``output_type="latent"`` for the same inputs). ``callback(i, steps, x, x0)`` runs after step i
    (it may raise to stop); ``guidance`` is used only when the transformer has a guidance input."""
    transformer = components.transformer
    latent_h, latent_w = latent_hw(width, height)
    channels = transformer.config.in_channels // 4
    x = start_noise(seed, channels, latent_h, latent_w, device=device, dtype=dtype)
    img_ids = image_ids(latent_h, latent_w, device=device, dtype=dtype)
    txt_ids = text_ids(text.sequence.shape[1], device=device, dtype=text.sequence.dtype)
    sigmas = flux_sigmas(steps, x.shape[1], components.scheduler_config).to(device)
    guidance_in = None
    if transformer.config.guidance_embeds:
        guidance_in = torch.full([1], 3.5 if guidance is None else float(guidance), device=device,
                                 dtype=torch.float32).expand(x.shape[0])
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = transformer(hidden_states=x, timestep=model_timestep(sigma, x.shape[0], x.dtype),
                               guidance=guidance_in, pooled_projections=text.pooled,
                               encoder_hidden_states=text.sequence, txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False)[0]
        x0 = denoised(x, velocity, sigma) if callback is not None else None
        x = euler_step(x, velocity, sigma, sigma_next)
        if callback is not None:
            callback(i, steps, x, x0)
    return x


def decode_latents(components: FluxComponents, packed: torch.Tensor, width: int, height: int,
                   *, on_oom: Callable[[], None] | None = None) -> np.ndarray:
    """Packed latent -> uint8 HWC RGB: unpack, ``z / scaling + shift``, VAE decode, then
    ``round(clamp(x/2 + 0.5) · 255)`` as diffusers' image processor (FluxPipeline's PIL output).

    Out of memory in the decode: ``on_oom()`` (free what can be freed), then one retry with the tiled
    decoder, as the SDXL runner does (reliability matrix row 18); a second OOM propagates."""
    vae = components.vae
    latent_h, latent_w = latent_hw(width, height)
    z = unpack_latents(packed, latent_h, latent_w)
    z = (z / vae.config.scaling_factor + vae.config.shift_factor).to(next(vae.parameters()).device, vae.dtype)
    try:
        decoded = vae.decode(z, return_dict=False)[0]
    except torch.OutOfMemoryError:
        if on_oom is not None:
            on_oom()
        decoded = vae.tiled_decode(z, return_dict=False)[0]
    image = (decoded.float() * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
    return (image * 255).round().astype(np.uint8)


@dataclass
class LoadedFlux:
    components: FluxComponents
    spec: str
    text_cache: FluxTextCache = field(default_factory=FluxTextCache)
    hash10: str | None = None
    #: The (file name, weight) LoRA set merged into the weights now, and the originals it replaced
    #: (as LoadedModel.loras / .merged on the SDXL side): a job with another set restores them first.
    loras: tuple[LoraEntry, ...] = ()
    merged: MergedFluxLoras | None = None

    @property
    def is_demo(self) -> bool:
        return is_demo_flux(self.spec)


class FluxRunner:
    """The engine's GPU side (``engine.core.jobs.Runner``) for one FLUX.1 model.

    ``model``: a demo name (``demo-flux``, ``demo-flux-dev``) or what the Flux loader
    (``engine.flux.loading.load_flux``) accepts; ``components``: already-built modules (tests).
    """

    #: Each image depends only on its own task seed (and the job's LoRA set), so the engine may run a
    #: job's images on several devices (``ctx.image_indices``) and get what one device makes.
    supports_image_subset = True

    def __init__(self, settings: Settings, *, model: str | os.PathLike[str] | None = None,
                 components: FluxComponents | None = None) -> None:
        self.settings = settings
        self.styles = StyleLibrary.load(_existing(settings.style_dirs, settings.data_dir / "sdxl_styles"))
        self.wildcards = WildcardLibrary(_existing(settings.wildcard_dirs, settings.data_dir / "wildcards"))
        self.device = _resolve_device(settings.device)
        #: The same model folders (LoRAs: ``models_dir/loras`` + ``lora_dirs``) the SDXL runner lists.
        self.registry = ModelRegistry.from_settings(settings)
        #: A submit-time LoRA check may load the demo model from a door thread while the worker loads it.
        self._load_lock = threading.Lock()
        #: (path, size, mtime_ns) -> why that LoRA file does not fit this model (None: it fits); bounded LRU.
        self._lora_fits: collections.OrderedDict[tuple[str, int, int], str | None] = collections.OrderedDict()
        self._fits_lock = threading.Lock()
        self.dtype = _choose_dtype(self.device, settings.dtype)
        #: Low-VRAM mode (engine/flux/lowvram.py): weights are loaded on the CPU and visit the device
        #: one group at a time through diffusers' group-offloading hooks.
        self.low_vram = bool(settings.low_vram)
        spec = model if model is not None else settings.default_model
        self._spec = str(spec) if spec is not None else (components.name if components else DEMO_FLUX_MODEL)
        self._loaded: LoadedFlux | None = None
        self._given_components = components is not None
        if components is not None:
            self._loaded = LoadedFlux(self._placed(components), self._spec)
        self._expansion: FooocusExpansion | None = None
        self._expansion_checked = False
        #: Where the expansion comes from when another runner on this device already holds one (the
        #: SDXL runner's, set by engine.core.families): None = load its own.
        self.expansion_source: Callable[[], FooocusExpansion | None] | None = None
        #: Called as ``on_step(job_id, step)`` after each sampling step, after the cancel check (tests
        #: hold a job at a step with engine.core.testing.StepGate, as with the FakeRunner).
        self.on_step: Callable[[str, int], None] | None = None

    # -- names ---------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        path = Path(self._spec)
        return path.name if path.exists() else self._spec

    @property
    def variant(self) -> str:
        if self._loaded is not None:
            return self._loaded.components.variant
        return DEMO_FLUX_VARIANTS.get(self._spec, "dev")

    # -- Runner protocol -----------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        name = request.base_model
        if name is not None and name != self.model_name:
            raise UnknownModel(f"unknown model {name!r}; this server runs {self.model_name!r}", loc=("base_model",))
        check_flux_request(request, variant=self.variant, model_name=self.model_name)
        if request.styles is not None:
            self.styles.check(request.styles)
        self._check_loras(request)

    def _check_loras(self, request: GenerationRequest) -> None:
        """Every enabled LoRA resolves in the LoRA folders and fits this model (``unknown_lora`` at
        ``("loras", i, "name")`` otherwise, the code SDXL gives a LoRA it cannot use), from the files'
        headers. The fit needs the model's module layout: the demo models are built here if need be
        (they are tiny); a real model not loaded yet (warm-up still running) is checked at run time
        instead, where a LoRA that does not fit is skipped with a ``lora_mismatch`` warning as on SDXL."""
        for index, lora in enumerate(request.loras):
            if not lora.enabled or lora.name == "None":
                continue
            try:
                path = self.registry.resolve("loras", lora.name)
            except HooocusError as exc:
                raise UnknownLora(exc.message, loc=("loras", index, "name")) from None
            problem = self._lora_problem(path, lora.name)
            if problem is not None:
                raise UnknownLora(problem, loc=("loras", index, "name"))

    def _usable_loras(self) -> list[str]:
        """The LoRA folders' files that fit this model (all of them while a real model is still loading)."""
        return [entry.name for entry in self.registry.list("loras")
                if entry.usable and self._lora_problem(entry.path, entry.name) is None]

    def _lora_problem(self, path: Path, name: str) -> str | None:
        """:func:`engine.flux.lora.lora_fit_problem` for this model, remembered per file version (path,
        size, mtime) so listing the options does not reread every header; None when the model's layout is
        not known yet (a real model still loading: the run-time match decides then)."""
        loaded = self._loaded if self._loaded is not None or not is_demo_flux(self._spec) else self._load()
        if loaded is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return f"LoRA {name!r} cannot be read"
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._fits_lock:
            if key in self._lora_fits:
                self._lora_fits.move_to_end(key)
                return self._lora_fits[key]
        try:
            problem = lora_fit_problem(path, _lora_modules(loaded.components), name=name)
        except HooocusError as exc:  # unreadable or a pickle: the header check's own message
            problem = exc.message
        with self._fits_lock:
            self._lora_fits[key] = problem
            while len(self._lora_fits) > MAX_LORA_FITS:
                self._lora_fits.popitem(last=False)
        return problem

    def options(self) -> dict[str, Any]:
        expansion_ok = self._expansion_available()
        steps, guidance = (4, None) if self.variant == "schnell" else (28, 3.5)
        return {
            "models": [self.model_name], "model_families": {self.model_name: FAMILY},
            "family": FAMILY, "variant": self.variant,
            "refiners": [], "loras": self._usable_loras(), "vaes": [],
            "styles": self.styles.legal_names(),
            "default_styles": list(self.styles.default_styles(expansion_available=expansion_ok)),
            "samplers": [], "schedulers": [],
            "aspect_ratios": list(SDXL_ASPECT_RATIOS), "performances": ["Speed"],
            "expansion_available": expansion_ok,
            "defaults": {**GenerationRequest().model_dump(mode="json"), "base_model": self.model_name,
                         "steps": steps, "cfg": guidance},
        }

    def warmup(self) -> None:
        self._load()
        self._expansion_available()

    def unload_models(self) -> None:
        """Drop the loaded model so another model (of either family) can use the device
        (engine.core.families); the next job loads it again. Components handed in at construction
        cannot be rebuilt, so they stay. Worker thread."""
        with self._load_lock:
            if self._loaded is not None and not self._given_components:
                self._loaded = None
        self.recover_after_oom()

    def recover_after_oom(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, ctx: RunContext) -> None:
        with torch.inference_mode():
            self._run(ctx)

    # -- one job -------------------------------------------------------------------------------

    def _run(self, ctx: RunContext) -> None:
        ctx.check_cancelled()
        request = ctx.request
        loaded = self._load()
        comps = loaded.components
        fs = flux_settings(request, variant=comps.variant,
                           guidance_embeds=bool(comps.transformer.config.guidance_embeds))
        expansion_ok = self._expansion_available()
        styles = self.styles.check(request.styles if request.styles is not None else list(
            self.settings.default_styles or self.styles.default_styles(expansion_available=expansion_ok)))
        warnings = list(fs.warnings)
        use_expansion = FOOOCUS_V2_STYLE in styles
        if use_expansion and not expansion_ok:
            use_expansion = False
            warnings.append(("assets_missing", "'Fooocus V2' expansion assets are not installed; running without it"))
        seed = request.seed if request.seed is not None else random.SystemRandom().randint(0, MAX_SEED)
        available_loras = self.registry.names("loras")  # one folder scan per job, as on SDXL
        user_loras = [(canonical_lora_name(lora.name, available_loras, index), float(lora.weight))
                      for index, lora in enumerate(request.loras) if lora.enabled and lora.name != "None"]
        plan = process_prompt(
            request.prompt, request.negative_prompt, styles=styles, seed=seed, image_number=request.image_number,
            style_library=self.styles, wildcards=self.wildcards, expansion=self._expansion if use_expansion else None,
            use_expansion=use_expansion, disable_seed_increment=request.disable_seed_increment,
            read_wildcards_in_order=request.read_wildcards_in_order, cfg=request.cfg,
            loras=user_loras, available_loras=available_loras)
        for code, message in warnings:
            ctx.warning(code, message)
        if use_expansion and self._expansion is not None and (notice := self._expansion.take_notice()):
            ctx.warning("non_commercial", notice)
        seeds = [task.task_seed for task in plan.tasks]
        params = {
            "family": FAMILY, "variant": comps.variant, "base_model": self.model_name,
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "styles": list(styles),
            "use_expansion": use_expansion, "width": fs.width, "height": fs.height,
            "aspect_ratio": f"{fs.width}*{fs.height}", "steps": fs.steps, "guidance": fs.guidance,
            "seed": str(seed), "seeds": [str(s) for s in seeds], "image_number": request.image_number,
            "disable_seed_increment": request.disable_seed_increment,
            "read_wildcards_in_order": request.read_wildcards_in_order, "output_format": request.output_format,
            "metadata_scheme": request.metadata_scheme, "is_demo": loaded.is_demo,
            "loras": [[name, weight] for name, weight in plan.loras],
            "prompts": [{"seed": str(t.task_seed), "positive": t.positive, "expansion": t.expansion,
                         "styles": t.styles} for t in plan.tasks],
            "warnings": [{"code": code, "message": message} for code, message in warnings],
        }
        ctx.started(params, seeds, fs.steps * len(plan.tasks))
        self._apply_loras(loaded, plan.loras, ctx)
        wanted = getattr(ctx, "image_indices", None)  # a share of a job split over devices (engine)
        for task in plan.tasks:
            if wanted is None or task.index in wanted:
                self._run_image(ctx, loaded, fs, task, len(plan.tasks), request)

    def _run_image(self, ctx: RunContext, loaded: LoadedFlux, fs: FluxSettings, task: PromptTask,
                   image_count: int, request: GenerationRequest) -> None:
        ctx.check_cancelled()
        comps = loaded.components
        index = task.index
        ctx.progress(0, fs.steps, stage="encode", image_index=index, image_count=image_count)
        text = PROMPT_JOINER.join(task.positive)
        embedding = encode_prompt(comps, text, max_sequence_length=T5_MAX_TOKENS[comps.variant],
                                  device=self.device, cache=loaded.text_cache)
        preview_every = self.settings.preview_every_n_steps
        latent_h, latent_w = latent_hw(fs.width, fs.height)

        def on_step(i: int, steps: int, _x: torch.Tensor, x0: torch.Tensor) -> None:
            ctx.check_cancelled()
            ctx.progress(i + 1, steps, stage="sample", image_index=index, image_count=image_count)
            if self.on_step is not None:
                self.on_step(ctx.job_id, i + 1)
            if (i + 1) % preview_every == 0 or i + 1 == steps:
                ctx.preview(flux_latent_to_rgb(unpack_latents(x0, latent_h, latent_w)), step=i + 1,
                            image_index=index)

        # FluxPipeline draws the latents in the text embedding's dtype, not the transformer's (which is
        # float8 for a float8-stored model with per-layer upcast).
        dtype = embedding.sequence.dtype
        packed = sample_flux(comps, embedding, seed=task.task_seed, width=fs.width, height=fs.height,
                             steps=fs.steps, guidance=fs.guidance, device=self.device, dtype=dtype, callback=on_step)
        ctx.check_cancelled()  # a cancel during the last step skips the decode
        ctx.progress(fs.steps, fs.steps, stage="decode", image_index=index, image_count=image_count)
        rgb = decode_latents(comps, packed, fs.width, fs.height, on_oom=self.recover_after_oom)
        ctx.check_cancelled()
        ctx.image(self._encode(loaded, fs, task, text, rgb, request))

    def _encode(self, loaded: LoadedFlux, fs: FluxSettings, task: PromptTask, text: str, rgb: np.ndarray,
                request: GenerationRequest) -> ImageReady:
        scheme = None if request.metadata_scheme == "none" else request.metadata_scheme
        styles = list(task.styles)
        if task.expansion:
            styles = [FOOOCUS_V2_STYLE, *styles]
        inp = MetadataInput(
            prompt=task.log_positive_prompt, negative_prompt="", expansion=task.expansion, styles=styles,
            performance="Speed", steps=fs.steps, width=fs.width, height=fs.height,
            cfg=fs.guidance if fs.guidance is not None else 1.0, sharpness=0.0, adm=(1.0, 1.0, 0.0),
            base_model=self.model_name, base_model_hash=self._hash10(loaded) if scheme else "",
            full_prompt=[text], full_negative_prompt=[], seed=task.task_seed, sampler="euler",
            scheduler="simple", metadata_scheme=scheme, is_demo=loaded.is_demo, family=FAMILY,
            guidance=fs.guidance,
            loras=[(name, weight, self.registry.hash10("loras", name) if scheme else "") for name, weight in loaded.loras])
        parameters = metadata_text(inp) if scheme else None
        data = encode_image(rgb, fmt=request.output_format, parameters=parameters, scheme=scheme)
        metadata = {key: value for _label, key, value in build_metadata_list(inp)}
        if loaded.is_demo:
            metadata["demo"] = "output of the built-in random-weight demo-flux model, not a real image model"
        height, width = rgb.shape[:2]
        return ImageReady(job_id="", index=task.index, seed=task.task_seed, data=data,
                          mime=MIME_BY_FORMAT[request.output_format], width=width, height=height,
                          sha256=hashlib.sha256(data).hexdigest(), metadata=metadata)

    # -- models --------------------------------------------------------------------------------

    def _load(self) -> LoadedFlux:
        with self._load_lock:
            if self._loaded is None:
                log.info("loading FLUX.1 model %s", self.model_name)
                self._loaded = LoadedFlux(self._placed(self._build_components()), self._spec)
            return self._loaded

    def _apply_loras(self, loaded: LoadedFlux, loras: list[LoraEntry], ctx: RunContext) -> None:
        """Merge exactly ``loras`` into the weights (weight · alpha/rank · up@down, engine.flux.lora), as
        the SDXL runner does: the set merged now is kept, an equal set costs nothing, another set first
        restores the originals bit for bit, so a job without LoRAs after one with them sees the model
        as loaded. Encoded prompts are dropped with every change (CLIP-L may carry LoRA weights)."""
        wanted = tuple((name, float(weight)) for name, weight in loras if float(weight) != 0.0)
        if wanted == loaded.loras:
            return
        modules = _lora_modules(loaded.components)
        if loaded.merged is not None:
            unmerge_flux_loras(modules, loaded.merged)
            loaded.merged = None
        loaded.loras = ()
        loaded.text_cache.clear()
        matches = []
        for name, weight in wanted:
            try:
                match = match_flux_lora(load_flux_lora(self.registry.resolve("loras", name)), modules, name=name)
            except ModelInvalid as exc:  # unreadable, or a layout that cannot apply (Control, DoRA): as a misfit
                ctx.warning("lora_mismatch", f"LoRA {name!r} skipped: {exc.message}")
                continue
            if match.skipped or not match.deltas:
                ctx.warning("lora_mismatch", f"LoRA {name!r} skipped: {len(match.unmatched_keys)} of its tensors "
                                             f"match no weight of {self.model_name}")
                continue
            matches.append((match, weight))
        loaded.merged = merge_flux_loras(modules, matches)
        loaded.loras = tuple((m.name, w) for m, w in matches)

    def _placed(self, components: FluxComponents) -> FluxComponents:
        """``components`` with the low-VRAM hooks installed when that mode is on (weights on the CPU)."""
        if self.low_vram:
            apply_flux_low_vram(components, self.device)
        return components

    def _build_components(self) -> FluxComponents:
        # Low VRAM: the weights load into CPU memory; the hooks bring each group to the device when used.
        device = torch.device("cpu") if self.low_vram else self.device
        if self._spec in DEMO_FLUX_VARIANTS:
            return build_demo_flux(DEMO_FLUX_VARIANTS[self._spec], device=device,  # type: ignore[arg-type]
                                   dtype=self.dtype, name=self._spec)
        try:  # the weight-file loader (diffusers folders, single files, float8) lives in its own module
            loading = importlib.import_module("engine.flux.loading")
        except ModuleNotFoundError:
            raise ModelMissing(f"{self._spec}: this build has no FLUX.1 weight loader (engine.flux.loading); "
                               f"only the built-in {', '.join(DEMO_FLUX_VARIANTS)} run") from None
        return loading.load_flux(self._spec, device=device, dtype=self.dtype, settings=self.settings)

    def _hash10(self, loaded: LoadedFlux) -> str:
        if loaded.hash10 is None:
            path = Path(loaded.spec)
            if loaded.is_demo or not path.is_file():
                loaded.hash10 = "demo" if loaded.is_demo else ""
            else:  # the registry's hash is cached on disk per file version (a FLUX.1 file is 12–24 GB)
                loaded.hash10 = (self.registry.sha256(path) or "")[:10]
        return loaded.hash10

    def _expansion_available(self) -> bool:
        if not self._expansion_checked:
            self._expansion_checked = True
            if self.expansion_source is not None:  # shared: one GPT-2 per device, whichever family asks first
                self._expansion = self.expansion_source()
                return self._expansion is not None
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._expansion, warning = load_expansion(self.settings.resolved_expansion_dir, device=self.device,
                                                      dtype=dtype)
            if warning:
                log.warning("%s", warning)
        return self._expansion is not None


def _lora_modules(components: FluxComponents) -> dict[str, torch.nn.Module]:
    """The modules a FLUX.1 LoRA may change: the transformer and CLIP-L (T5 LoRAs are not a thing)."""
    return {"transformer": components.transformer, "text_encoder": components.text_encoder}


def _resolve_device(device: str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _choose_dtype(device: torch.device, requested: str) -> torch.dtype:
    """FLUX.1 is trained in bf16: bf16 on CUDA, float32 on the CPU, unless the settings name one."""
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _existing(configured: tuple[Path, ...], default: Path) -> list[Path]:
    """Configured folders, else the set-up default when it exists (our own styles always load)."""
    if configured:
        return list(configured)
    return [default] if default.is_dir() else []
