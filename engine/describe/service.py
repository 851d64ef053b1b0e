"""The Describer: what every front door calls to describe an image (spec §12.5).

How it runs, and why not as a job on the engine queue: the engine's queue, its history, its
wire events and every door's job views are typed to ``GenerationRequest`` and to images as
results; a second job kind would touch all of them at once. A describe is one short model call
with a text answer, so it runs here instead, with the same guarantees a job has where they matter:

- **bounded**: one worker thread, at most ``max_pending`` describes waiting or running (over it:
  ``queue_full``), each with a ``timeout_s`` (then it is cancelled);
- **cancel**: every describe has its own :class:`~engine.core.jobs.CancelToken` (checked after
  every BLIP token and before and after the tagger), so a door cancels it when its client goes away
  or asks to (websocket ``cancel``, MCP request cancellation, Ctrl-C);
- **one model on the device at a time**: it takes the engine's ``device_lock`` (held by the engine
  worker while a job runs), so a describe waits for the running generation instead of sharing the
  GPU with it; it does not wait for *queued* jobs (it is seconds, they are minutes).
- **bad input fails before anything runs**: :meth:`Describer.submit` validates the parameters
  (``extra="forbid"``) and resolves and decodes the image reference on the caller's thread, with the
  image-input errors and field path (``image``) of engine/core/inputs.py.

Nothing is imported or started at import; the worker thread starts with the first describe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.core.errors import (
    HooocusError,
    InvalidRequest,
    JobCancelled,
    QueueFull,
    ShuttingDown,
    pydantic_error_to_hooocus,
)
from engine.core.jobs import CancelToken
from engine.describe.text import DEFAULT_MODE, DescribeMode, join_prompts, modes_of, styles_for

if TYPE_CHECKING:
    import numpy as np

    from engine.core.settings import Settings

log = logging.getLogger("hooocus.describe")

#: Loc of the image in every door's describe input.
IMAGE_LOC = ("image",)
#: A describe on a GPU takes seconds; on a CPU BLIP takes tens of seconds. Past this it is cancelled.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_PENDING = 4
#: How often a describe waiting for the device lock looks at its cancel token.
_LOCK_POLL_S = 0.1


class DescribeParams(BaseModel):
    """The input of a describe, the same at every door: an image reference (``sha256:<hex>`` of an
    upload or one of your images, or a ``data:image/...;base64,`` URI) and the content type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: Annotated[str, Field(min_length=1, description="sha256:<hex> or data:image/...;base64,...")]
    mode: DescribeMode = Field(default=DEFAULT_MODE, description="photo (BLIP caption), anime (WD14 tags) or both")

    @classmethod
    def parse(cls, data: Any) -> DescribeParams:
        if isinstance(data, DescribeParams):
            return data
        if not isinstance(data, dict):
            raise InvalidRequest("describe takes an object {image, mode}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise pydantic_error_to_hooocus(exc) from None


@dataclass(frozen=True)
class DescribeResult:
    """``prompt`` as Fooocus fills the prompt box, ``styles`` as it sets them (spec §12.5)."""

    prompt: str
    styles: list[str]
    mode: str
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "styles": list(self.styles), "mode": self.mode,
                "elapsed_s": round(self.elapsed_s, 3)}


@dataclass
class DescribeTask:
    """One submitted describe: its id (``d_...``), owner, cancel token and result future."""

    task_id: str
    owner: str
    future: concurrent.futures.Future[DescribeResult]
    cancel_token: CancelToken = field(default_factory=CancelToken)

    def cancel(self, reason: str = "user") -> None:
        self.cancel_token.cancel(reason)


def new_task_id() -> str:
    return "d_" + secrets.token_hex(12)


#: (image reference, owner) -> H×W×3 uint8 RGB; raises the image-input errors with loc ("image",).
ResolveImage = Callable[[str, str], "np.ndarray"]


#: How long one blocking wait of :meth:`Describer.describe` lasts before it looks for a Ctrl-C.
_WAIT_SLICE_S = 0.1


class Describer:
    """Bounded, cancellable describes on one worker thread (module docstring)."""

    def __init__(self, settings: Settings, *, resolve_image: ResolveImage | None = None,
                 device_lock: threading.Lock | None = None, max_pending: int = DEFAULT_MAX_PENDING,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 run_mode: Callable[[str, np.ndarray, CancelToken], str] | None = None) -> None:
        self.settings = settings
        self.resolve_image = resolve_image or _inline_only
        self.device_lock = device_lock or threading.Lock()
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        #: (mode, rgb, cancel) -> prompt text; the real models by default, a stand-in in tests.
        self._run_mode = run_mode or self._run_model
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._tasks: dict[str, DescribeTask] = {}
        self._closed = False
        self._captioners: Any = None
        self._taggers: Any = None

    # -- submit / wait ---------------------------------------------------------------------------

    def submit(self, params: DescribeParams | dict[str, Any], *, owner: str = "local") -> DescribeTask:
        """Validate, resolve the image, and start (or queue) the describe. Raises before queueing."""
        params = DescribeParams.parse(params)
        rgb = self.resolve_image(params.image, owner)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down; no new describes are accepted")
            if len(self._tasks) >= self.max_pending:
                raise QueueFull(f"{len(self._tasks)} describes are already waiting (limit {self.max_pending}); "
                                "try again later")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                       thread_name_prefix="hooocus-describe")
            task = DescribeTask(task_id=new_task_id(), owner=owner, future=concurrent.futures.Future())
            self._tasks[task.task_id] = task
        self._executor.submit(self._execute, task, params.mode, rgb)
        return task

    def get_task(self, task_id: str, *, owner: str | None = None) -> DescribeTask | None:
        """A pending describe (someone else's is None, like an unknown one)."""
        with self._lock:
            task = self._tasks.get(task_id)
        return task if task is not None and (owner is None or task.owner == owner) else None

    def describe(self, params: DescribeParams | dict[str, Any], *, owner: str = "local",
                 timeout_s: float | None = None) -> DescribeResult:
        """Submit and wait (CLI, tests). A timeout or KeyboardInterrupt cancels the describe."""
        task = self.submit(params, owner=owner)
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        try:
            # Short waits: a KeyboardInterrupt (Ctrl-C, or _thread.interrupt_main) is only seen between
            # them, since a blocked lock wait does not wake up for it.
            while True:
                try:
                    return task.future.result(timeout=min(_WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
                except concurrent.futures.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
        except concurrent.futures.TimeoutError:
            task.cancel("timeout")
            raise JobCancelled("timeout") from None
        except BaseException:
            task.cancel("interrupted")
            raise

    async def describe_async(self, params: DescribeParams | dict[str, Any], *, owner: str = "local",
                             timeout_s: float | None = None,
                             on_submitted: Callable[[DescribeTask], None] | None = None) -> DescribeResult:
        """The doors' entry: image decoding happens off the loop; the wait is bounded by ``timeout_s``
        and cancelling the awaiting task (client gone, MCP cancel) cancels the describe."""
        task = await asyncio.to_thread(self.submit, params, owner=owner)
        if on_submitted is not None:
            on_submitted(task)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task.future)), limit)
        except TimeoutError:
            task.cancel("timeout")
            raise JobCancelled("timeout") from None
        except asyncio.CancelledError:
            task.cancel("client")
            raise

    def close(self) -> None:
        """Cancel every pending describe and stop the worker (it finishes the token it is on)."""
        with self._lock:
            self._closed = True
            tasks = list(self._tasks.values())
            executor, self._executor = self._executor, None
        for task in tasks:
            task.cancel("shutting_down")
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=False)

    # -- worker ----------------------------------------------------------------------------------

    def _execute(self, task: DescribeTask, mode: str, rgb: np.ndarray) -> None:
        started = time.monotonic()
        try:
            prompts = []
            for name in modes_of(mode):  # type: ignore[arg-type]
                task.cancel_token.raise_if_set()
                prompts.append(self._locked(task.cancel_token, lambda n=name: self._run_mode(n, rgb, task.cancel_token)))
            task.cancel_token.raise_if_set()
            result = DescribeResult(prompt=join_prompts(prompts), styles=styles_for(modes_of(mode)),  # type: ignore[arg-type]
                                    mode=mode, elapsed_s=time.monotonic() - started)
            task.future.set_result(result)
        except HooocusError as exc:
            task.future.set_exception(exc)
        except Exception as exc:  # a model failure must not kill the worker or leak a traceback to a client
            error_id = secrets.token_hex(6)
            log.exception("describe %s failed (error_id %s)", task.task_id, error_id)
            code = "out_of_memory" if type(exc).__name__ == "OutOfMemoryError" else "internal_error"
            task.future.set_exception(HooocusError(f"describe failed ({code}, error_id {error_id})", code=code,
                                                   details={"error_id": error_id}))
        finally:
            with self._lock:
                self._tasks.pop(task.task_id, None)

    def _locked(self, cancel: CancelToken, work: Callable[[], str]) -> str:
        while not self.device_lock.acquire(timeout=_LOCK_POLL_S):
            cancel.raise_if_set()
        try:
            return work()
        finally:
            self.device_lock.release()

    def _run_model(self, mode: str, rgb: np.ndarray, cancel: CancelToken) -> str:
        """The real models: BLIP for photo, the WD14 tagger for anime (loaded once, then cached)."""
        models_dir = self.settings.models_dir
        if mode == "photo":
            from engine.describe.blip import BLIP_DIR, CaptionerCache, resolve_device

            if self._captioners is None:
                self._captioners = CaptionerCache()
            captioner = self._captioners.get(models_dir / BLIP_DIR, resolve_device(self.settings.device))
            text = captioner.describe(rgb, is_cancelled=cancel.is_set)
        else:
            from engine.describe.blip import resolve_device
            from engine.describe.tagger import TAGGER_DIR, TaggerCache

            if self._taggers is None:
                self._taggers = TaggerCache()
            tagger = self._taggers.get(models_dir / TAGGER_DIR,
                                       use_cuda=resolve_device(self.settings.device).type == "cuda")
            text = tagger.describe(rgb)
        cancel.raise_if_set()  # a cancelled BLIP stops early with a partial caption: never return it
        return text


def _inline_only(reference: str, owner: str) -> np.ndarray:
    """Without a server's uploads: only ``data:`` URIs (sha256 references name nothing here)."""
    from engine.core.inputs import decode_image, parse_image_ref

    ref = parse_image_ref(reference, loc=IMAGE_LOC)
    if ref.kind != "data" or ref.data is None:
        raise InvalidRequest("this process keeps no uploads: give the image inline as a data URI", loc=IMAGE_LOC)
    return decode_image(ref.data, loc=IMAGE_LOC, kind="image")
