"""Both model families behind one device worker (issue 17): the runner ``create_runtime`` gives each
device, routing every request to the SDXL runner or a FLUX.1 runner by the family of the model it names.

Why a dispatcher and not two engines: the engine has one queue and one worker per device; a server
that should answer ``demo`` and ``demo-flux`` (or an SDXL checkpoint and a FLUX.1 file from the same
checkpoints folder) must put both behind that worker, so a device never holds two jobs at once and the
fair-share queue stays one queue. Each family's runner is created lazily (the operator's default
model's family at once, as before), and before a job of the other family runs, the idle family's
weights are dropped (``unload_models``): an SDXL model and a FLUX.1 model do not both fit a 24 GB card.

The family of a model name comes from the weights (``engine.io.model_family`` / ``engine.io.family``:
the built-in names, a safetensors header, a diffusers folder's JSON), never from a download. This
module is family-neutral: the SDXL and Flux runners, and the io layer, are reached lazily inside
functions (the layering rule of engine/core), so importing it loads no torch.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Literal

from engine.core.constants import DEMO_FLUX_MODEL, DEMO_FLUX_MODELS, DEMO_MODEL, DEMO_REFINER
from engine.core.errors import HooocusError, UnknownModel
from engine.core.jobs import RunContext, Runner
from engine.core.request import GenerationRequest
from engine.core.settings import Settings

Family = Literal["sdxl", "flux"]
FAMILIES: tuple[Family, ...] = ("sdxl", "flux")
#: FLUX.1 runners kept per device (one per Flux model named since start; only one holds weights at a
#: time). An unloaded FluxRunner is small (styles, registry), but a server asked for many Flux files
#: must not grow without bound: the least recently used one is dropped past this.
MAX_FLUX_RUNNERS = 4
#: Model name -> family answers remembered (names come from clients; bounded LRU). Keyed with the
#: resolved file's (size, mtime) so a replaced file is read again.
MAX_FAMILY_CACHE = 256


class FamilyRunner:
    """The engine's ``Runner`` for one device that serves both families (see the module docstring).

    ``model``: the operator's default model (a name, path, repo id, ``demo`` or ``demo-flux``; None =
    ``settings.default_model``), used for requests that name no model; its family's runner is
    created at once and warmed up by the worker. ``factories`` (tests): ``{"sdxl": f, "flux": f}``
    with ``f(settings, model)`` building that family's runner.
    """

    #: Both runners honour ``ctx.image_indices`` (each image depends only on its own task seed).
    supports_image_subset = True

    def __init__(self, settings: Settings, *, model: str | os.PathLike[str] | None = None,
                 factories: dict[str, Callable[[Settings, str | None], Runner]] | None = None) -> None:
        self.settings = settings
        self._model = str(model) if model is not None else settings.default_model
        self._factories = factories or {}
        self._lock = threading.RLock()
        self._sdxl: Runner | None = None
        #: Flux model spec (demo name or resolved path) -> its FluxRunner; most recently used last.
        self._flux: collections.OrderedDict[str, Runner] = collections.OrderedDict()
        self._families: collections.OrderedDict[tuple[str, int, int], Family] = collections.OrderedDict()
        #: What holds weights on the device now: ("sdxl", None) or ("flux", spec); None before any load.
        self._resident: tuple[Family, str | None] | None = None
        self._on_step: Callable[[str, int], None] | None = None
        self._model_registry: Any = None
        self.default_family: Family = self._family_of_spec(self._model)
        #: The operator's FLUX.1 model as the Flux loader reads it (None when the default is SDXL).
        self._default_flux_spec = (self._resolve_flux(self._model)
                                   if self.default_family == "flux" and self._model is not None else None)
        self._default_runner()  # at once: the device label, and the operator's model is checked early

    # -- which family ----------------------------------------------------------------------------

    def family_of(self, name: str | None) -> Family:
        """The family of the model a request names (None: the operator's default model)."""
        if name is None or name == self._default_name():
            return self.default_family
        return self._family_of_spec(name)

    def _family_of_spec(self, spec: str | None) -> Family:
        if spec is None or spec in (DEMO_MODEL, DEMO_REFINER):
            return "sdxl"
        if spec in DEMO_FLUX_MODELS:
            return "flux"
        path = self._model_path(spec)
        if path is None:
            return "sdxl"  # unknown names stay with the SDXL runner, whose check names what exists
        try:
            stat = path.stat()
        except OSError:
            return "sdxl"
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._families:
                self._families.move_to_end(key)
                return self._families[key]
        from engine.io.model_family import model_family  # reads a header or a folder's JSON; no torch

        family: Family = model_family(path)
        with self._lock:
            self._families[key] = family
            while len(self._families) > MAX_FAMILY_CACHE:
                self._families.popitem(last=False)
        return family

    def _model_path(self, spec: str) -> Path | None:
        """Where the weights of ``spec`` are: the operator's own path, a checkpoints-folder name, or a
        repo id in the local Hugging Face cache; None when it is none of these."""
        path = Path(spec).expanduser()
        if spec == self._model and path.exists():
            return path
        try:
            return self._registry().resolve("checkpoints", spec)
        except HooocusError:
            pass
        if "/" in spec and not spec.startswith((".", "/", "~")):
            from engine.sdxl.models.loading import find_in_hf_cache  # a folder lookup, no download

            return find_in_hf_cache(spec, cache_dir=self.settings.hf_cache_dir)
        return None

    def _default_name(self) -> str | None:
        runner = self._default_runner()
        return getattr(runner, "model_name", None) or getattr(runner, "default_model_name", None)

    # -- the runners -----------------------------------------------------------------------------

    def _default_runner(self) -> Runner:
        return self._sdxl_runner() if self.default_family == "sdxl" else self._flux_runner(self._flux_spec(None))

    def _sdxl_runner(self) -> Runner:
        with self._lock:
            if self._sdxl is None:
                factory = self._factories.get("sdxl")
                # the SDXL runner's default model is the operator's only when that is an SDXL model
                model = self._model if self.default_family == "sdxl" else None
                if factory is not None:
                    self._sdxl = factory(self.settings, model)
                else:
                    from engine.sdxl.pipeline import SDXLRunner

                    self._sdxl = SDXLRunner(self.settings, model=model)
            return self._sdxl

    def _flux_spec(self, name: str | None) -> str:
        """The FluxRunner key (what the Flux loader reads) for a Flux model name: a demo name, or the
        path of the weights (a checkpoints-folder name resolved; the operator's own spec as resolved once)."""
        if name is None:
            return self._default_flux_spec if self._default_flux_spec is not None else DEMO_FLUX_MODEL
        if name in DEMO_FLUX_MODELS:
            return name
        if self._default_flux_spec is not None:
            default = self._flux.get(self._default_flux_spec)
            if name == self._model or (default is not None and name == getattr(default, "model_name", None)):
                return self._default_flux_spec
        return self._resolve_flux(name)

    def _resolve_flux(self, name: str) -> str:
        if name in DEMO_FLUX_MODELS:
            return name
        path = self._model_path(name)
        return str(path) if path is not None else name

    def _flux_runner(self, spec: str) -> Runner:
        with self._lock:
            runner = self._flux.get(spec)
            if runner is None:
                factory = self._factories.get("flux")
                if factory is not None:
                    runner = factory(self.settings, spec)
                else:
                    from engine.flux.runner import FluxRunner

                    runner = FluxRunner(self.settings, model=spec)
                if self._on_step is not None:
                    runner.on_step = self._on_step  # type: ignore[attr-defined]
                if hasattr(runner, "expansion_source"):  # one Fooocus V2 expansion per device, not one per family
                    runner.expansion_source = self._shared_expansion
                self._flux[spec] = runner
                # Past the bound, drop the least recently used runners, never the one whose weights
                # are on the device (a job may be running on it) nor the one just made.
                evictable = [k for k in self._flux if self._resident != ("flux", k) and k != spec]
                for old_spec in evictable[:max(0, len(self._flux) - MAX_FLUX_RUNNERS)]:
                    _unload(self._flux.pop(old_spec))
            self._flux.move_to_end(spec)
            return runner

    def _shared_expansion(self) -> Any:
        """The SDXL runner's Fooocus V2 expansion (the same words for the same prompt and seed either way)."""
        expansion = getattr(self._sdxl_runner(), "expansion", None)
        return expansion() if callable(expansion) else None

    def _route(self, request: GenerationRequest) -> tuple[Family, str | None, Runner]:
        """The request's model family, its FLUX.1 spec (None for SDXL) and that family's runner
        (created if need be; nothing loaded here). Read once per call: it may stat the weights."""
        family = self.family_of(request.base_model)
        if family == "sdxl":
            return family, None, self._sdxl_runner()
        spec = self._flux_spec(request.base_model)
        return family, spec, self._flux_runner(spec)

    def _for_flux(self, runner: Runner, request: GenerationRequest) -> GenerationRequest:
        """A FluxRunner serves one model and names it by its file name; the client may have said the stem."""
        name = getattr(runner, "model_name", None)
        if request.base_model is not None and name is not None and request.base_model != name:
            return request.model_copy(update={"base_model": name})
        return request

    @property
    def sdxl(self) -> Runner:
        """This device's SDXL runner (created on first use)."""
        return self._sdxl_runner()

    @property
    def flux(self) -> Runner:
        """This device's runner for the default FLUX.1 model (the operator's, else demo-flux)."""
        return self._flux_runner(self._flux_spec(None))

    # -- residency: one family's weights on the device ---------------------------------------------

    def _make_resident(self, family: Family, spec: str | None) -> None:
        """Drop every other runner's weights before ``family``/``spec`` loads (worker thread only)."""
        wanted = (family, spec)
        if self._resident == wanted:
            return
        with self._lock:
            others: list[Runner] = []
            if family != "sdxl" and self._sdxl is not None:
                others.append(self._sdxl)
            others += [r for s, r in self._flux.items() if (family, s) != wanted]
        for other in others:
            _unload(other)
        self._resident = wanted

    # -- Runner protocol -------------------------------------------------------------------------

    @property
    def device(self) -> Any:
        return getattr(self._default_runner(), "device", self.settings.device)

    @property
    def on_step(self) -> Callable[[str, int], None] | None:
        return self._on_step

    @on_step.setter
    def on_step(self, hook: Callable[[str, int], None] | None) -> None:
        """Forwarded to every FLUX.1 runner (tests hold a job at a step, engine.core.testing.StepGate)."""
        self._on_step = hook
        with self._lock:
            for runner in self._flux.values():
                runner.on_step = hook  # type: ignore[attr-defined]

    def check(self, request: GenerationRequest) -> None:
        family, _spec, runner = self._route(request)
        if family == "flux":
            runner.check(self._for_flux(runner, request))
            return
        try:
            runner.check(request)
        except UnknownModel as exc:
            if exc.loc != ("base_model",):
                raise
            # A name no family knows lands with the SDXL runner, whose list has the checkpoints folder
            # (FLUX.1 files included) but not the built-in FLUX.1 models this server also runs.
            raise UnknownModel(f"{exc.message}; FLUX.1: {', '.join(DEMO_FLUX_MODELS)}", loc=exc.loc) from None

    def run(self, ctx: RunContext) -> None:
        family, spec, runner = self._route(ctx.request)
        self._make_resident(family, spec)
        runner.run(ctx)

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """The family's own key, tagged with the family: jobs of two families never share a batch."""
        family, _spec, runner = self._route(request)
        key_of = getattr(runner, "batch_key", None)
        if not callable(key_of) or not callable(getattr(runner, "run_batch", None)):
            return None
        key = key_of(request)
        return None if key is None else (family, key)

    def run_batch(self, ctxs: list[RunContext]) -> list[BaseException | None]:
        if len(ctxs) == 1:  # run_batch([ctx]) is run(ctx), whatever the family
            try:
                self.run(ctxs[0])
            except HooocusError as exc:
                return [exc]
            return [None]
        # Only jobs with equal batch keys reach here, so one family (the key carries it) and one model.
        family, spec, runner = self._route(ctxs[0].request)
        self._make_resident(family, spec)
        return runner.run_batch(ctxs)  # type: ignore[attr-defined]

    @property
    def styles(self) -> Any:
        """The default family's style library (both families read the same files): the doors recover
        A1111 style names from prompt text with it (hooocus_ws/parameters.py)."""
        return getattr(self._default_runner(), "styles", None)

    def memory_stats(self) -> Any:
        """The SDXL runner's loaded-model cache (``/metrics``: budget, bytes, entries, evictions), or
        None before it exists. FLUX.1 weights are not in that cache; one Flux model at most is resident."""
        with self._lock:
            sdxl = self._sdxl
        stats = getattr(sdxl, "memory_stats", None)
        return stats() if callable(stats) else None

    def recover_after_oom(self) -> None:
        with self._lock:
            runners = [r for r in (self._sdxl, *self._flux.values()) if r is not None]
        for runner in runners:
            runner.recover_after_oom()

    def warmup(self) -> None:
        """Load the operator's default model (its family's runner) before the first job."""
        runner = self._default_runner()
        spec = None if self.default_family == "sdxl" else self._flux_spec(None)
        self._make_resident(self.default_family, spec)
        warmup = getattr(runner, "warmup", None)
        if callable(warmup):
            warmup()

    def options(self) -> dict[str, Any]:
        """The default model's family's options, with ``models`` / ``model_families`` listing both
        families' models (GET /v1/options, MCP list_options) and ``families`` giving each family's
        own LoRAs, defaults, samplers and performances (they differ: FLUX.1 has no sampler choice)."""
        sdxl = self._sdxl_runner().options()
        flux_runner = self._flux_runner(self._flux_spec(None))
        flux = flux_runner.options()
        default = sdxl if self.default_family == "sdxl" else flux
        flux_models = [*flux["models"], *(name for name in DEMO_FLUX_MODELS if name not in flux["models"]),
                       *self._flux_checkpoints()]
        families = {**dict.fromkeys(sdxl["models"], "sdxl"), **dict.fromkeys(flux_models, "flux")}
        first = default["models"][0]
        models = list(dict.fromkeys([first, *sdxl["models"], *flux_models]))
        per_family = {name: {key: opts[key] for key in ("loras", "defaults", "samplers", "schedulers",
                                                          "performances", "refiners", "vaes") if key in opts}
                      for name, opts in (("sdxl", sdxl), ("flux", flux))}
        return {**default, "models": models, "model_families": {name: families[name] for name in models},
                "family": self.default_family, "families": per_family}

    def _flux_checkpoints(self) -> list[str]:
        """FLUX.1 files and folders in the checkpoints folders (the registry lists them as not SDXL)."""
        return [entry.name for entry in self._registry().list("checkpoints")
                if (entry.architecture or "").startswith("flux_")]

    def _registry(self) -> Any:
        """One model registry (its folder scans are cached) for the family look-ups."""
        with self._lock:
            if self._model_registry is None:
                from engine.io.registry import ModelRegistry

                self._model_registry = ModelRegistry.from_settings(self.settings)
            return self._model_registry


def _unload(runner: Runner) -> None:
    unload = getattr(runner, "unload_models", None)
    if callable(unload):
        unload()
