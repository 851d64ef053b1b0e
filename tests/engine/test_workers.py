"""Several device workers on one queue (issue 15): one worker per runner, per-device exclusivity,
interrupt by job id or all, per-device stats, fair share across owners, and batch pickup."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable

import pytest

from engine import Engine
from engine.core.errors import InvalidRequest
from engine.core.events import Done, ImageReady, Queued
from engine.core.jobs import FairQueue, Job, JobState, RunContext
from engine.core.request import GenerationRequest
from engine.core.testing import FakeRunner, StepGate


def req(prompt: str = "p", steps: int = 2, **kw: object) -> dict[str, object]:
    return {"prompt": prompt, "steps": steps, **kw}


class StartLog:
    """FakeRunner.on_step that records the order in which jobs take their first step."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str, step: int) -> None:
        with self._lock:
            if job_id not in self.order:
                self.order.append(job_id)


class Rendezvous:
    """on_step barrier: every job waits at step 1 until ``parties`` jobs are there at once, which
    can only happen when that many run concurrently (on different workers)."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=10)
        self.met: set[str] = set()

    def __call__(self, job_id: str, step: int) -> None:
        if step == 1 and job_id not in self.met:
            self.met.add(job_id)
            self.barrier.wait()


# -- one worker per runner ---------------------------------------------------------------------

@pytest.mark.parametrize("form", ["positional_list", "keyword"])
def test_two_runners_run_two_jobs_at_once_each_device_one_at_a_time(form: str) -> None:
    meet = Rendezvous(2)
    runners = [FakeRunner(on_step=meet), FakeRunner(on_step=meet)]
    engine = Engine(runners) if form == "positional_list" else Engine(runners=runners)
    assert engine.runner is runners[0] and engine.device_names == ("cpu", "cpu")
    with engine:
        jobs = [engine.submit(req(f"j{i}")) for i in range(4)]
        assert all(job.wait(10) for job in jobs)
    assert all(job.state is JobState.DONE for job in jobs)  # the barrier broke nobody: two ran at once
    assert all(r.max_concurrent_seen == 1 for r in runners)  # never two jobs on one device
    ran = {job_id for r in runners for job_id, _ in r.step_log}
    assert ran == {job.job_id for job in jobs}
    assert all(r.step_log for r in runners)  # both devices worked
    stats = engine.stats()
    assert [w.jobs_done for w in stats.workers] and sum(w.jobs_done for w in stats.workers) == 4
    assert all(w.busy_s > 0 and w.current_job_id is None for w in stats.workers)
    assert all(w.memory_bytes is not None and w.memory_bytes > 0 for w in stats.workers)  # RSS on CPU


def test_engine_needs_a_runner_and_not_both_forms() -> None:
    with pytest.raises(TypeError):
        Engine()
    with pytest.raises(TypeError):
        Engine([])
    with pytest.raises(TypeError):
        Engine(FakeRunner(), runners=[FakeRunner()])


class HoldAt:
    """on_step gate shared by several runners: jobs block at ``step`` until released; ``wait_for(n)``
    returns once n jobs are held."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.held: list[str] = []
        self._cond = threading.Condition()
        self._go = False

    def __call__(self, job_id: str, step: int) -> None:
        with self._cond:
            if step != self.step or self._go:
                return
            self.held.append(job_id)
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: self._go, timeout=10)

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.held) >= count, timeout=10)

    def release(self) -> None:
        with self._cond:
            self._go = True
            self._cond.notify_all()


def test_interrupt_by_job_id_stops_that_job_only_and_without_id_stops_all() -> None:
    hold = HoldAt(2)
    with Engine([FakeRunner(on_step=hold), FakeRunner(on_step=hold)]) as engine:
        first = engine.submit(req("a", steps=5))
        second = engine.submit(req("b", steps=5))
        assert hold.wait_for(2)
        running = engine.running_jobs()
        assert {j.job_id for j in running} == {first.job_id, second.job_id}
        assert engine.running_job is running[0]
        assert set(engine.stats().running_job_ids) == {first.job_id, second.job_id}
        assert engine.interrupt(second.job_id) == second.job_id
        assert not first.cancel_token.is_set()
        assert engine.interrupt_running("j_not_running") == []
        third = engine.submit(req("c", steps=5))  # queued behind the two running jobs
        assert set(engine.interrupt_running()) == {first.job_id, second.job_id}  # every running job
        hold.release()
        assert first.wait(5) and second.wait(5) and third.wait(5)
    assert first.state is JobState.CANCELLED and second.state is JobState.CANCELLED
    assert second.events_after(0)[-1].reason == "admin"
    assert third.state is JobState.DONE  # queued jobs go on


def test_stats_show_the_current_job_per_device() -> None:
    gate = StepGate(1)
    with Engine([FakeRunner(on_step=gate), FakeRunner(on_step=gate)]) as engine:
        job = engine.submit(req("x"))
        assert gate.reached.wait(5)
        current = [w.current_job_id for w in engine.stats().workers]
        assert current.count(job.job_id) == 1 and current.count(None) == 1
        seen_at_done = []
        job.subscribe(lambda e: seen_at_done.append(engine.stats()) if isinstance(e, Done) else None, after_seq=None)
        gate.release()
        assert job.wait(5)
    # Whoever hears "done" (a /metrics scrape after the client's done) sees the device free and the job counted.
    (stats,) = seen_at_done
    assert [w.current_job_id for w in stats.workers] == [None, None] and stats.running_job_ids == ()
    assert sum(w.jobs_done for w in stats.workers) == 1 and stats.jobs_by_outcome == {"done": 1}


# -- fair share --------------------------------------------------------------------------------

def _last_positions(jobs: list[Job]) -> dict[str, int]:
    return {job.job_id: [e.position for e in job.events_after(0) if isinstance(e, Queued)][-1] for job in jobs}


def test_one_owners_thirty_jobs_do_not_starve_another_owners_single_job() -> None:
    log = StartLog()
    engine = Engine(FakeRunner(on_step=log), max_queue=64)
    many = [engine.submit(req(f"a{i}", steps=1), owner="alice") for i in range(30)]
    single = engine.submit(req("b", steps=1), owner="bob")
    announced = _last_positions([*many, single])
    assert announced[single.job_id] == 1  # told the truth before anything started
    with engine:
        assert all(job.wait(10) for job in [*many, single])
    assert log.order[:2] == [many[0].job_id, single.job_id]
    assert log.order[2:] == [job.job_id for job in many[1:]]
    # every job's last announced position is where it really started
    assert sorted(announced, key=announced.__getitem__) == log.order


def test_a_new_owner_jumps_ahead_of_a_running_owners_queue_and_positions_follow() -> None:
    log = StartLog()
    gate = StepGate(1)

    def on_step(job_id: str, step: int) -> None:
        log(job_id, step)
        gate(job_id, step)

    with Engine(FakeRunner(on_step=on_step), max_queue=64) as engine:
        first = engine.submit(req("a0", steps=1), owner="alice")
        assert gate.reached.wait(5)
        alice = [engine.submit(req(f"a{i}", steps=1), owner="alice") for i in range(1, 4)]
        carol = [engine.submit(req(f"c{i}", steps=1), owner="carol") for i in range(2)]
        bob = engine.submit(req("b", steps=1), owner="bob")
        queued = [*alice, *carol, bob]
        positions = {j.job_id: engine.queue_position(j.job_id) for j in queued}
        announced = _last_positions(queued)
        assert positions == announced
        gate.release()
        assert all(job.wait(10) for job in queued)
    assert log.order[0] == first.job_id
    # alice just had her turn: carol, bob (never served), then alice and carol alternate
    assert log.order[1:] == [carol[0].job_id, bob.job_id, alice[0].job_id, carol[1].job_id,
                             alice[1].job_id, alice[2].job_id]
    assert sorted(announced, key=announced.__getitem__) == log.order[1:]


def test_fair_queue_order_matches_what_popleft_takes() -> None:
    queue = FairQueue()
    owners = ["a", "a", "a", "b", "c", "c", "b", "a"]
    jobs = [Job(f"j{i}", GenerationRequest(), owner) for i, owner in enumerate(owners)]
    for job in jobs:
        queue.append(job)
    predicted = queue.order()
    assert [j.job_id for j in predicted] == ["j0", "j3", "j4", "j1", "j6", "j5", "j2", "j7"]
    taken = [queue.popleft() for _ in range(len(jobs))]
    assert taken == predicted and not queue


def test_per_owner_limit_counts_jobs_running_on_every_device() -> None:
    gates = [StepGate(1), StepGate(1)]
    with Engine([FakeRunner(on_step=gates[0]), FakeRunner(on_step=gates[1])], max_queued_per_owner=2) as engine:
        engine.submit(req("r1"), owner="alice")
        engine.submit(req("r2"), owner="alice")
        assert gates[0].reached.wait(5) and gates[1].reached.wait(5)
        from engine.core.errors import QueueFull
        with pytest.raises(QueueFull):
            engine.submit(req("q"), owner="alice")  # two running, one per device
        for gate in gates:
            gate.release()


# -- batch pickup ------------------------------------------------------------------------------

class BatchingRunner(FakeRunner):
    """Jobs with the same width batch together; run_batch records each batch and runs its jobs."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.batches: list[list[str]] = []
        self.fail_prompt: str | None = None

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        return None if request.prompt.startswith("solo") else request.size

    def run_batch(self, ctxs: list[RunContext]) -> None:
        self.batches.append([ctx.job_id for ctx in ctxs])
        for ctx in ctxs:
            if ctx.request.prompt == self.fail_prompt:
                ctx.fail(InvalidRequest("this one is bad", loc=("prompt",)))
                continue
            try:
                self._run(ctx)
            except Exception as exc:  # a cancelled job leaves the batch, its partners go on
                ctx.fail(exc)


def test_queued_jobs_with_the_same_key_run_as_one_batch_in_fair_share_order() -> None:
    runner = BatchingRunner()
    engine = Engine(runner, max_batch=3, max_queue=32)
    wide = [engine.submit(req(f"w{i}", width=1152, height=896, seed=10 + i), owner=o)
            for i, o in enumerate(["alice", "alice", "bob", "alice"])]
    solo = engine.submit(req("solo", width=1152, height=896), owner="carol")
    square = engine.submit(req("s", width=1024, height=1024), owner="bob")
    with engine:
        assert all(job.wait(10) for job in [*wide, solo, square])
    # fair order: w0(alice) w2(bob) solo(carol) w1(alice) square(bob) w3(alice): w0 takes w2 and w1
    assert runner.batches[0] == [wide[0].job_id, wide[2].job_id, wide[1].job_id]
    assert [wide[3].job_id] not in runner.batches  # a batch of one runs through run()
    assert all(job.state is JobState.DONE for job in [*wide, solo, square])
    for i, job in enumerate(wide):  # each job keeps its own events and results
        images = [e for e in job.events_after(0) if isinstance(e, ImageReady)]
        assert [im.seed for im in images] == [10 + i]
        assert isinstance(job.events_after(0)[-1], Done)


def test_batch_window_waits_for_a_partner_and_max_batch_one_never_batches() -> None:
    runner = BatchingRunner()
    # The window is long so the test cannot race it; the batch closes as soon as it is full.
    with Engine(runner, max_batch=2, batch_window_ms=30_000) as engine:
        first = engine.submit(req("a"))
        second = engine.submit(req("b"))
        assert first.wait(10) and second.wait(10)
    assert runner.batches == [[first.job_id, second.job_id]]
    plain = BatchingRunner()
    with Engine(plain) as engine:  # max_batch 1 (the default): off
        jobs = [engine.submit(req(f"p{i}")) for i in range(3)]
        assert all(job.wait(10) for job in jobs)
    assert plain.batches == [] and len({j for j, _ in plain.step_log}) == 3


def test_in_a_batch_a_cancelled_or_failed_job_ends_alone() -> None:
    gate = StepGate(2)
    runner = BatchingRunner(on_step=gate)
    runner.fail_prompt = "bad"
    engine = Engine(runner, max_batch=3)
    victim = engine.submit(req("victim", steps=4))
    bad = engine.submit(req("bad"))
    good = engine.submit(req("good"))
    with engine:
        assert gate.reached.wait(5)
        assert engine.cancel(victim.job_id)
        gate.release()
        assert all(job.wait(10) for job in (victim, bad, good))
    assert runner.batches == [[victim.job_id, bad.job_id, good.job_id]]
    assert victim.state is JobState.CANCELLED and victim.events_after(0)[-1].reason == "user"
    assert bad.state is JobState.FAILED and bad.error["code"] == "invalid_request"
    assert good.state is JobState.DONE and len(good.images) == 1


def test_an_error_out_of_run_batch_fails_every_job_of_the_batch() -> None:
    class Broken(BatchingRunner):
        def run_batch(self, ctxs: list[RunContext]) -> None:
            raise ZeroDivisionError("secret")

    engine = Engine(Broken(), max_batch=2)
    jobs = [engine.submit(req(f"x{i}")) for i in range(2)]
    with engine:
        assert all(job.wait(10) for job in jobs)
    assert [job.error["code"] for job in jobs] == ["internal_error", "internal_error"]
    assert all("secret" not in job.error["message"] for job in jobs)


def _positions_of(job: Job) -> list[int]:
    return [e.position for e in job.events_after(0) if isinstance(e, Queued)]


def test_queue_positions_count_batch_partners_that_start_together() -> None:
    gate = StepGate(1)
    runner = BatchingRunner(on_step=gate)
    log = StartLog()
    wide = {"width": 1152, "height": 896}

    def on_step(job_id: str, step: int) -> None:
        log(job_id, step)
        gate(job_id, step)

    runner.on_step = on_step
    with Engine(runner, max_batch=2, max_queue=32) as engine:
        engine.submit(req("solo", steps=1), owner="zed")  # runs alone (never batched), held at step 1
        assert gate.reached.wait(5)
        a = engine.submit(req("a", steps=1, **wide), owner="alice")
        b = engine.submit(req("b", steps=1, width=1024, height=1024), owner="bob")  # another key
        c = engine.submit(req("c", steps=1, **wide), owner="carol")  # a's partner: starts with a
        d = engine.submit(req("d", steps=1, **wide), owner="dave")  # a's batch is full (max_batch 2)
        queued = [a, b, c, d]
        # Fair order a, b, c, d; a takes c along, so c moves ahead of b and b back by one.
        assert _last_positions(queued) == {a.job_id: 1, c.job_id: 1, b.job_id: 3, d.job_id: 4}
        assert {j.job_id: engine.queue_position(j.job_id) for j in queued} == _last_positions(queued)
        gate.release()
        assert all(job.wait(10) for job in queued)
    assert runner.batches == [[a.job_id, c.job_id]]
    assert log.order[1:] == [a.job_id, c.job_id, b.job_id, d.job_id]
    # When the batch left the queue the others heard it at once: b 2 (a and c run), d 3; then d 1.
    assert _positions_of(b) == [2, 3, 2]
    assert _positions_of(d) == [4, 3, 1]


def test_cancelling_a_queued_batch_partner_re_announces_the_jobs_behind_its_batch() -> None:
    gate = StepGate(1)
    runner = BatchingRunner(on_step=gate)
    wide = {"width": 1152, "height": 896}
    with Engine(runner, max_batch=3, max_queue=32) as engine:
        engine.submit(req("solo", steps=1), owner="zed")
        assert gate.reached.wait(5)
        a = engine.submit(req("a", steps=1, **wide), owner="alice")
        b = engine.submit(req("b", steps=1, width=1024, height=1024), owner="bob")
        c = engine.submit(req("c", steps=1, **wide), owner="carol")
        d = engine.submit(req("d", steps=1, **wide), owner="dave")
        assert _last_positions([a, b, c, d]) == {a.job_id: 1, c.job_id: 1, d.job_id: 1, b.job_id: 4}
        assert engine.cancel(c.job_id)
        # c leaves a's batch: b now waits behind the solo job, a and d.
        assert _last_positions([a, b, d]) == {a.job_id: 1, d.job_id: 1, b.job_id: 3}
        gate.release()
        assert all(job.wait(10) for job in (a, b, c, d))
    assert runner.batches == [[a.job_id, d.job_id]] and c.state is JobState.CANCELLED


def _take_like_the_engine(queue: FairQueue, key_of, max_batch: int) -> list[list[str]]:
    """Engine._take with no batch window, on a bare FairQueue: what the workers really start."""
    groups = []
    while queue:
        job = queue.popleft()
        group = [job]
        key = key_of(job)
        if key is not None:
            for other in queue.order():
                if len(group) >= max_batch:
                    break
                if key_of(other) == key:
                    queue.take(other)
                    group.append(other)
        groups.append([j.job_id for j in group])
    return groups


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_fair_queue_plan_matches_what_the_workers_take_with_batching(seed: int, max_batch: int) -> None:
    import random

    rng = random.Random(seed)
    jobs = [Job(f"j{i}", GenerationRequest(), rng.choice("abcd")) for i in range(24)]
    keys = {job.job_id: rng.choice(["k1", "k2", None]) for job in jobs}

    def key_of(job: Job) -> Hashable | None:
        return keys[job.job_id]

    planned, taken = FairQueue(), FairQueue()
    for job in jobs:
        planned.append(job)
        taken.append(job)
    for owner in rng.sample("abcd", 2):  # some owners already had a turn
        served = Job(f"served-{owner}", GenerationRequest(), owner)
        for queue in (planned, taken):
            queue.append(served)
            queue.take(served)
    plan = [[j.job_id for j in group] for group in planned.plan(key_of, max_batch)]
    assert plan == _take_like_the_engine(taken, key_of, max_batch)
    assert len(planned) == len(jobs)  # planning took nothing
    assert max(len(g) for g in plan) <= max_batch
    # Past the lookahead the rest follows in plain fair order (one job per group).
    short = planned.plan(key_of, max_batch, lookahead=3)
    assert sum(len(g) for g in short) == len(jobs) and all(len(g) == 1 for g in short[3:])


# -- settings, CLI and runtime -------------------------------------------------------------------

@pytest.mark.parametrize(("devices", "loc"), [
    (("cpu", "gpu0"), ("devices", 1)),  # not a device name
    (("cpu", ""), ("devices", 1)),  # "--devices cpu," leaves an empty entry
    (("auto", "cpu"), ("devices",)),  # auto already means every GPU
    (("cuda:0", "cuda:0"), ("devices",)),  # one job per GPU
    ((), ("devices",)),
])
def test_devices_setting_is_checked_at_the_boundary(devices: tuple[str, ...], loc: tuple[object, ...]) -> None:
    from engine.core.settings import load_settings

    with pytest.raises(InvalidRequest) as info:
        load_settings(cli={"devices": devices}, env={})
    assert info.value.loc == loc


def test_devices_from_env_and_defaults() -> None:
    from engine.core.settings import load_settings

    settings, sources = load_settings(cli={}, env={"HOOOCUS_DEVICES": "cpu,cuda:1", "HOOOCUS_MAX_BATCH": "4"})
    assert settings.devices == ("cpu", "cuda:1") and sources["devices"] == "env:HOOOCUS_DEVICES"
    assert settings.max_batch == 4
    defaults, _ = load_settings(cli={}, env={})
    assert defaults.devices == ("auto",) and defaults.max_batch == 1 and defaults.batch_window_ms == 0


def test_auto_means_every_visible_gpu_else_the_cpu_else_the_single_device_setting(monkeypatch) -> None:
    import torch

    from engine.sdxl.models.loading import expand_devices

    assert expand_devices(("cpu", "cpu")) == ["cpu", "cpu"]
    assert expand_devices(("auto",), "cuda:1") == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert expand_devices(("auto",)) == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert expand_devices(("auto",)) == ["cuda:0", "cuda:1"]


def test_serve_devices_flag_builds_one_runner_per_device(tmp_path) -> None:
    from engine.core.runtime import create_runtime
    from engine.core.settings import settings_from_args
    from hooocus.cli import build_parser

    args = build_parser().parse_args(["serve", "--devices", "cpu,cpu", "--model", "demo", "--max-batch", "4",
                                      "--batch-window-ms", "20", "--data-dir", str(tmp_path)])
    settings, sources = settings_from_args(args, env={})
    assert settings.devices == ("cpu", "cpu") and sources["devices"] == "cli"
    runtime = create_runtime(settings, model="demo", record_history=False)
    engine = runtime.engine
    assert len(engine.runners) == 2 and engine.runners[0] is not engine.runners[1]  # each its own models
    assert engine.device_names == ("cpu", "cpu") and engine.runner is engine.runners[0]
    assert (engine.max_batch, engine.batch_window_ms) == (4, 20.0)
    with pytest.raises(InvalidRequest) as info:
        settings_from_args(build_parser().parse_args(["serve", "--devices", "cpu,tpu"]), env={})
    assert info.value.loc == ("devices", 1)


# -- one job's images over several devices -------------------------------------------------------

def wait_all_idle(engine: Engine, timeout_s: float = 10.0) -> None:
    # White-box: a split only hands shares to workers that wait for work; right after start() a
    # thread may still be on its way there.
    import time

    deadline = time.monotonic() + timeout_s
    while not all(w.idle for w in engine._workers):
        assert time.monotonic() < deadline, "workers never became idle"
        time.sleep(0.005)


def image_events(job: Job) -> list[ImageReady]:
    return [e for e in job.events_after(0) if isinstance(e, ImageReady)]


class HoldFirstShare(FakeRunner):
    """Holds the share with image 0 until released, so the other share finishes first."""

    def __init__(self, release: threading.Event, **kw: object) -> None:
        super().__init__(supports_image_subset=True, **kw)
        self.release = release
        self.indices: tuple[int, ...] | None = None

    def _run(self, ctx: RunContext) -> None:
        self.indices = ctx.image_indices
        if 0 in (ctx.image_indices or ()):
            assert self.release.wait(10)
        super()._run(ctx)


def test_a_jobs_images_run_on_every_idle_device_and_arrive_in_index_order() -> None:
    import time

    release = threading.Event()
    runners = [HoldFirstShare(release), HoldFirstShare(release)]
    with Engine(runners) as engine:
        wait_all_idle(engine)
        job = engine.submit(req("x", image_number=4))  # no seed: one is drawn for both shares
        deadline = time.monotonic() + 10
        while sum(len(r.step_log) for r in runners) < 4:  # the second share (images 2, 3) finishes first ...
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert image_events(job) == []  # ... but its images wait for 0 and 1
        release.set()
        assert job.wait(10)
    assert sorted(r.indices for r in runners) == [(0, 1), (2, 3)]
    assert job.state is JobState.DONE
    events = job.events_after(0)
    assert sum(1 for e in events if e.kind == "started") == 1
    images = image_events(job)
    assert [im.index for im in images] == [0, 1, 2, 3]
    assert [im.seed for im in images] == list(job.seeds) and job.seeds[1:] == tuple(s + 1 for s in job.seeds[:-1])
    assert [len(r.step_log) for r in runners] == [4, 4]  # two images of two steps each
    assert engine.stats().jobs_by_outcome == {"done": 1}
    # exactly what one device makes for the same request and seed
    with Engine(FakeRunner()) as single:
        alone = single.submit(req("x", image_number=4, seed=job.seeds[0]))
        assert alone.wait(10)
    assert [im.data for im in image_events(alone)] == [im.data for im in images]


def test_a_failing_share_fails_the_job_once_and_stops_the_other() -> None:
    from engine.core.errors import HooocusError

    hold = HoldAt(1)
    good = FakeRunner(on_step=hold, supports_image_subset=True)
    bad = FakeRunner(supports_image_subset=True, faults={("x", 1): HooocusError("device lost", code="model_missing")})
    with Engine([good, bad]) as engine:
        wait_all_idle(engine)
        job = engine.submit(req("x", image_number=2, seed=1))
        # The failing share sets the job's token, which stops the other share (held at step 1, or not
        # yet there when the failure came first: the order of the two threads is not fixed).
        assert _wait_token(job)
        hold.release()
        assert job.wait(10)
    assert job.state is JobState.FAILED and job.error["code"] == "model_missing"
    assert sum(1 for e in job.events_after(0) if e.kind in ("done", "failed", "cancelled")) == 1
    assert engine.stats().jobs_by_outcome == {"failed": 1}
    assert len(good.step_log) <= 1  # it stopped at its next cancel check


def _wait_token(job: Job) -> bool:
    return job.cancel_token._event.wait(10)


def test_no_split_while_other_jobs_wait() -> None:
    meet = Rendezvous(2)  # both jobs run at once, so neither worker is idle when the other takes a job
    runners = [FakeRunner(supports_image_subset=True, on_step=meet),
               FakeRunner(supports_image_subset=True, on_step=meet)]
    engine = Engine(runners)
    jobs = [engine.submit(req(f"j{i}", image_number=2, seed=i)) for i in range(2)]
    with engine:
        assert all(job.wait(10) for job in jobs)
    for runner in runners:  # each device ran one whole job
        assert len({job_id for job_id, _ in runner.step_log}) == 1 and len(runner.step_log) == 4


def test_demo_model_on_two_cpu_workers_makes_the_same_bytes_as_on_one(tmp_path) -> None:
    from engine.core.runtime import create_runtime
    from engine.core.settings import load_settings

    settings, _ = load_settings(cli={"data_dir": tmp_path, "devices": ("cpu", "cpu")}, env={})
    runtime = create_runtime(settings, model="demo", record_history=False)
    request = req("a fox in the snow", steps=2, width=64, height=64, image_number=3, seed=7)
    with runtime.engine as engine:
        wait_all_idle(engine, timeout_s=120)  # each worker loads its demo model first
        split = engine.submit(request)
        assert split.wait(120), split.info()
        per_device = [w.jobs_done for w in engine.stats().workers]
    assert split.state is JobState.DONE and per_device == [1, 1]  # both devices made a share
    with Engine(runtime.engine.runners[0]) as one:
        whole = one.submit(request)
        assert whole.wait(120)
    assert [im.index for im in image_events(split)] == [0, 1, 2]
    assert [im.data for im in image_events(split)] == [im.data for im in image_events(whole)]
    assert split.events_after(0)[1].kind == "started" and split.seeds == whole.seeds


def test_no_split_across_device_kinds() -> None:
    @dataclasses.dataclass
    class OnCuda(FakeRunner):
        device: str = "cuda:0"

    runners = [FakeRunner(supports_image_subset=True), OnCuda(supports_image_subset=True)]
    with Engine(runners) as engine:
        wait_all_idle(engine)
        job = engine.submit(req("x", image_number=2, seed=3))
        assert job.wait(10)
    assert sorted(len(r.step_log) for r in runners) == [0, 4]  # one device made both images


def test_each_gpu_worker_thread_binds_its_own_device(monkeypatch) -> None:
    import torch

    from engine.core.model_cache import ModelCache
    from engine.sdxl.models.loading import bind_thread_to_device
    from engine.sdxl.pipeline import SDXLRunner

    bound: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    bind_thread_to_device(torch.device("cpu"))
    assert bound == []
    runner = SDXLRunner.__new__(SDXLRunner)  # no models: only run()'s set-up is under test
    runner.device = torch.device("cuda:1")
    runner.models = ModelCache(0)  # run() pins the job's models in it
    runner._run = lambda ctx: None
    runner.run(None)  # type: ignore[arg-type]
    assert bound == [torch.device("cuda:1")]
