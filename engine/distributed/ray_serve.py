"""The Ray Serve backend (issue 15): GPU workers are Serve deployment replicas; the front door keeps
the websocket, HTTP, MCP, auth, queue and history.

Two deployments make one Serve application (``APP_NAME``):

- ``HooocusWorker`` (:class:`WorkerReplica`): one GPU each, ``max_ongoing_requests`` from settings,
  autoscaling between ``ray_min_replicas`` and ``ray_max_replicas``. Each replica wraps an
  in-process runner (the SDXL runner, or the demo model, built the way ``create_runtime`` builds it)
  and runs one job per request in a thread, streaming the job's events back.
- ``HooocusCatalog`` (:class:`CatalogReplica`): one small CPU replica with the same runner, never
  loaded, that answers ``check`` and ``options``. They are separate because a busy worker (at
  ``max_ongoing_requests``) cannot answer a name check until its job ends, and the front door must
  refuse a bad request at submit, before anything is queued.

The front-door side is :class:`RayRunner`, a :class:`engine.core.jobs.Runner`: ``run`` sends the
validated request and its decoded input images through a streaming ``DeploymentHandle`` and
re-emits the replica's events into the job (their ``hooocus.v1`` wire form, ``Event.to_wire`` /
``Event.from_wire``, plus the image bytes and metadata). A cancelled job cancels the stream; Serve
cancels the replica's request task, whose ``finally`` sets that job's cancel token, which the runner
checks at every step. A replica that dies fails its job with ``worker_lost``; the next job goes to
a live replica (Serve restarts the dead one).

``ray`` is an optional extra (``pip install -e '.[ray]'``) and is imported inside functions only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from engine.core.errors import HooocusError, JobCancelled, WorkerLost
from engine.core.events import (
    TERMINAL_EVENTS,
    Cancelled,
    Done,
    Event,
    Failed,
    ImageReady,
    JobWarning,
    Preview,
    Progress,
    Started,
)
from engine.core.jobs import Job, RunContext, Runner
from engine.core.request import GenerationRequest
from engine.core.settings import Settings

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("hooocus.ray")

APP_NAME = "hooocus"
WORKER_DEPLOYMENT = "HooocusWorker"
CATALOG_DEPLOYMENT = "HooocusCatalog"
#: The stream's message type for a preview (previews are binary frames in hooocus.v1, not text).
PREVIEW_TYPE = "preview"
#: How often the front door looks at the job's cancel token while the stream is open: far below
#: one sampling step (tens of ms on a GPU at the smallest sizes, seconds at full size).
CANCEL_POLL_S = 0.02

#: How long Serve lets a replica being stopped finish its requests before killing it.
REPLICA_SHUTDOWN_S = 2.0

#: ``factory(settings, model) -> Runner``: what a replica runs. None builds the SDXL runner.
RunnerFactory = Callable[[Settings, "str | None"], Runner]


def build_local_runner(settings: Settings, model: str | None,
                       runner_factory: RunnerFactory | None = None) -> Runner:
    """The in-process runner a replica wraps: ``runner_factory`` (tests: a fake), else the runner
    serving both families (SDXL and FLUX.1) with ``model`` as default, exactly as ``create_runtime``
    builds it (weights load lazily)."""
    if runner_factory is not None:
        return runner_factory(settings, model)
    from engine.core.families import FamilyRunner  # torch is imported only on the replica, by its runners

    return FamilyRunner(settings, model=model)


# -- the stream's messages ------------------------------------------------------------------------

def encode_event(event: Event) -> dict[str, Any]:
    """One stream message: the event's hooocus.v1 message, plus what that message leaves to a
    binary frame (an image's bytes and metadata, a preview's pixels)."""
    if isinstance(event, Preview):
        return {"type": PREVIEW_TYPE, "job_id": event.job_id, "step": event.step,
                "index": event.image_index, "rgb": event.rgb}
    message = event.to_wire()
    if isinstance(event, ImageReady):
        message["data"] = event.data
        message["metadata"] = event.metadata
    return message


def _error_payload(exc: HooocusError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "loc": list(exc.loc) if exc.loc else None}


def _error_from_payload(payload: Mapping[str, Any]) -> HooocusError:
    loc = payload.get("loc")
    return HooocusError(str(payload.get("message", "")), code=str(payload.get("code", "internal_error")),
                        loc=tuple(loc) if loc else None)


# -- replica side ---------------------------------------------------------------------------------

class _ReplicaEngine:
    """What a RunContext needs from an Engine; the replica has no queue and no image store (the
    front door's engine stores images when it re-emits them)."""

    image_sink = None

    def _count_step(self) -> None:
        pass


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def run_job_in_replica(runner: Runner, job: Job, ctx: RunContext) -> None:
    """Run one job to its terminal event (emitted on ``job``), mapping exceptions the way the
    front door's Engine does for a local runner: cancelled, failed with the error's code,
    out_of_memory (after ``recover_after_oom``), or internal_error with an error_id in this log."""
    try:
        job.cancel_token.raise_if_set()
        runner.run(ctx)
        job.cancel_token.raise_if_set()
        job.emit(Done(job_id=job.job_id, images_done=len(job.images)))
    except JobCancelled as exc:
        job.emit(Cancelled(job_id=job.job_id, images_done=len(job.images), reason=exc.reason))
    except HooocusError as exc:
        job.emit(Failed(job_id=job.job_id, code=exc.code, message=exc.message, images_done=len(job.images)))
    except Exception as exc:  # noqa: BLE001 - the replica must survive any job
        error_id = secrets.token_hex(6)
        if _is_out_of_memory(exc):
            log.warning("out of memory in job %s (error_id %s)", job.job_id, error_id)
            try:
                runner.recover_after_oom()
            except Exception:
                log.exception("recover_after_oom failed")
            job.emit(Failed(job_id=job.job_id, code="out_of_memory", error_id=error_id,
                            message="out of memory; try a smaller size or fewer images",
                            images_done=len(job.images)))
        else:
            log.exception("job %s failed on the replica (error_id %s)", job.job_id, error_id)
            job.emit(Failed(job_id=job.job_id, code="internal_error", error_id=error_id,
                            message=f"internal error (error_id {error_id})", images_done=len(job.images)))


class WorkerReplica:
    """A Serve replica holding one in-process runner (one GPU). ``run`` streams one job's events.

    Jobs on one replica run one at a time (``_gpu_lock``): with ``max_ongoing_requests`` above 1
    the next request waits here, already transferred, while the GPU finishes the current one."""

    def __init__(self, settings: Settings, model: str | None = None,
                 runner_factory: RunnerFactory | None = None) -> None:
        self._runner = build_local_runner(settings, model, runner_factory)
        self._engine = _ReplicaEngine()
        self._gpu_lock = threading.Lock()
        warmup = getattr(self._runner, "warmup", None)
        if warmup is not None:  # load the default model before the first job, off the request path
            threading.Thread(target=self._warmup, args=(warmup,), name="hooocus-replica-warmup", daemon=True).start()

    def _warmup(self, warmup: Callable[[], None]) -> None:
        with self._gpu_lock:
            try:
                warmup()
            except Exception:  # a failure shows in the first job instead
                log.exception("replica warm-up failed")

    def _work(self, job: Job, ctx: RunContext) -> None:
        with self._gpu_lock:
            run_job_in_replica(self._runner, job, ctx)

    async def run(self, request: GenerationRequest, inputs: Mapping[str, np.ndarray], job_id: str,
                  owner: str) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        # Unbounded by type, bounded by the job: one Progress and one Preview per step plus one
        # message per image, the same stream the front door's Job keeps.
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(job_id, request, owner)
        job.subscribe(lambda event: loop.call_soon_threadsafe(events.put_nowait, event), after_seq=None)
        ctx = RunContext(job, self._engine, inputs)  # type: ignore[arg-type]
        worker = threading.Thread(target=self._work, args=(job, ctx), name=f"hooocus-replica-{job_id}", daemon=True)
        worker.start()
        try:
            while True:
                event = await events.get()
                yield encode_event(event)
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            # Reached early only when the front door cancelled the stream (or went away): stop the
            # job at its next step and keep this replica's slot until the runner has let go of the GPU.
            if worker.is_alive():
                job.cancel_token.cancel("user")
                await asyncio.to_thread(worker.join)  # bounded by one step: the runner checks the token


class CatalogReplica:
    """Answers ``check`` and ``options`` for the front door with the workers' runner, unloaded."""

    def __init__(self, settings: Settings, model: str | None = None,
                 runner_factory: RunnerFactory | None = None) -> None:
        self._runner = build_local_runner(settings, model, runner_factory)

    def check(self, request: GenerationRequest) -> dict[str, Any] | None:
        """None when the request is fine, else the error as data (an exception would arrive as a
        RayTaskError, losing the code and field path)."""
        try:
            self._runner.check(request)
        except HooocusError as exc:
            return _error_payload(exc)
        return None

    def list_options(self) -> dict[str, Any]:
        # Not "options": a DeploymentHandle's own .options() (call options) would shadow it.
        return self._runner.options()


# -- the application ------------------------------------------------------------------------------

def worker_deployment_options(settings: Settings) -> dict[str, Any]:
    """``serve.deployment`` options of the worker deployment, from settings."""
    options: dict[str, Any] = {
        "name": WORKER_DEPLOYMENT,
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        # The front door runs at most max_replicas x max_ongoing jobs at once, so this bound on
        # Serve's own router queue is never reached in normal work; it keeps Ray's queue finite.
        "max_queued_requests": settings.ray_max_replicas * settings.ray_max_ongoing_requests,
        # One CPU for the replica's Python side; the GPU count is the operator's (0 on CPU-only tests).
        "ray_actor_options": {"num_cpus": 1, "num_gpus": settings.ray_num_gpus_per_replica},
        # The front door drains its jobs (shutdown_grace_s) before it deletes the application, so
        # a replica being stopped has nothing left to finish; Serve's 20 s default only delays exit.
        "graceful_shutdown_timeout_s": REPLICA_SHUTDOWN_S,
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        options["num_replicas"] = settings.ray_max_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": settings.ray_min_replicas,
                                         "max_replicas": settings.ray_max_replicas,
                                         "target_ongoing_requests": settings.ray_max_ongoing_requests}
    return options


CATALOG_OPTIONS: dict[str, Any] = {
    "name": CATALOG_DEPLOYMENT,
    "num_replicas": 1,
    # Name checks are cheap and answered concurrently; bounded like every queue.
    "max_ongoing_requests": 32,
    "max_queued_requests": 256,
    "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
    "graceful_shutdown_timeout_s": REPLICA_SHUTDOWN_S,
}


def build_app(settings: Settings, *, model: str | None = None, runner_factory: RunnerFactory | None = None) -> Any:
    """The Serve application: the worker deployment, with the catalog bound in as its sibling."""
    from ray import serve

    catalog = serve.deployment(CatalogReplica, **CATALOG_OPTIONS).bind(settings, model, runner_factory)
    workers = serve.deployment(_WorkerIngress, **worker_deployment_options(settings))
    return workers.bind(settings, model, runner_factory, catalog)


class _WorkerIngress(WorkerReplica):
    """The worker deployment as the application's ingress: it takes the catalog's handle only so
    that Serve deploys both as one application (the front door calls the catalog directly)."""

    def __init__(self, settings: Settings, model: str | None = None,
                 runner_factory: RunnerFactory | None = None, catalog: Any = None) -> None:
        super().__init__(settings, model, runner_factory)
        self._catalog = catalog


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run`` / serve config / KubeRay entry (``import_path: engine.distributed.ray_serve:app_builder``):
    ``args`` are Settings fields (``data_dir``, ``default_model``, ``ray_*`` ...) plus ``model``."""
    args = dict(args)
    model = args.pop("model", None)
    settings = Settings.model_validate({"backend": "ray", **args})
    return build_app(settings, model=model)


def deploy(settings: Settings, *, model: str | None = None,
           runner_factory: RunnerFactory | None = None) -> Callable[[], None]:
    """Connect to Ray (``settings.ray_address``; None: $RAY_ADDRESS, else a new local Ray) and run
    the application, waiting until its replicas are up. Serve's HTTP proxy stays off: the front door
    calls deployment handles. Returns the undo: delete the application, and disconnect from Ray if
    this call connected (a caller that started Ray itself keeps it)."""
    import ray
    from ray import serve

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    serve.run_many([serve.RunTarget(build_app(settings, model=model, runner_factory=runner_factory),
                                    name=APP_NAME, route_prefix=None)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    try:
        wait_until_running(settings.ray_deploy_timeout_s)
    except BaseException:
        try:  # leave nothing half-deployed (pending replicas keep asking the autoscaler for GPUs)
            serve.delete(APP_NAME)
        finally:
            if connected_here:
                ray.shutdown()
        raise

    def undeploy() -> None:
        if not ray.is_initialized():  # serve.delete would ray.init() a new local cluster to delete from
            return
        try:
            serve.delete(APP_NAME)
        finally:
            if connected_here:
                ray.shutdown()

    return undeploy


def attach(settings: Settings) -> Callable[[], None]:
    """Join the cluster where a Serve config or RayService deployed the application
    (``--no-ray-deploy``) and wait until it runs; a missing application is a clear start-up error,
    not a first job that hangs. ``ray_address`` None means "auto" here: a fresh local Ray would
    have no application. Returns the undo (disconnect, if this call connected)."""
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=settings.ray_address or "auto", include_dashboard=False, log_to_driver=False)
    try:
        wait_until_running(settings.ray_deploy_timeout_s)
    except BaseException:
        if connected_here:
            ray.shutdown()
        raise

    def detach() -> None:
        if connected_here:
            ray.shutdown()

    return detach


def wait_until_running(timeout_s: float) -> None:
    """Wait for the application's replicas to start (not for models to load: replicas warm up in
    the background). ``serve.run`` would wait forever for a replica that cannot be placed, e.g. one
    asking for a GPU the cluster does not have; this names the problem instead."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    message = "no status yet"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            status = str(getattr(app.status, "value", app.status))
            message = f"{status}: {app.message}" if app.message else status
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                break
        time.sleep(0.5)
    raise WorkerLost(f"the Ray Serve application {APP_NAME!r} did not start within {timeout_s:g} s ({message}); "
                     "is it deployed, and does the cluster have the GPUs ray_num_gpus_per_replica asks for?")


# -- front-door side ------------------------------------------------------------------------------

def is_worker_lost(exc: BaseException) -> bool:
    """A Ray error that means the replica (or its node) went away, not that the job itself failed."""
    import ray.exceptions as rex

    lost = tuple(getattr(rex, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                 "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                                                 "OwnerDiedError") if hasattr(rex, name))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # a RayTaskError wraps the real cause
        if isinstance(current, lost):
            return True
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return False


class RayRunner:
    """A :class:`Runner` whose ``run`` happens on a Ray Serve worker replica.

    One RayRunner carries one job at a time (the engine's worker thread calls ``run``), so the
    front door keeps ``ray_max_replicas x ray_max_ongoing_requests`` of them to fill the cluster
    and every other job waits, with its queue position, in the front door's own queue."""

    def __init__(self, *, app_name: str = APP_NAME, event_timeout_s: float = 600.0,
                 call_timeout_s: float = 30.0) -> None:
        self.app_name = app_name
        #: The longest wait for the replica's next event (the first includes a model load).
        self.event_timeout_s = event_timeout_s
        #: The longest wait for a check/options answer from the catalog.
        self.call_timeout_s = call_timeout_s
        self._handles: dict[str, Any] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RayRunner:
        return cls(event_timeout_s=settings.ray_event_timeout_s, call_timeout_s=settings.ray_call_timeout_s)

    def _handle(self, deployment: str) -> Any:
        handle = self._handles.get(deployment)
        if handle is None:
            from ray import serve

            handle = self._handles[deployment] = serve.get_deployment_handle(deployment, self.app_name)
        return handle

    def _call(self, method: str, *args: Any) -> Any:
        try:
            # The engine may call check() on the front door's event loop; the answer is one short
            # round trip to the catalog, bounded by call_timeout_s.
            response = getattr(self._handle(CATALOG_DEPLOYMENT), method).remote(*args)
            return response.result(timeout_s=self.call_timeout_s, _skip_asyncio_check=True)
        except HooocusError:
            raise
        except Exception as exc:
            log.warning("Ray catalog %s failed: %s", method, type(exc).__name__)
            raise WorkerLost(f"the Ray workers did not answer {method} ({type(exc).__name__})") from None

    def check(self, request: GenerationRequest) -> None:
        error = self._call("check", request)
        if error is not None:
            raise _error_from_payload(error)

    def options(self) -> dict[str, Any]:
        return self._call("list_options")

    def recover_after_oom(self) -> None:
        """Nothing here: the replica recovers its own GPU and reports out_of_memory as a code."""

    def run(self, ctx: RunContext) -> None:
        stream = self._handle(WORKER_DEPLOYMENT).options(stream=True).run.remote(
            ctx.request, dict(ctx.inputs), ctx.job_id, ctx.job.owner)
        finished = threading.Event()
        last_event_at = [time.monotonic()]
        stalled = threading.Event()

        def watch() -> None:
            # Polls the token (a CancelToken cannot be waited on together with `finished`).
            while not finished.wait(CANCEL_POLL_S):
                if ctx.cancel.is_set():
                    stream.cancel()
                    return
                if time.monotonic() - last_event_at[0] > self.event_timeout_s:
                    stalled.set()
                    stream.cancel()
                    return

        watcher = threading.Thread(target=watch, name=f"hooocus-ray-watch-{ctx.job_id}", daemon=True)
        watcher.start()
        try:
            for message in stream:
                last_event_at[0] = time.monotonic()
                if self._apply(ctx, message):
                    return
        except HooocusError:
            raise
        except Exception as exc:
            if ctx.cancel.is_set():
                raise JobCancelled(ctx.cancel.reason or "user") from None
            if stalled.is_set():
                raise WorkerLost(f"the Ray worker sent nothing for {self.event_timeout_s:g} s") from None
            if is_worker_lost(exc):
                log.warning("Ray worker lost during job %s: %s", ctx.job_id, type(exc).__name__)
                raise WorkerLost("the Ray worker running this job died; submit it again") from None
            raise
        finally:
            finished.set()
            watcher.join()
        if ctx.cancel.is_set():
            raise JobCancelled(ctx.cancel.reason or "user")
        raise WorkerLost("the Ray worker's stream ended before the job did")

    @staticmethod
    def _apply(ctx: RunContext, message: Mapping[str, Any]) -> bool:
        """Re-emit one replica message into the job; True at the job's successful end."""
        if message.get("type") == PREVIEW_TYPE:
            ctx.preview(message["rgb"], step=int(message["step"]), image_index=int(message["index"]))
            return False
        event = Event.from_wire(message)
        if isinstance(event, Started):
            ctx.started(event.params, event.seeds, event.total_steps)
        elif isinstance(event, Progress):
            ctx.progress(event.step, event.total_steps, stage=event.stage, image_index=event.image_index,
                         image_count=event.image_count)
        elif isinstance(event, ImageReady):
            ctx.image(replace(event, metadata=dict(message.get("metadata") or {})))
        elif isinstance(event, JobWarning):
            ctx.warning(event.code, event.message)
        elif isinstance(event, Done):
            return True
        elif isinstance(event, Cancelled):
            raise JobCancelled(event.reason)
        elif isinstance(event, Failed):
            raise HooocusError(event.message, code=event.code)
        return False
