"""The Ray Serve backend end to end on a local Ray (CPU, loopback only, two worker replicas):
same images as the in-process engine, cancel reaching the replica within one step, a replica
killed mid-job failing its job with ``worker_lost`` while the queue goes on, and backpressure in
the front door's queue rather than in Ray.

One local Ray per module (starting it costs ~15 s on two shared cores). The front door is the
product's own: ``create_runtime`` with ``backend="ray"`` (the engine, image store and RayRunner).
Replica-side facts come from ``ProbeRunner``'s log files (tests/distributed/probe_runner.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from engine.core.errors import HooocusError
from engine.core.events import ImageReady, Queued
from engine.core.jobs import Engine, Job, JobState
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings, load_settings
from engine.distributed.ray_serve import APP_NAME, deploy, is_worker_lost
from tests.distributed.probe_runner import HOLD_PREFIX, probe_factory

#: Object store: the smallest Ray accepts is 75 MiB; a job moves a few kB.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
#: Generous waits for a loaded two-core box; a passing run takes a fraction of each.
JOB_TIMEOUT_S = 120.0
SMALL = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # No network in tests: Ray's usage-stats report is off (the processes ray.init starts read it
    # from the environment).
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # no HTTP proxy: the front door uses handles
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


def ray_settings(data_dir: Path, **extra: Any) -> Settings:
    settings, _ = load_settings(cli={"data_dir": data_dir, "device": "cpu", "backend": "ray",
                                     "ray_min_replicas": 2, "ray_max_replicas": 2,
                                     "ray_max_ongoing_requests": 1, "ray_num_gpus_per_replica": 0,
                                     "ray_event_timeout_s": JOB_TIMEOUT_S, **extra}, env={})
    return settings


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Probe:
    """Reads what ProbeRunner wrote on the replicas."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def lines(self, job: Job) -> list[str]:
        path = self.folder / f"{job.job_id}.log"
        if not path.exists():
            return []
        return [line.split(" ", 2)[2] for line in path.read_text(encoding="utf-8").splitlines()]

    def actor(self, job: Job) -> str:
        """The name of the replica actor that ran ``job``."""
        return next(line.split(" ", 1)[1] for line in self.lines(job) if line.startswith("actor "))

    def holding(self, job: Job) -> bool:
        return "holding" in self.lines(job)

    def ended(self, job: Job) -> bool:
        return any(line.startswith("end") for line in self.lines(job))

    def release(self, job: Job) -> None:
        (self.folder / f"{job.job_id}.release").touch()

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) times of every job a replica ran."""
        out = []
        for path in self.folder.glob("*.log"):
            rows = [line.split(" ", 2) for line in path.read_text(encoding="utf-8").splitlines()]
            times = {row[2].split(" ")[0]: float(row[0]) for row in rows}
            if "start" in times and "end" in times:
                out.append((times["start"], times["end"]))
        return out


@pytest.fixture(scope="module")
def probe_runtime(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, Probe]]:
    """Two ProbeRunner replicas behind the product's front-door runtime (it attaches, ray_deploy=False)."""
    folder = tmp_path_factory.mktemp("probe")
    settings = ray_settings(tmp_path_factory.mktemp("data"))
    undeploy = deploy(settings, runner_factory=probe_factory(folder))
    runtime = create_runtime(settings.model_copy(update={"ray_deploy": False}), record_history=False).start()
    try:
        yield runtime, Probe(folder)
    finally:
        runtime.close()
        undeploy()


@contextlib.contextmanager
def runtime_closed(runtime: Runtime) -> Iterator[Runtime]:
    try:
        yield runtime
    finally:
        runtime.close()


def submit(runtime: Runtime, prompt: str, **fields: Any) -> Job:
    return runtime.engine.submit({"prompt": prompt, **SMALL, **fields})


def finished(job: Job) -> Job:
    assert job.wait(JOB_TIMEOUT_S), f"job {job.job_id} still {job.state.value}"
    return job


# -- the demo model: the same bytes as in process -------------------------------------------------

def test_ray_replicas_give_the_in_process_demo_engines_image_bytes(
        local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    from engine.sdxl.pipeline import SDXLRunner

    # One demo replica: which replica runs the job does not change its bytes, and each demo replica
    # (and the catalog) is a process with torch and the model; the two-replica behaviours run on
    # the probe application below.
    settings = ray_settings(tmp_path_factory.mktemp("data"), default_model="demo", ray_min_replicas=1,
                            ray_max_replicas=1)
    request = {"prompt": "a (red:1.3) fox in the snow", **SMALL, "seed": 42, "image_number": 2}
    with Engine(SDXLRunner(settings, model="demo")) as local:
        expected = finished(local.submit(request))
    assert expected.state is JobState.DONE, expected.error
    runtime = create_runtime(settings, model="demo", record_history=False).start()  # deploys the app
    try:
        got = finished(runtime.engine.submit(request))
        assert got.state is JobState.DONE, got.error
        assert got.seeds == expected.seeds
        assert [(i.index, i.sha256, i.data) for i in got.images] == [
            (i.index, i.sha256, i.data) for i in expected.images]
        assert got.images[0].metadata == expected.images[0].metadata  # travels beside the bytes
        assert runtime.images.get(got.images[0].sha256) is not None  # the front door stored it
    finally:
        runtime.close()  # deletes the application it deployed, keeps the module's Ray


def test_attaching_to_an_application_nobody_deployed_is_a_clear_start_up_error(
        local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = ray_settings(tmp_path_factory.mktemp("data"), ray_deploy=False, ray_deploy_timeout_s=2)
    with pytest.raises(HooocusError) as info:
        create_runtime(settings, record_history=False)
    assert info.value.code == "worker_lost"
    assert f"application {APP_NAME!r} did not start within 2 s" in info.value.message


def test_replicas_that_cannot_be_placed_are_a_clear_error_and_leave_nothing_deployed(
        local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("probe")
    # This local Ray has no GPU, so a replica asking for one can never start.
    settings = ray_settings(tmp_path_factory.mktemp("data"), ray_num_gpus_per_replica=1, ray_deploy_timeout_s=3)
    with pytest.raises(HooocusError) as info:
        deploy(settings, runner_factory=probe_factory(folder))
    assert info.value.code == "worker_lost"
    assert "did not start within 3 s" in info.value.message and "ray_num_gpus_per_replica" in info.value.message
    assert APP_NAME not in serve.status().applications
    assert ray.is_initialized()  # the module's Ray, which deploy did not start, is kept


# -- cancel, a lost replica, backpressure (ProbeRunner) ---------------------------------------------

def test_cancel_reaches_the_replica_within_one_step_and_the_next_job_runs(
        probe_runtime: tuple[Runtime, Probe]) -> None:
    runtime, probe = probe_runtime
    job = submit(runtime, f"{HOLD_PREFIX} cancel me")
    wait_for(lambda: probe.holding(job), "the job to hold at step 2 on a replica")
    assert runtime.engine.cancel(job.job_id)
    assert finished(job).state is JobState.CANCELLED
    wait_for(lambda: probe.ended(job), "the replica's runner to stop")
    lines = probe.lines(job)
    # The replica's own cancel token was set while step 2 was running, and step 3 never began.
    assert "held cancel_set=True" in lines, lines
    assert "step 3" not in lines, lines
    after = finished(submit(runtime, "after the cancel"))
    assert after.state is JobState.DONE, after.error
    assert len(after.images) == 1


def test_a_replica_killed_mid_job_fails_it_with_worker_lost_and_the_queue_goes_on(
        probe_runtime: tuple[Runtime, Probe]) -> None:
    runtime, probe = probe_runtime
    job = submit(runtime, f"{HOLD_PREFIX} kill my replica")
    queued_behind = submit(runtime, "queued behind the lost job")
    wait_for(lambda: probe.holding(job), "the job to hold on a replica")
    ray.kill(ray.get_actor(probe.actor(job), namespace="serve"))
    assert finished(job).state is JobState.FAILED
    assert job.error is not None and job.error["code"] == "worker_lost", job.error
    assert finished(queued_behind).state is JobState.DONE, queued_behind.error
    again = finished(submit(runtime, "and the one after"))
    assert again.state is JobState.DONE, again.error


def test_a_job_beyond_the_clusters_slots_waits_in_the_front_doors_queue(
        probe_runtime: tuple[Runtime, Probe]) -> None:
    runtime, probe = probe_runtime
    slots = runtime.settings.ray_job_slots  # 2 replicas x max_ongoing 1
    jobs = [submit(runtime, f"{HOLD_PREFIX} backpressure {i}") for i in range(slots + 1)]
    try:
        wait_for(lambda: any(probe.holding(j) for j in jobs), "a job to hold on a replica")
        time.sleep(0.5)  # let any job that could reach Ray get there
        running = [j for j in jobs if j.state is JobState.RUNNING]
        on_replicas = [j for j in jobs if probe.lines(j)]
        assert 1 <= len(running) <= slots
        assert on_replicas == running  # nothing reached Ray beyond what the front door runs
        last = jobs[-1]
        assert last.state is JobState.QUEUED and not probe.lines(last)
        positions = [e.position for e in last.events_after(0) if isinstance(e, Queued)]
        assert positions and positions[-1] >= 1, positions
    finally:
        for j in jobs:
            probe.release(j)
    for j in jobs:
        assert finished(j).state is JobState.DONE, j.error
        wait_for(lambda j=j: probe.ended(j), "the replica to finish")
    spans = sorted(probe.spans())
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap <= slots


def test_worker_lost_recognises_rays_dead_actor_errors(local_ray: None) -> None:
    assert is_worker_lost(ray.exceptions.ActorDiedError())
    assert not is_worker_lost(ValueError("a job's own failure"))


def test_image_ready_from_the_replica_carries_bytes_and_metadata(probe_runtime: tuple[Runtime, Probe]) -> None:
    runtime, _ = probe_runtime
    job = finished(submit(runtime, "bytes", seed=7))
    images = [e for e in job.events_after(0) if isinstance(e, ImageReady)]
    assert len(images) == 1 and images[0].data[:8] == b"\x89PNG\r\n\x1a\n"
    assert images[0].metadata["seed"] == "7"
    assert runtime.images.get(images[0].sha256) is not None


def test_the_http_door_runs_jobs_with_input_images_on_ray_and_refuses_bad_names_before_queueing(
        probe_runtime: tuple[Runtime, Probe]) -> None:
    import hashlib
    import io

    import numpy as np
    from PIL import Image
    from starlette.testclient import TestClient

    from tests.images import data_uri, noise_png
    from tests.ws.conftest import ALICE, auth, make_app

    shared, probe = probe_runtime
    # Its own front door on the same application: the app's shutdown drains the runtime's engine.
    runtime = create_runtime(shared.settings, record_history=False).start()
    picture = noise_png(20, 10, seed=3)
    pixels = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"))
    with runtime_closed(runtime), TestClient(make_app(runtime)) as client:
        response = client.post("/v1/generate", headers=auth(ALICE), json={
            "prompt": "over http", "steps": 2, "width": 64, "height": 64, "seed": 11,
            "uov_method": "Vary (Subtle)", "input_image": data_uri(picture)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["state"] == "done" and body["seeds"] == ["11"]
        data = client.get(body["images"][0]["url"]).content
        assert hashlib.sha256(data).hexdigest() == body["images"][0]["sha256"]
        job = runtime.engine.require_job(body["job_id"])
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        assert f"input input_image 10x20x3 {digest}" in probe.lines(job)  # the decoded array crossed

        jobs_before = len(runtime.engine.jobs())
        refused = client.post("/v1/generate", headers=auth(ALICE),
                              json={"prompt": "x", "styles": ["No Such Style"], "steps": 2})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "unknown_style"
        assert refused.json()["error"]["loc"] == ["styles", 0]  # the catalog replica's field path
        assert len(runtime.engine.jobs()) == jobs_before  # nothing queued


def test_a_replica_silent_past_the_event_timeout_fails_its_job_with_worker_lost_and_frees_its_slot(
        probe_runtime: tuple[Runtime, Probe]) -> None:
    from engine.distributed.ray_serve import RayRunner

    runtime, probe = probe_runtime
    with Engine(RayRunner(event_timeout_s=1.0)) as impatient:  # the deployed application, a 1 s patience
        job = impatient.submit({"prompt": f"{HOLD_PREFIX} silent", **SMALL})
        assert finished(job).state is JobState.FAILED
        assert job.error is not None and job.error["code"] == "worker_lost", job.error
        assert "sent nothing for 1 s" in job.error["message"]
        wait_for(lambda: probe.ended(job), "the replica to stop the abandoned job")
        assert "held cancel_set=True" in probe.lines(job)  # the stream's cancel reached it, not the hold limit
    after = finished(submit(runtime, "after the silent one"))
    assert after.state is JobState.DONE, after.error
