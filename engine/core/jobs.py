"""Jobs and the per-device interrupt locks: one worker thread per device, a bounded fair-share
queue, per-job cancel.

This module never imports torch. It is the explicit boundary between the job queue (used by the
async front doors) and the device workers (each a :class:`Runner`, the only code that touches torch).
A Ray Serve deployment replaces the worker side and keeps this interface.

Concurrency rules (house style A9.3 #9):
- one worker thread per runner (one runner per device, each with its own models), all fed by the one
  bounded queue; a worker holds its device's lock while it runs, so at most one job (or one batch)
  holds a device at any time;
- the queue is fair: workers take jobs round-robin across owners (:class:`FairQueue`), and the
  queue positions announced are the order in which the jobs will start (batch partners, which
  start with the job that takes them, share its position);
- every job has its own :class:`CancelToken`; cancelling job A never touches job B, and there is
  no process-global "interrupted" flag to clear;
- ``submit``/``cancel`` never block on a worker; listeners are called synchronously from the
  emitting thread and must not block (front doors hand events to their loop with
  ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from engine.core.constants import SEED_MODULUS
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
from engine.core.model_cache import CacheStats
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
        #: Set by :meth:`fail`: a batch runner ends this job alone with it (the others go on).
        self.failure: BaseException | None = None
        #: The image indices this run makes (None = all). Set when the engine splits a job's
        #: images over several devices; only runners with ``supports_image_subset`` get it.
        self.image_indices: tuple[int, ...] | None = None

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

    def fail(self, exc: BaseException) -> None:
        """In ``run_batch``: end this job with ``exc`` (a HooocusError's code, else internal_error)
        once the batch returns, without failing its partners."""
        self.failure = exc


class Runner(Protocol):
    """The GPU side. ``run`` executes one job on the worker thread and emits its events.

    ``run`` must call ``ctx.started`` first, ``ctx.check_cancelled()`` at least once per sampling
    step, and ``ctx.image`` for each finished image. Raising :class:`JobCancelled` (from the
    cancel token) ends the job as cancelled; :class:`HooocusError` as failed with its code.

    Optional (issue 15 dynamic batching; found with ``getattr``):
    ``batch_key(request) -> Hashable | None``: jobs with equal non-None keys may run together;
    None = never batch this request. ``run_batch(ctxs) -> list[BaseException | None]``: runs the
    jobs as one batched loop, each emitting into its own ctx; returns one outcome per ctx in order:
    None = done, else the :class:`HooocusError` that ended that job (:class:`JobCancelled` for a job
    cancelled mid-batch), i.e. what ``run(ctx)`` would have raised; any other exception raised from
    ``run_batch`` ends every job of the batch. ``run_batch([ctx])`` behaves as ``run(ctx)``.
    """

    def check(self, request: GenerationRequest) -> None:
        """Raise a HooocusError if the request names things that do not exist. Cheap, any thread."""

    def run(self, ctx: RunContext) -> None: ...

    def recover_after_oom(self) -> None:
        """Free what can be freed after an out-of-memory error."""

    def options(self) -> dict[str, Any]:
        """What a caller may choose: models, loras, styles, samplers, schedulers, aspect ratios,
        performance modes, defaults. JSON-safe; used by list_options / the web page."""

    # Optional, found with getattr (a runner without them runs one job at a time, as before):
    #   warmup() -> None: load the default model on the worker thread before the first job.
    #   unload_models() -> None: drop the loaded weights (engine.core.families calls it on the idle
    #     family's runner before a model of the other family loads on that device).
    #   device: the device it runs on (str or torch.device), for /metrics labels.
    #   memory_bytes() -> int | None: memory it holds on its device, for /metrics.
    #   memory_stats() -> engine.core.model_cache.CacheStats: its loaded-model cache, for /metrics.
    #   batch_key(request) -> Hashable | None: jobs with equal non-None keys may run as one batch
    #     (Engine max_batch > 1). Cheap and pure: called once per job at submit.
    #   run_batch(ctxs: list[RunContext]) -> None | list[BaseException | None]: run those jobs
    #     together (a returned list gives each job's outcome, like ctx.fail); every ctx gets its own
    #     started/progress/image events and must honour its own cancel token (a cancelled job is
    #     dropped from the batch, its partners go on). ctx.fail(exc) ends one job with an error; an
    #     exception out of run_batch ends every job of the batch that was not cancelled.
    #   supports_image_subset = True: run() honours ctx.image_indices (it still calls ctx.started
    #     with the whole job's params, seeds and total steps, and makes only those images, each
    #     with its own index and seed), so the engine may split a job's images over idle devices.


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
class WorkerStats:
    """One device worker, for ``/metrics``."""

    index: int
    device: str
    busy_s: float
    jobs_done: int
    current_job_id: str | None
    #: Bytes in use on the device: torch.cuda.memory_allocated for a CUDA device, the process's
    #: RSS for a CPU one (shared by every CPU worker of the process); None when unknown.
    memory_bytes: int | None
    #: The runner's model cache on this device (budget, bytes, entries, evictions), from its
    #: optional ``memory_stats()``; None for a runner without one.
    model_cache: CacheStats | None = None


@dataclass
class EngineStats:
    queue_depth: int
    running_job_id: str | None
    jobs_by_outcome: dict[str, int]
    steps_total: int
    running_job_ids: tuple[str, ...] = ()
    workers: tuple[WorkerStats, ...] = ()


#: FairQueue.plan simulates batch pickup exactly for this many queued jobs (a scan of the owners
#: per group); later jobs are placed in plain fair order. Positions past it are rarely watched.
BATCH_PLAN_LOOKAHEAD = 256

#: Owners whose last turn is remembered for fair share; beyond it the least recently served is
#: forgotten (it then counts as never served, which only moves it forward by one turn).
MAX_REMEMBERED_OWNERS = 4096


class FairQueue:
    """The queued jobs, taken round-robin across owners, each owner's own jobs in submission order.

    The next job is the head of the owner served least recently (never served first; ties go to
    the earlier submission), so one owner's 30 queued jobs never starve another's single job.
    :meth:`order` simulates the same rule over the whole queue: it is the order in which the jobs
    will start (while no job is added or cancelled), which the queue positions report.
    Not thread-safe: the engine holds its lock around every call."""

    def __init__(self) -> None:
        self._by_owner: dict[str, collections.deque[tuple[int, Job]]] = {}
        self._jobs: dict[str, Job] = {}
        self._served: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._tick = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __contains__(self, job: object) -> bool:
        return isinstance(job, Job) and self._jobs.get(job.job_id) is job

    def append(self, job: Job) -> None:
        self._by_owner.setdefault(job.owner, collections.deque()).append((next(self._seq), job))
        self._jobs[job.job_id] = job

    def count_owner(self, owner: str) -> int:
        return len(self._by_owner.get(owner, ()))

    def remove(self, job: Job) -> None:
        queue = self._by_owner[job.owner]
        for item in queue:
            if item[1] is job:
                queue.remove(item)
                break
        if not queue:
            del self._by_owner[job.owner]
        del self._jobs[job.job_id]

    def clear(self) -> list[Job]:
        jobs = self.order()
        self._by_owner.clear()
        self._jobs.clear()
        return jobs

    def _key(self, owner: str) -> tuple[int, int]:
        return self._served.get(owner, -1), self._by_owner[owner][0][0]

    def popleft(self) -> Job:
        """The next job by fair share; its owner's turn is used."""
        owner = min(self._by_owner, key=self._key)
        job = self._by_owner[owner][0][1]
        self.take(job)
        return job

    def take(self, job: Job) -> None:
        """Remove ``job`` as started (a batch partner too): its owner's turn is used."""
        self.remove(job)
        self._tick += 1
        self._served[job.owner] = self._tick
        self._served.move_to_end(job.owner)
        while len(self._served) > MAX_REMEMBERED_OWNERS:
            self._served.popitem(last=False)

    def order(self) -> list[Job]:
        """Every queued job in the order the fair-share rule will start them."""
        heap = [(*self._key(owner), owner, 0) for owner in self._by_owner]
        heapq.heapify(heap)
        tick = self._tick
        out: list[Job] = []
        while heap:
            _, _, owner, index = heapq.heappop(heap)
            queue = self._by_owner[owner]
            out.append(queue[index][1])
            if index + 1 < len(queue):
                tick += 1
                heapq.heappush(heap, (tick, queue[index + 1][0], owner, index + 1))
        return out

    def plan(self, key_of: Callable[[Job], Hashable | None], max_batch: int, *,
             lookahead: int = BATCH_PLAN_LOOKAHEAD) -> list[list[Job]]:
        """The queued jobs grouped as the workers will start them with dynamic batching: each group
        is a job taken by fair share (``popleft``) plus up to ``max_batch - 1`` partners with the
        same non-None ``key_of``, found in the fair order of what is left and taken in that order
        (what ``Engine._take`` does with no batch window). Jobs submitted later may still join a
        group; a batch window is not predicted.

        Exact for the groups that start within the first ``lookahead`` jobs (it costs a scan of the
        owners per group); the jobs after them follow in plain fair order, one group each."""
        if max_batch <= 1:
            return [[job] for job in self.order()]
        queues = {owner: list(items) for owner, items in self._by_owner.items()}
        heads = dict.fromkeys(queues, 0)
        taken: set[str] = set()
        served = dict(self._served)
        tick = self._tick

        def head_index(owner: str, start: int) -> int:
            items = queues[owner]
            while start < len(items) and items[start][1].job_id in taken:
                start += 1
            return start

        def fair_order() -> Iterator[Job]:
            # The fair order of the jobs not yet taken, from the simulated served turns (the
            # same rule as order()); a snapshot: taking jobs while iterating does not change it.
            heap = []
            for owner in queues:
                heads[owner] = head_index(owner, heads[owner])
                if heads[owner] < len(queues[owner]):
                    heap.append((served.get(owner, -1), queues[owner][heads[owner]][0], owner, heads[owner]))
            heapq.heapify(heap)
            turn = tick
            while heap:
                _, _, owner, index = heapq.heappop(heap)
                yield queues[owner][index][1]
                following = head_index(owner, index + 1)
                if following < len(queues[owner]):
                    turn += 1
                    heapq.heappush(heap, (turn, queues[owner][following][0], owner, following))

        def take(job: Job) -> None:
            nonlocal tick
            taken.add(job.job_id)
            tick += 1
            served[job.owner] = tick

        groups: list[list[Job]] = []
        total = len(self._jobs)
        while len(taken) < total and len(taken) < lookahead:
            first = next(fair_order())
            take(first)
            group = [first]
            key = key_of(first)
            if key is not None:
                partners = [other for other in itertools.islice(fair_order(), lookahead) if key_of(other) == key]
                for other in partners[:max_batch - 1]:
                    take(other)
                    group.append(other)
            groups.append(group)
        groups.extend([job] for job in fair_order())
        return groups


def _device_label(runner: object) -> str:
    device = getattr(runner, "device", None)
    return "cpu" if device is None else str(device)


def _process_rss_bytes() -> int | None:
    try:  # Linux: the second field of statm is the resident set in pages
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _model_cache_stats(runner: object) -> CacheStats | None:
    own = getattr(runner, "memory_stats", None)
    if not callable(own):
        return None
    try:
        stats = own()
    except Exception:  # metrics must never break on a runner's diagnostics
        return None
    return stats if isinstance(stats, CacheStats) else None


def _device_memory_bytes(runner: object, device: str) -> int | None:
    own = getattr(runner, "memory_bytes", None)
    if callable(own):
        try:
            return own()
        except Exception:  # metrics must never break on a runner's diagnostics
            return None
    if device.startswith("cuda"):
        torch = sys.modules.get("torch")  # lazily: a CUDA runner has imported it; the core never does
        if torch is None:
            return None
        try:
            return int(torch.cuda.memory_allocated(device))
        except Exception:
            return None
    return _process_rss_bytes()


class _Worker:
    """One device: its runner, its thread, and the jobs it runs now (several in a batch)."""

    def __init__(self, index: int, runner: Runner) -> None:
        self.index = index
        self.runner = runner
        self.device = _device_label(runner)
        #: Held while a job runs on this device: at most one job (or one batch) per device. The
        #: per-device form of the old global interrupt mutex; cancel never takes it.
        self.lock = threading.Lock()
        self.jobs: tuple[Job, ...] = ()
        self.busy_s = 0.0
        self.busy_since: float | None = None
        self.jobs_done = 0
        self.thread: threading.Thread | None = None
        #: True while it waits for work (so a split may hand it a share of a job).
        self.idle = False
        #: A share of a split job handed to this worker while it waited.
        self.assigned: _PartContext | None = None

    @property
    def can_batch(self) -> bool:
        return callable(getattr(self.runner, "run_batch", None))

    @property
    def can_split(self) -> bool:
        return bool(getattr(self.runner, "supports_image_subset", False))


@dataclass
class _Work:
    jobs: list[Job]
    part: _PartContext | None = None


def split_indices(count: int, parts: int) -> list[tuple[int, ...]]:
    """``range(count)`` in ``parts`` contiguous runs, the earlier ones one longer where it does not
    divide: the first device makes image 0 first, so clients see images as early as one device."""
    size, extra = divmod(count, parts)
    out: list[tuple[int, ...]] = []
    start = 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        out.append(tuple(range(start, end)))
        start = end
    return out


class _Split:
    """One job whose images run on several devices. Every share runs the same request (with the
    seed drawn once here when it had none), so each image is what one device would make; the
    shares' events are merged into the job's one stream: the first ``started`` (all shares send
    the same), each warning once, and images in index order (a later index waits for the earlier)."""

    def __init__(self, job: Job, engine: Engine, request: GenerationRequest, parts: list[tuple[int, ...]]) -> None:
        self.job = job
        self.engine = engine
        self.request = request
        self.remaining = len(parts)
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self._order = sorted(index for part in parts for index in part)
        self._next = 0
        self._pending: dict[int, ImageReady] = {}
        self._started = False
        self._warnings: set[tuple[str, str]] = set()

    def started(self, event: Started) -> None:
        with self.lock:
            if self._started:
                return
            self._started = True
            self.job.emit(event)

    def warning(self, event: JobWarning) -> None:
        with self.lock:
            if (event.code, event.message) in self._warnings:
                return
            self._warnings.add((event.code, event.message))
            self.job.emit(event)

    def image(self, image: ImageReady) -> None:
        with self.lock:
            self._pending[image.index] = image
            while self._next < len(self._order) and self._order[self._next] in self._pending:
                self._publish(self._pending.pop(self._order[self._next]))
                self._next += 1

    def flush(self) -> None:
        """At the end (a share failed or was cancelled): what was made goes out, in index order."""
        with self.lock:
            for index in sorted(self._pending):
                self._publish(self._pending.pop(index))

    def _publish(self, image: ImageReady) -> None:
        if self.engine.image_sink is not None:
            self.engine.image_sink(image, owner=self.job.owner)
        self.job.emit(image)


class _PartContext(RunContext):
    """A :class:`RunContext` for one device's share of a split job (``image_indices``)."""

    def __init__(self, split: _Split, indices: tuple[int, ...]) -> None:
        super().__init__(split.job, split.engine)
        self.split = split
        self.image_indices = indices

    @property
    def request(self) -> GenerationRequest:
        return self.split.request

    def started(self, params: dict[str, Any], seeds: tuple[int, ...] | list[int], total_steps: int) -> None:
        self.split.started(Started(job_id=self.job_id, params=params, seeds=tuple(seeds), total_steps=total_steps))

    def warning(self, code: str, message: str) -> None:
        self.split.warning(JobWarning(job_id=self.job_id, code=code, message=message))

    def image(self, image: ImageReady) -> None:
        if self.image_indices is not None and image.index not in self.image_indices:
            return  # a task that always makes image 0 (a fast upscale): the first share sends it
        self.split.image(replace(image, job_id=self.job_id))


class Engine:
    """The shared engine: one bounded fair-share queue feeding one worker thread per runner
    (one runner per device). ``Engine(runner)`` and ``Engine([runner_a, runner_b])`` (or
    ``runners=[...]``) both work; ``engine.runner`` is the first, used for ``check``/``options``."""

    def __init__(self, runner: Runner | Sequence[Runner] | None = None, *,
                 runners: Sequence[Runner] | None = None,
                 max_queue: int = 16, max_queued_per_owner: int | None = None,
                 max_history: int = 512, image_sink: Callable[..., None] | None = None,
                 apply_preset: Callable[[GenerationRequest], GenerationRequest] | None = None,
                 resolve_inputs: Callable[[GenerationRequest, str], Mapping[str, np.ndarray]] | None = None,
                 max_batch: int = 1, batch_window_ms: float = 0.0,
                 ) -> None:
        if runner is not None and runners is not None:
            raise TypeError("give runner or runners, not both")
        given = runners if runners is not None else runner
        if given is None:
            raise TypeError("Engine needs a runner (or a sequence of runners, one per device)")
        all_runners = tuple(given) if isinstance(given, Sequence) else (given,)
        if not all_runners:
            raise TypeError("Engine needs at least one runner")
        if max_batch < 1 or batch_window_ms < 0:
            raise ValueError("max_batch must be >= 1 and batch_window_ms >= 0")
        self.runners: tuple[Runner, ...] = all_runners
        self.runner = all_runners[0]
        self._workers = [_Worker(i, r) for i, r in enumerate(all_runners)]
        #: Dynamic batching (off at 1): a worker whose runner has ``batch_key``/``run_batch`` also
        #: takes up to ``max_batch - 1`` queued jobs with the same key, waiting ``batch_window_ms``.
        self.max_batch = max_batch
        self.batch_window_ms = batch_window_ms
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
        self._queue = FairQueue()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        #: job id -> the position last announced to it, so only changes are announced.
        self._announced: dict[str, int] = {}
        self._batch_keys: dict[str, Hashable] = {}
        self._lock = threading.Condition(threading.RLock())
        self._started = False
        self._accepting = True
        self._stopping = False
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._steps_total = 0
        self._steps_lock = threading.Lock()
        self._job_listeners: list[Callable[[Job], None]] = []

    @property
    def device_lock(self) -> threading.Lock:
        """The first device's lock, held by its worker while a job runs: other users of that device
        (engine/describe) take it too, so two models never share the GPU at once."""
        return self._workers[0].lock

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Engine:
        with self._lock:
            if not self._started:
                self._started = True
                self._stopping = False
                self._accepting = True
                for worker in self._workers:
                    name = "hooocus-gpu-worker" if len(self._workers) == 1 else f"hooocus-worker-{worker.index}"
                    worker.thread = threading.Thread(target=self._worker, args=(worker,), name=name, daemon=True)
                    worker.thread.start()
        return self

    def close(self, *, grace_s: float = 0.0, join_timeout_s: float = 30.0) -> None:
        """Stop accepting, cancel queued jobs (``shutting_down``), give the running jobs ``grace_s``
        (together) to finish, then cancel them and join the workers."""
        with self._lock:
            self._accepting = False
            queued = self._queue.clear()
            running = self._running_list()
        for job in queued:
            self._finish_queued_cancel(job, "shutting_down")
        deadline = time.monotonic() + grace_s
        for job in running:
            job.wait(timeout_s=max(0.0, deadline - time.monotonic()))
            job.cancel_token.cancel("shutting_down")
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            threads = [w.thread for w in self._workers if w.thread is not None]
        join_deadline = time.monotonic() + join_timeout_s
        for thread in threads:
            thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
        with self._lock:
            for worker in self._workers:
                worker.thread = None
            self._started = False

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
        batch_key = self._batch_key_of(request)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down; no new jobs are accepted")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs); try again later")
            if self.max_queued_per_owner is not None:
                mine = self._queue.count_owner(owner)
                mine += sum(1 for j in self._running_list() if j.owner == owner)
                if mine >= self.max_queued_per_owner:
                    raise QueueFull(f"you already have {mine} unfinished jobs (limit {self.max_queued_per_owner})")
            job = Job(job_id or new_job_id(), request, owner)
            job.inputs = inputs
            self._jobs[job.job_id] = job
            if batch_key is not None:
                self._batch_keys[job.job_id] = batch_key
            self._trim_history()
            self._queue.append(job)
            # The new job's Queued comes first in its stream; a new owner's job may move others back.
            self._announce_positions()
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
                self._forget_queued(job)
                queued = True
            else:
                queued = False
        if queued:
            self._finish_queued_cancel(job, reason)
            self._announce_positions()
        else:
            job.cancel_token.cancel(reason)
        return True

    def interrupt(self, job_id: str | None = None, *, reason: str = "admin") -> str | None:
        """Stop running jobs (queued jobs go on): ``job_id`` if it is running, else every running
        job. Returns the first interrupted job's id, or None (:meth:`interrupt_running` gives all)."""
        stopped = self.interrupt_running(job_id, reason=reason)
        return stopped[0] if stopped else None

    def interrupt_running(self, job_id: str | None = None, *, reason: str = "admin") -> list[str]:
        """Like :meth:`interrupt`; returns the ids of every job it stopped."""
        with self._lock:
            targets = [j for j in self._running_list() if job_id is None or j.job_id == job_id]
        for job in targets:
            job.cancel_token.cancel(reason)
        return [job.job_id for job in targets]

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
        """Jobs ahead of this one: the running ones plus those the fair share starts before it."""
        with self._lock:
            for job, position in self._positions():
                if job.job_id == job_id:
                    return position
        return None

    @property
    def running_job(self) -> Job | None:
        """The first running job (of the first busy device), or None."""
        running = self.running_jobs()
        return running[0] if running else None

    def running_jobs(self) -> list[Job]:
        """Every running job, in device order (a job split over devices once)."""
        with self._lock:
            return self._running_list()

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(worker.device for worker in self._workers)

    def add_job_listener(self, listener: Callable[[Job], None]) -> None:
        """Called (on the submitting thread) for every newly submitted job; for history/metrics."""
        self._job_listeners.append(listener)

    def stats(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            running = self._running_list()
            snapshot = [(w, w.busy_s + (now - w.busy_since if w.busy_since is not None else 0.0), w.jobs_done,
                         w.jobs[0].job_id if w.jobs else None) for w in self._workers]
            stats = EngineStats(queue_depth=len(self._queue),
                                running_job_id=running[0].job_id if running else None,
                                jobs_by_outcome=dict(self._outcomes), steps_total=self._steps_total,
                                running_job_ids=tuple(j.job_id for j in running))
        # Memory is read outside the lock: a CUDA query may synchronise with the device.
        stats.workers = tuple(WorkerStats(index=w.index, device=w.device, busy_s=busy, jobs_done=done,
                                          current_job_id=current,
                                          memory_bytes=_device_memory_bytes(w.runner, w.device),
                                          model_cache=_model_cache_stats(w.runner))
                              for w, busy, done, current in snapshot)
        return stats

    # -- worker ------------------------------------------------------------------------------

    def _running_list(self) -> list[Job]:
        seen: dict[str, Job] = {}
        for worker in self._workers:
            for job in worker.jobs:
                seen.setdefault(job.job_id, job)
        return list(seen.values())

    def _count_step(self) -> None:
        with self._steps_lock:  # several workers count
            self._steps_total += 1

    def _batch_key_of(self, request: GenerationRequest) -> Hashable | None:
        if self.max_batch <= 1:
            return None
        key_of = getattr(self.runner, "batch_key", None)
        if not callable(key_of) or not callable(getattr(self.runner, "run_batch", None)):
            return None
        return key_of(request)

    def _forget_queued(self, job: Job) -> None:
        self._announced.pop(job.job_id, None)

    def _finish_queued_cancel(self, job: Job, reason: str) -> None:
        job.inputs = {}
        self._batch_keys.pop(job.job_id, None)
        with self._lock:
            self._forget_queued(job)
        job.cancel_token.cancel(reason)
        with self._lock:  # counted first, as _terminal does
            self._outcomes["cancelled"] += 1
        job.emit(Cancelled(job_id=job.job_id, images_done=0, reason=reason))

    def _positions(self) -> list[tuple[Job, int]]:
        """Each queued job and its position: the jobs running now plus those that start before it.
        With dynamic batching, jobs that will start together as one batch share the first one's
        position (a partner moves ahead of the jobs it overtakes, and they move back by as many).
        Under the engine lock."""
        position = len(self._running_list())
        out: list[tuple[Job, int]] = []
        for group in self._queue.plan(lambda job: self._batch_keys.get(job.job_id), self.max_batch):
            out.extend((job, position) for job in group)
            position += len(group)
        return out

    def _announce_positions(self) -> None:
        """Tell each queued job whose position changed where it stands now. Under the engine lock,
        so a job's last Queued always comes before its Started (which needs it out of the queue)."""
        with self._lock:
            for job, position in self._positions():
                if self._announced.get(job.job_id) != position:
                    self._announced[job.job_id] = position
                    job.emit(Queued(job_id=job.job_id, position=position))

    def _trim_history(self) -> None:
        # Forget the oldest finished jobs beyond max_history; unfinished ones are always kept.
        excess = len(self._jobs) - self.max_history
        if excess <= 0:
            return
        for job_id in [jid for jid, j in self._jobs.items() if j.state.terminal][:excess]:
            del self._jobs[job_id]

    def _take(self, worker: _Worker) -> _Work | None:
        """Wait for work; the next job by fair share, plus its batch partners. None: stop."""
        with self._lock:
            worker.idle = True
            while not self._queue and worker.assigned is None and not self._stopping:
                self._lock.wait()
            worker.idle = False
            if worker.assigned is not None:  # a share of a job another worker split (even when stopping:
                part, worker.assigned = worker.assigned, None  # the job's token then ends it at once)
                worker.busy_since = time.monotonic()
                return _Work([part.job], part)
            if self._stopping:
                return None
            job = self._queue.popleft()
            self._forget_queued(job)
            jobs = [job]
            worker.jobs = (job,)
            key = self._batch_keys.get(job.job_id)
            if key is not None and worker.can_batch and self.max_batch > 1:
                deadline = time.monotonic() + self.batch_window_ms / 1000.0
                while True:
                    joined = 0
                    for other in self._queue.order():
                        if len(jobs) >= self.max_batch:
                            break
                        if self._batch_keys.get(other.job_id) == key:
                            self._queue.take(other)
                            self._forget_queued(other)
                            jobs.append(other)
                            joined += 1
                    worker.jobs = tuple(jobs)
                    if joined:  # partners left the queue: those still waiting hear it now, not after the window
                        self._announce_positions()
                    remaining = deadline - time.monotonic()
                    if len(jobs) >= self.max_batch or remaining <= 0 or self._stopping:
                        break
                    self._lock.wait(remaining)  # a submit wakes us to look for partners again
            for taken in jobs:
                self._batch_keys.pop(taken.job_id, None)
            worker.busy_since = time.monotonic()
            part = self._split(worker, job) if len(jobs) == 1 else None
            self._announce_positions()
            return _Work(jobs, part)

    def _split(self, worker: _Worker, job: Job) -> _PartContext | None:
        """Share ``job``'s images with idle workers when nothing else waits (a queued job would keep
        them busy anyway). Under the engine lock. Returns this worker's share, or None: run it whole."""
        count = job.request.image_number
        # Enhance (issue 16) numbers its images in emission order and runs its passes after the
        # generation: one device runs the whole job.
        if count < 2 or self._queue or not worker.can_split or job.request.enhance is not None:
            return None
        # Same device kind only: a CPU share of a CUDA job would not make the bytes the GPU makes.
        kind = worker.device.split(":")[0]
        helpers = [w for w in self._workers if w is not worker and w.idle and w.assigned is None and w.can_split
                   and w.device.split(":")[0] == kind][:count - 1]
        if not helpers:
            return None
        request = job.request
        if request.seed is None:  # one seed for every share, drawn as the runner would (uniform in [0, 2^63))
            request = request.model_copy(update={"seed": secrets.randbelow(SEED_MODULUS)})
        parts = split_indices(count, len(helpers) + 1)
        split = _Split(job, self, request, parts)
        for helper, indices in zip(helpers, parts[1:], strict=True):
            helper.assigned = _PartContext(split, indices)
            helper.jobs = (job,)
        self._lock.notify_all()
        return _PartContext(split, parts[0])

    def _worker(self, worker: _Worker) -> None:
        warmup = getattr(worker.runner, "warmup", None)
        if warmup is not None:
            try:  # load the default model before the first job; a failure shows in that job instead
                warmup()
            except Exception:
                log.exception("runner warm-up failed (device %s)", worker.device)
        while True:
            work = self._take(worker)
            if work is None:
                return
            jobs = work.jobs
            try:
                with worker.lock:
                    if work.part is not None:
                        self._run_part(worker, work.part)
                    elif len(jobs) == 1:
                        self._run_one(worker, jobs[0])
                    else:
                        self._run_batch(worker, jobs)
            finally:
                with self._lock:  # normally done already, just before each job's terminal event
                    self._release(worker, *jobs)

    def _release(self, worker: _Worker, *jobs: Job) -> None:
        """``jobs`` leave ``worker`` (under the engine lock): counted as done there, its busy time
        closed when it has nothing left. Called before the terminal event goes out, so whoever
        sees a job end also sees the device free in the stats."""
        gone = [job for job in jobs if job in worker.jobs]
        if not gone:
            return
        worker.jobs = tuple(job for job in worker.jobs if job not in gone)
        worker.jobs_done += len(gone)
        if not worker.jobs and worker.busy_since is not None:
            worker.busy_s += time.monotonic() - worker.busy_since
            worker.busy_since = None

    def _run_one(self, worker: _Worker, job: Job) -> None:
        runner = worker.runner
        job.started_at = time.time()
        ctx = RunContext(job, self)
        try:
            job.cancel_token.raise_if_set()
            runner.run(ctx)
            job.cancel_token.raise_if_set()
            self._terminal(job, Done(job_id=job.job_id, images_done=len(job.images)), worker)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            if _is_out_of_memory(exc):
                self._recover(runner)
            self._end_with(job, exc, worker)
            if not isinstance(exc, Exception):
                raise
        finally:
            job.inputs = {}

    def _run_part(self, worker: _Worker, ctx: _PartContext) -> None:
        """One device's share of a split job; the share that ends last ends the job. A failing
        share cancels the others (their images would not change the outcome)."""
        split, job, runner = ctx.split, ctx.job, worker.runner
        if job.started_at is None:
            job.started_at = time.time()
        error: BaseException | None = None
        try:
            job.cancel_token.raise_if_set()
            runner.run(ctx)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            error = exc
            if _is_out_of_memory(exc):
                self._recover(runner)
        failed = error is not None and not isinstance(error, JobCancelled)
        with split.lock:
            if failed:
                split.errors.append(error)  # type: ignore[arg-type]
            split.remaining -= 1
            last = split.remaining == 0
        if not last:
            with self._lock:
                self._release(worker, job)
        if failed:
            job.cancel_token.cancel("failed")  # stop the other shares; the job ends failed below
        if last:
            split.flush()
            job.inputs = {}
            if split.errors:
                self._end_with(job, split.errors[0], worker)
            elif job.cancel_token.is_set():
                self._end_with(job, JobCancelled(job.cancel_token.reason or "user"), worker)
            else:
                self._terminal(job, Done(job_id=job.job_id, images_done=len(job.images)), worker)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _run_batch(self, worker: _Worker, jobs: list[Job]) -> None:
        """One ``run_batch`` call for jobs that share a batch key. Each job still ends on its own:
        cancelled by its own token, failed by ``ctx.fail`` or by an error out of ``run_batch``
        (which then ends every job of the batch), else done."""
        runner = worker.runner
        now = time.time()
        ctxs = [RunContext(job, self) for job in jobs]
        for job in jobs:
            job.started_at = now
        live = [ctx for ctx in ctxs if not ctx.cancel.is_set()]
        error: BaseException | None = None
        try:
            if live:
                outcomes = runner.run_batch(live)  # type: ignore[attr-defined]
                # A runner may also report per-job outcomes (None = done, else the error that ended
                # that job) instead of calling ctx.fail: both end only that job.
                if isinstance(outcomes, list):
                    for ctx, outcome in zip(live, outcomes, strict=False):
                        if outcome is not None and not isinstance(outcome, JobCancelled):
                            ctx.fail(outcome)
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            error = exc
            if _is_out_of_memory(exc):
                self._recover(runner)
        try:
            for ctx in ctxs:
                job = ctx.job
                if job.cancel_token.is_set():
                    self._end_with(job, JobCancelled(job.cancel_token.reason or "user"), worker)
                elif ctx.failure is not None or error is not None:
                    self._end_with(job, ctx.failure or error, worker)  # type: ignore[arg-type]
                else:
                    self._terminal(job, Done(job_id=job.job_id, images_done=len(job.images)), worker)
        finally:
            for job in jobs:
                job.inputs = {}
        if error is not None and not isinstance(error, Exception):
            raise error

    def _recover(self, runner: Runner) -> None:
        try:
            runner.recover_after_oom()
        except Exception:
            log.exception("recover_after_oom failed")

    def _end_with(self, job: Job, exc: BaseException, worker: _Worker) -> None:
        """Emit the terminal event ``exc`` calls for (the event every door maps to the wire)."""
        if isinstance(exc, JobCancelled):
            self._terminal(job, Cancelled(job_id=job.job_id, images_done=len(job.images), reason=exc.reason), worker)
        elif isinstance(exc, HooocusError):
            self._terminal(job, Failed(job_id=job.job_id, code=exc.code, message=exc.message,
                                       images_done=len(job.images)), worker)
        elif _is_out_of_memory(exc):
            error_id = secrets.token_hex(6)
            log.warning("out of memory in job %s (error_id %s)", job.job_id, error_id)
            self._terminal(job, Failed(job_id=job.job_id, code="out_of_memory", error_id=error_id,
                                       message="out of memory; try a smaller size or fewer images",
                                       images_done=len(job.images)), worker)
        else:
            error_id = secrets.token_hex(6)
            log.error("job %s failed (error_id %s)", job.job_id, error_id, exc_info=exc)
            self._terminal(job, Failed(job_id=job.job_id, code="internal_error", error_id=error_id,
                                       message=f"internal error (error_id {error_id})",
                                       images_done=len(job.images)), worker)

    def _terminal(self, job: Job, event: Done | Cancelled | Failed, worker: _Worker) -> None:
        # Counted and released first: whoever sees the terminal event sees it in the stats too.
        outcome = {Done: "done", Cancelled: "cancelled", Failed: "failed"}[type(event)]
        with self._lock:
            self._outcomes[outcome] += 1
            self._release(worker, job)
        job.emit(event)


def new_job_id() -> str:
    """Sortable, unguessable job id: 'j_' + time-ordered uuid7-like hex."""
    return "j_" + uuid.UUID(int=(time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)).hex
