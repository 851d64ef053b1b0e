"""Jobs and the global interrupt mutex: one GPU worker thread, a bounded queue, per-job cancel.

This module never imports torch. It is the explicit boundary between the job queue (used by the
async front doors) and the GPU worker (a :class:`Runner`, the only code that touches torch).
A later multi-GPU or Ray Serve deployment replaces the worker side and keeps this interface.

Concurrency rules (house style A9.3 #9):
- exactly one worker thread runs jobs, so at most one job holds the GPU at any time;
- every job has its own :class:`CancelToken`; cancelling job A never touches job B, and there is
  no process-global "interrupted" flag to clear;
- ``submit``/``cancel`` never block on the worker; listeners are called synchronously from the
  emitting thread and must not block (front doors hand events to their loop with
  ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from engine.core.errors import (
    HooocusError,
    InvalidRequest,
    JobCancelled,
    NotFound,
    QueueFull,
    ShuttingDown,
    UnknownPreset,
)
from engine.core.events import (
    Cancelled,
    Done,
    Event,
    Failed,
    ImageReady,
    JobWarning,
    Preview,
    Progress,
    Queued,
    Started,
)
from engine.core.request import GenerationRequest

if TYPE_CHECKING:  # the core stays numpy-free at import
    import numpy as np

log = logging.getLogger("hooocus.jobs")

Listener = Callable[[Event], None]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.CANCELLED, JobState.FAILED)


class CancelToken:
    """A per-job cancel flag. ``raise_if_set`` is called by the sampler at every step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str = "user") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise JobCancelled(self.reason or "user")


class Job:
    """One submitted request and its event stream. Created only by :meth:`Engine.submit`."""

    def __init__(self, job_id: str, request: GenerationRequest, owner: str, *,
                 max_events: int = 4096) -> None:
        self.job_id = job_id
        self.request = request
        self.owner = owner
        #: The request's input images decoded at submit (engine.core.inputs), keyed by field name;
        #: dropped when the job ends so finished jobs do not hold megapixels of arrays.
        self.inputs: Mapping[str, np.ndarray] = {}
        self.cancel_token = CancelToken()
        self.state = JobState.QUEUED
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.images: list[ImageReady] = []
        self.seeds: tuple[int, ...] = ()
        self.resolved_params: dict[str, Any] = {}
        self.error: dict[str, Any] | None = None
        self.last_progress: Progress | None = None
        self.latest_preview: Preview | None = None
        self._events: collections.deque[Event] = collections.deque(maxlen=max_events)
        self._seq = itertools.count(1)
        self._listeners: list[Listener] = []
        self._cond = threading.Condition(threading.RLock())

    # -- event stream ------------------------------------------------------------------------

    def emit(self, event: Event) -> Event:
        """Record ``event`` (assigning its seq) and hand it to every listener, in order."""
        with self._cond:
            event = replace(event, job_id=self.job_id, seq=next(self._seq))
            if isinstance(event, Preview):
                self.latest_preview = event
            else:
                self._events.append(event)
            self._apply(event)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:  # a broken listener must never break the job
                    log.exception("job listener failed", extra={"job_id": self.job_id})
            self._cond.notify_all()
        return event

    def _apply(self, event: Event) -> None:
        if isinstance(event, Started):
            self.state = JobState.RUNNING
            if self.started_at is None:  # the engine sets it when the worker takes the job; a mirror here
                self.started_at = time.time()
            self.seeds = tuple(event.seeds)
            self.resolved_params = dict(event.params)
        elif isinstance(event, Progress):
            self.last_progress = event
        elif isinstance(event, ImageReady):
            self.images.append(event)
        elif isinstance(event, Done):
            self.state = JobState.DONE
        elif isinstance(event, Cancelled):
            self.state = JobState.CANCELLED
        elif isinstance(event, Failed):
            self.state = JobState.FAILED
            self.error = {"code": event.code, "message": event.message, "error_id": event.error_id}
        if self.state.terminal and self.finished_at is None:
            self.finished_at = time.time()

    def subscribe(self, listener: Listener, *, after_seq: int | None = 0) -> Callable[[], None]:
        """Replay recorded events with seq > ``after_seq`` (None: no replay), then follow live.

        Replay and registration happen under the job lock, so no event is lost or doubled.
        Returns a function that removes the listener.
        """
        with self._cond:
            if after_seq is not None:
                for event in list(self._events):
                    if event.seq > after_seq:
                        listener(event)
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def events_after(self, seq: int = 0) -> list[Event]:
        with self._cond:
            return [e for e in self._events if e.seq > seq]

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job is finished; True if it finished within ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state.terminal, timeout=timeout_s)

    def iter_events(self, timeout_s: float | None = None, *, include_previews: bool = False) -> Iterator[Event]:
        """Blocking iterator over the whole stream (for the CLI and tests). Ends after the terminal event."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_seq = 0
        last_preview_seq = 0
        while True:
            with self._cond:
                pending = [e for e in self._events if e.seq > last_seq]
                preview = self.latest_preview
                if include_previews and preview is not None and preview.seq > last_preview_seq:
                    pending.append(preview)
                    pending.sort(key=lambda e: e.seq)
                if not pending:
                    if self.state.terminal:
                        return
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"job {self.job_id} still {self.state.value}")
                    self._cond.wait(timeout=remaining)
                    continue
            for event in pending:
                if isinstance(event, Preview):
                    last_preview_seq = event.seq
                else:
                    last_seq = event.seq
                yield event

    # -- views -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A JSON-safe summary (no image bytes)."""
        with self._cond:
            progress = self.last_progress
            return {
                "job_id": self.job_id,
                "state": self.state.value,
                "owner": self.owner,
                "created_at": self.created_at,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "seeds": [str(s) for s in self.seeds],
                "params": self.resolved_params,
                "progress": None if progress is None else {
                    "step": progress.step, "total_steps": progress.total_steps, "stage": progress.stage,
                    "image_index": progress.image_index, "image_count": progress.image_count},
                "images": [img.to_dict() for img in self.images],
                "error": self.error,
            }


class RunContext:
    """What a :class:`Runner` gets for one job: the request, its decoded input images, the cancel
    token, and emitters.

    ``inputs`` (issue 14 contract): the request's image fields decoded at submit, keyed by field
    name (``input_image``: H×W×3 uint8 RGB; ``inpaint_mask``/``inpaint_mask_upload``: H×W uint8;
    Image Prompt slot i: ``image_prompts.<i>.image``, H×W×3).
    Tests may pass them directly; by default they are the job's."""

    def __init__(self, job: Job, engine: Engine, inputs: Mapping[str, np.ndarray] | None = None) -> None:
        self.job = job
        self._engine = engine
        self.inputs: Mapping[str, np.ndarray] = job.inputs if inputs is None else inputs

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def request(self) -> GenerationRequest:
        return self.job.request

    @property
    def cancel(self) -> CancelToken:
        return self.job.cancel_token

    def check_cancelled(self) -> None:
        self.job.cancel_token.raise_if_set()

    def started(self, params: dict[str, Any], seeds: tuple[int, ...] | list[int], total_steps: int) -> None:
        self.job.emit(Started(job_id=self.job_id, params=params, seeds=tuple(seeds), total_steps=total_steps))

    def progress(self, step: int, total_steps: int, *, stage: str = "sample", image_index: int = 0,
                 image_count: int = 1) -> None:
        self._engine._count_step()
        self.job.emit(Progress(job_id=self.job_id, step=step, total_steps=total_steps, stage=stage,
                               image_index=image_index, image_count=image_count))

    def preview(self, rgb: Any, *, step: int, image_index: int = 0) -> None:
        self.job.emit(Preview(job_id=self.job_id, rgb=rgb, step=step, image_index=image_index))

    def image(self, image: ImageReady) -> None:
        image = replace(image, job_id=self.job_id)
        if self._engine.image_sink is not None:
            self._engine.image_sink(image, owner=self.job.owner)  # the store serves it to its owner only
        self.job.emit(image)

    def warning(self, code: str, message: str) -> None:
        self.job.emit(JobWarning(job_id=self.job_id, code=code, message=message))


class Runner(Protocol):
    """The GPU side. ``run`` executes one job on the worker thread and emits its events.

    ``run`` must call ``ctx.started`` first, ``ctx.check_cancelled()`` at least once per sampling
    step, and ``ctx.image`` for each finished image. Raising :class:`JobCancelled` (from the
    cancel token) ends the job as cancelled; :class:`HooocusError` as failed with its code.
    """

    def check(self, request: GenerationRequest) -> None:
        """Raise a HooocusError if the request names things that do not exist. Cheap, any thread."""

    def run(self, ctx: RunContext) -> None: ...

    def recover_after_oom(self) -> None:
        """Free what can be freed after an out-of-memory error."""

    def options(self) -> dict[str, Any]:
        """What a caller may choose: models, loras, styles, samplers, schedulers, aspect ratios,
        performance modes, defaults. JSON-safe; used by list_options / the web page."""


def _no_presets(request: GenerationRequest) -> GenerationRequest:
    if request.preset is not None:
        raise UnknownPreset(f"unknown preset {request.preset!r}: this server has no presets", loc=("preset",))
    return request


def _no_inputs(request: GenerationRequest, owner: str) -> Mapping[str, np.ndarray]:
    from engine.core.inputs import IMAGE_FIELDS, image_prompt_refs

    for name in IMAGE_FIELDS:
        if getattr(request, name, None) is not None:
            raise InvalidRequest("this server does not take input images", loc=(name,))
    for loc, _key, _text in image_prompt_refs(request):
        raise InvalidRequest("this server does not take input images", loc=loc)
    return {}


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (torch >= 2.5) and torch.cuda.OutOfMemoryError; no torch import here.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


@dataclass
class EngineStats:
    queue_depth: int
    running_job_id: str | None
    jobs_by_outcome: dict[str, int]
    steps_total: int


class Engine:
    """The shared engine: a bounded FIFO queue and exactly one worker thread running ``runner``."""

    def __init__(self, runner: Runner, *, max_queue: int = 16, max_queued_per_owner: int | None = None,
                 max_history: int = 512, image_sink: Callable[..., None] | None = None,
                 apply_preset: Callable[[GenerationRequest], GenerationRequest] | None = None,
                 resolve_inputs: Callable[[GenerationRequest, str], Mapping[str, np.ndarray]] | None = None,
                 ) -> None:
        self.runner = runner
        #: Lays a Fooocus preset under each request at submit (``PresetBook.apply`` from
        #: engine/io/presets.py, given by the runtime so the core does not import the io layer).
        #: None: no preset folders, so a request naming a preset gets unknown_preset.
        self.apply_preset = apply_preset or _no_presets
        #: Turns the request's image references into decoded arrays for ``owner`` at submit, so a bad
        #: reference fails before queueing (``engine.core.inputs.InputResolver``, given by the
        #: runtime, which owns the uploads). None: a request with an image is invalid_request.
        self.resolve_inputs = resolve_inputs or _no_inputs
        self.max_queue = max_queue
        self.max_queued_per_owner = max_queued_per_owner
        self.max_history = max_history
        #: Called on the worker thread for every finished image before clients hear of it, as
        #: ``image_sink(image, owner=job_owner)`` (e.g. ``ImageStore.put``).
        self.image_sink = image_sink
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: Job | None = None
        self._lock = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._steps_total = 0
        self._job_listeners: list[Callable[[Job], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Engine:
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._accepting = True
                self._thread = threading.Thread(target=self._worker, name="hooocus-gpu-worker", daemon=True)
                self._thread.start()
        return self

    def close(self, *, grace_s: float = 0.0, join_timeout_s: float = 30.0) -> None:
        """Stop accepting, cancel queued jobs (``shutting_down``), give the running job ``grace_s``
        to finish, then cancel it and join the worker."""
        with self._lock:
            self._accepting = False
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        for job in queued:
            self._finish_queued_cancel(job, "shutting_down")
        if running is not None:
            running.wait(timeout_s=grace_s)
            running.cancel_token.cancel("shutting_down")
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=join_timeout_s)
        with self._lock:
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- public API --------------------------------------------------------------------------

    def submit(self, request: GenerationRequest | dict[str, Any], *, owner: str = "local",
               job_id: str | None = None) -> Job:
        """Validate and queue a job. Raises InvalidRequest/Unknown*/QueueFull/ShuttingDown."""
        request = self.apply_preset(GenerationRequest.parse(request))
        self.runner.check(request)
        inputs = self.resolve_inputs(request, owner)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; no new jobs are accepted")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs); try again later")
            if self.max_queued_per_owner is not None:
                mine = sum(1 for j in self._queue if j.owner == owner)
                mine += int(self._running is not None and self._running.owner == owner)
                if mine >= self.max_queued_per_owner:
                    raise QueueFull(f"you already have {mine} unfinished jobs (limit {self.max_queued_per_owner})")
            job = Job(job_id or new_job_id(), request, owner)
            job.inputs = inputs
            self._jobs[job.job_id] = job
            self._trim_history()
            self._queue.append(job)
            position = len(self._queue) - 1 + (1 if self._running is not None else 0)
            job.emit(Queued(job_id=job.job_id, position=position))
            self._lock.notify_all()
        for listener in list(self._job_listeners):
            listener(job)
        return job

    def cancel(self, job_id: str, *, reason: str = "user") -> bool:
        """Cancel a queued or running job. False if it is unknown or already finished."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.terminal:
                return False
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            else:
                queued = False
        if queued:
            self._finish_queued_cancel(job, reason)
            self._announce_positions()
        else:
            job.cancel_token.cancel(reason)
        return True

    def interrupt(self, *, reason: str = "admin") -> str | None:
        """Stop the running job only (queued jobs go on). Returns its id, or None."""
        with self._lock:
            job = self._running
        if job is None:
            return None
        job.cancel_token.cancel(reason)
        return job.job_id

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def require_job(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job, or NotFound. With ``owner``, someone else's job is also NotFound (no oracle)."""
        job = self.get_job(job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound(f"no job {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def queue_position(self, job_id: str) -> int | None:
        with self._lock:
            for index, job in enumerate(self._queue):
                if job.job_id == job_id:
                    return index + (1 if self._running is not None else 0)
        return None

    @property
    def running_job(self) -> Job | None:
        return self._running

    def add_job_listener(self, listener: Callable[[Job], None]) -> None:
        """Called (on the submitting thread) for every newly submitted job; for history/metrics."""
        self._job_listeners.append(listener)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(queue_depth=len(self._queue),
                               running_job_id=None if self._running is None else self._running.job_id,
                               jobs_by_outcome=dict(self._outcomes), steps_total=self._steps_total)

    # -- worker ------------------------------------------------------------------------------

    def _count_step(self) -> None:
        self._steps_total += 1  # only the worker thread writes it

    def _finish_queued_cancel(self, job: Job, reason: str) -> None:
        job.inputs = {}
        job.cancel_token.cancel(reason)
        job.emit(Cancelled(job_id=job.job_id, images_done=0, reason=reason))
        with self._lock:
            self._outcomes["cancelled"] += 1

    def _announce_positions(self) -> None:
        with self._lock:
            offset = 1 if self._running is not None else 0
            snapshot = [(job, i + offset) for i, job in enumerate(self._queue)]
        for job, position in snapshot:
            job.emit(Queued(job_id=job.job_id, position=position))

    def _trim_history(self) -> None:
        # Forget the oldest finished jobs beyond max_history; unfinished ones are always kept.
        excess = len(self._jobs) - self.max_history
        if excess <= 0:
            return
        for job_id in [jid for jid, j in self._jobs.items() if j.state.terminal][:excess]:
            del self._jobs[job_id]

    def _worker(self) -> None:
        warmup = getattr(self.runner, "warmup", None)
        if warmup is not None:
            try:  # load the default model before the first job; a failure shows in that job instead
                warmup()
            except Exception:
                log.exception("runner warm-up failed")
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
            self._announce_positions()
            try:
                self._run_one(job)
            finally:
                with self._lock:
                    self._running = None
                    self._outcomes[job.state.value] += 1

    def _run_one(self, job: Job) -> None:
        job.started_at = time.time()
        ctx = RunContext(job, self)
        try:
            job.cancel_token.raise_if_set()
            self.runner.run(ctx)
            job.cancel_token.raise_if_set()
            job.emit(Done(job_id=job.job_id, images_done=len(job.images)))
        except JobCancelled as exc:
            job.emit(Cancelled(job_id=job.job_id, images_done=len(job.images), reason=exc.reason))
        except HooocusError as exc:
            job.emit(Failed(job_id=job.job_id, code=exc.code, message=exc.message, images_done=len(job.images)))
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            error_id = secrets.token_hex(6)
            if _is_out_of_memory(exc):
                log.warning("out of memory in job %s (error_id %s)", job.job_id, error_id)
                try:
                    self.runner.recover_after_oom()
                except Exception:
                    log.exception("recover_after_oom failed")
                job.emit(Failed(job_id=job.job_id, code="out_of_memory", error_id=error_id,
                                message="out of memory; try a smaller size or fewer images",
                                images_done=len(job.images)))
            else:
                log.exception("job %s failed (error_id %s)", job.job_id, error_id)
                job.emit(Failed(job_id=job.job_id, code="internal_error", error_id=error_id,
                                message=f"internal error (error_id {error_id})", images_done=len(job.images)))
            if not isinstance(exc, Exception):
                raise
        finally:
            job.inputs = {}


def new_job_id() -> str:
    """Sortable, unguessable job id: 'j_' + time-ordered uuid7-like hex."""
    return "j_" + uuid.UUID(int=(time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)).hex
