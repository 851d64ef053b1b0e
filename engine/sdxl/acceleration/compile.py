"""torch.compile behind a dispatcher that never stalls the worker for a compile."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from engine.sdxl.acceleration.config import CompilePolicy

log = logging.getLogger("hooocus.acceleration")

#: Compile modes that capture CUDA graphs: their outputs are overwritten by the next replay.
CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
_RECOMPILE_MESSAGE = "Detected recompile"


def configure_compile(cache_dir: Path | None) -> None:
    """Process-wide compile settings: a persistent inductor cache and room for one graph per
    aspect ratio and batch (dynamo falls back to eager silently past its recompile limit)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # torch reads these when it first needs a cache path; our own call sets them, not an import.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
        inductor_config.fx_graph_cache = True
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), 128))
    # diffusers' fast-diffusion recipe, also used by the measured baseline (spec/performance.md §8).
    inductor_config.conv_1x1_as_mm = True
    log.info("torch.compile: inductor cache %s, %s=%d", cache_dir, limit_name, getattr(dynamo_config, limit_name))


def _shape_key(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: dict[str, int]) -> tuple[Any, ...]:
    """Shapes/dtypes/devices of every tensor input (dynamic dims as -1) and the other values."""
    leaves, spec = tree_flatten((args, {k: v for k, v in kwargs.items() if k not in dynamic}))
    key: list[Any] = [str(spec)]
    for leaf in leaves:
        key.append((tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else repr(leaf))
    for name, dim in sorted(dynamic.items()):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            shape = list(value.shape)
            shape[dim] = -1
            key.append((name, tuple(shape), value.dtype, value.device))
    return tuple(key)


def _clone_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    with torch.inference_mode(False):
        return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))


class CompiledCall:
    """``torch.compile(owner.<attr>)`` behind a dispatcher installed as ``owner.<attr>``.

    Background policy: a call whose inputs have a compiled graph runs it (under dynamo's
    "fail_on_recompile" stance, so a guard change raises instead of compiling on the worker);
    anything else runs the eager method while a daemon thread compiles a clone of the inputs.
    While a compile is in flight every call runs eager (dynamo's caches are not touched from two
    threads at once). Blocking policy: plain compiled calls (compiling on first use).
    """

    def __init__(self, owner: Any, attr: str, *, mode: str | None, backend: str | Callable[..., Any],
                 policy: CompilePolicy, dynamic: dict[str, int] | None = None) -> None:
        # dynamo ignores hooks added after a compile unless told otherwise: FreeU installs hooks per
        # job, and a graph without them would silently drop FreeU. (A context variable in recent
        # torch: it holds for this thread and for the compile thread, which copies its context.)
        import torch._dynamo.config

        torch._dynamo.config.skip_nnmodule_hook_guards = False
        if backend != "inductor":  # modes are inductor options (tests use dynamo-only backends)
            mode = None
        self.owner, self.attr = owner, attr
        self.eager = getattr(owner, attr)
        self.compiled = torch.compile(self.eager, dynamic=False, fullgraph=True, mode=mode, backend=backend)
        self.policy = policy
        self.dynamic = dynamic or {}
        self.cudagraphs = mode in CUDAGRAPH_MODES
        #: Flip to False to time or debug the eager path; the compiled graphs stay cached.
        self.enabled = True
        self.compiled_keys: list[tuple[Any, ...]] = []
        self.failed_keys: set[tuple[Any, ...]] = set()
        self.eager_calls = 0
        self.compiled_calls = 0
        self._busy = threading.Lock()
        self._queue_lock = threading.Lock()
        self._pending: deque[tuple[tuple[Any, ...], tuple[Any, ...], dict[str, Any]]] = deque()
        self._pending_keys: set[tuple[Any, ...]] = set()
        self._thread: threading.Thread | None = None
        self._template: tuple[tuple[Any, ...], dict[str, Any], bool] | None = None
        self._ahead: list[tuple[int, int]] = []
        self._closed = False
        setattr(owner, attr, self)

    # -- dispatch ----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.eager(*args, **kwargs)
        self._mark_dynamic(kwargs)
        key = _shape_key(args, kwargs, self.dynamic)
        if key in self.failed_keys:
            return self._eager_call(args, kwargs)
        if self.policy == "blocking":
            try:
                return self._run_compiled(args, kwargs, key, strict=False)
            except Exception:  # noqa: BLE001 - a graph that cannot compile must not fail the job
                log.warning("compiling %s failed; that shape stays eager", self.attr, exc_info=True)
                self.failed_keys.add(key)
                return self._eager_call(args, kwargs)
        if not self._busy.acquire(blocking=False):  # a compile is in flight
            return self._eager_call(args, kwargs)
        try:
            if key not in self._pending_keys:
                try:
                    return self._run_compiled(args, kwargs, key, strict=True)
                except RuntimeError as exc:
                    if _RECOMPILE_MESSAGE not in str(exc):
                        raise
                self._schedule(key, *_clone_inputs(args, kwargs), front=True)
            if self._template is None:
                self._template = (*_clone_inputs(args, kwargs), torch.is_inference_mode_enabled())
                self._schedule_ahead()
        finally:
            self._busy.release()
        return self._eager_call(args, kwargs)

    def _eager_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.eager_calls += 1
        return self.eager(*args, **kwargs)

    def _run_compiled(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: tuple[Any, ...], *,
                      strict: bool) -> Any:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        stance = torch.compiler.set_stance("fail_on_recompile") if strict else contextlib.nullcontext()
        with stance:
            out = self.compiled(*args, **kwargs)
        self.compiled_calls += 1
        if key not in self.compiled_keys:
            self.compiled_keys.append(key)
        # CUDA-graph outputs live in a pool the next replay overwrites: hand out our own copy.
        return tree_map_only(torch.Tensor, torch.clone, out) if self.cudagraphs else out

    def _mark_dynamic(self, kwargs: dict[str, Any]) -> None:
        for name, dim in self.dynamic.items():
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(value, dim)

    # -- background compiles ---------------------------------------------------------------------

    def compile_ahead(self, latents: Sequence[tuple[int, int]]) -> None:
        """Compile these latent sizes (h, w) of the first input in the background, once a real call
        has shown the other inputs (dtypes, batch, context)."""
        self._ahead = [tuple(s) for s in latents]  # type: ignore[misc]
        if self._template is not None:
            self._schedule_ahead()

    def _schedule_ahead(self) -> None:
        assert self._template is not None
        args, kwargs, _ = self._template
        for height, width in self._ahead:
            first = args[0]
            with torch.inference_mode(False):
                resized = torch.randn((*first.shape[:-2], height, width), dtype=first.dtype, device=first.device)
            new_args = (resized, *args[1:])
            self._schedule(_shape_key(new_args, kwargs, self.dynamic), new_args, kwargs)

    def _schedule(self, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                  front: bool = False) -> None:
        if key in self._pending_keys or key in self.failed_keys or self._closed:
            return
        if not front and key in self.compiled_keys:
            return
        with self._queue_lock:
            self._pending_keys.add(key)
            if front:  # the shape a job is waiting for goes before the compile-ahead list
                self._pending.appendleft((key, args, kwargs))
            else:
                self._pending.append((key, args, kwargs))
            if self._thread is None:
                # torch's compile config lives in context variables (per thread): compile with ours.
                context = contextvars.copy_context()
                self._thread = threading.Thread(target=context.run, args=(self._compile_loop,),
                                                name="hooocus-compile", daemon=True)
                self._thread.start()

    def _compile_loop(self) -> None:
        while True:
            with self._queue_lock:
                if not self._pending or self._closed:
                    self._thread = None
                    return
            with self._busy:  # the worker runs eager meanwhile
                key, args, kwargs = self._pending[0]
                inference = self._template[2] if self._template is not None else True
                try:
                    with torch.inference_mode(inference):
                        self._mark_dynamic(kwargs)
                        self._run_compiled(args, kwargs, key, strict=False)
                    log.info("compiled %s for %s", self.attr, key[1:2])
                except Exception:  # a graph that cannot compile stays eager; the job never sees it
                    log.warning("compiling %s failed; that shape stays eager", self.attr, exc_info=True)
                    self.failed_keys.add(key)
                finally:
                    with self._queue_lock:
                        self._pending.popleft()
                        self._pending_keys.discard(key)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait for the background compiles queued so far (tests, warm-up scripts)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return not self._pending

    def remove(self) -> None:
        """Stop compiling and put the eager method back."""
        self._closed = True
        if vars(self.owner).get(self.attr) is self:
            delattr(self.owner, self.attr)  # the class's method shows through again
