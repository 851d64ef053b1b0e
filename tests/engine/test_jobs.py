"""The job queue and its single worker: ordering, per-job cancel, interrupt, limits, faults, shutdown."""

from __future__ import annotations

import threading

import pytest

from engine import Engine, GenerationRequest
from engine.core.errors import InvalidRequest, NotFound, QueueFull, ShuttingDown, UnknownStyle
from engine.core.events import Cancelled, Done, Failed, ImageReady, Progress, Queued, Started
from engine.core.jobs import JobState
from engine.core.testing import FakeOutOfMemoryError, FakeRunner, StepGate


def req(prompt: str = "p", steps: int = 3, **kw: object) -> dict[str, object]:
    return {"prompt": prompt, "steps": steps, **kw}


def kinds(job) -> list[str]:
    return [e.kind for e in job.events_after(0)]


def test_jobs_run_in_order_and_stream_typed_events() -> None:
    runner = FakeRunner()
    with Engine(runner) as engine:
        first = engine.submit(req("a", image_number=2, seed=5))
        second = engine.submit(req("b"))
        assert first.wait(10) and second.wait(10)
    assert first.state is JobState.DONE and second.state is JobState.DONE
    assert kinds(first)[0] == "queued" and kinds(first)[-1] == "done"
    started = next(e for e in first.events_after(0) if isinstance(e, Started))
    assert started.seeds == (5, 6) and started.to_dict()["seeds"] == ["5", "6"]
    images = [e for e in first.events_after(0) if isinstance(e, ImageReady)]
    assert [i.index for i in images] == [0, 1] and [i.seed for i in images] == [5, 6]
    seqs = [e.seq for e in first.events_after(0)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # every step of the first job ran before any step of the second: one worker, no interleaving
    owners = [job_id for job_id, _ in runner.step_log]
    assert owners == [first.job_id] * 6 + [second.job_id] * 3
    assert runner.max_concurrent_seen == 1


def test_cancel_running_job_stops_within_a_step_and_next_job_runs() -> None:
    gate = StepGate(2)
    runner = FakeRunner(on_step=gate)
    with Engine(runner) as engine:
        victim = engine.submit(req("victim", steps=10))
        survivor = engine.submit(req("survivor", steps=3))
        assert gate.reached.wait(5)
        assert engine.cancel(victim.job_id)
        gate.release()
        assert victim.wait(5) and survivor.wait(5)
    assert victim.state is JobState.CANCELLED
    cancelled = victim.events_after(0)[-1]
    assert isinstance(cancelled, Cancelled) and cancelled.images_done == 0 and cancelled.reason == "user"
    assert not any(isinstance(e, ImageReady) for e in victim.events_after(0))
    steps_run = [s for j, s in runner.step_log if j == victim.job_id]
    assert max(steps_run) <= 2  # the step in flight finishes, no further step starts
    assert survivor.state is JobState.DONE and not survivor.cancel_token.is_set()


def test_cancel_queued_job_removes_it_and_updates_positions() -> None:
    gate = StepGate(1)
    with Engine(FakeRunner(on_step=gate)) as engine:
        running = engine.submit(req("r"))
        assert gate.reached.wait(5)
        middle = engine.submit(req("m"))
        last = engine.submit(req("l"))
        assert engine.queue_position(middle.job_id) == 1 and engine.queue_position(last.job_id) == 2
        assert engine.cancel(middle.job_id)
        assert middle.state is JobState.CANCELLED
        assert engine.queue_position(last.job_id) == 1
        positions = [e.position for e in last.events_after(0) if isinstance(e, Queued)]
        assert positions[-1] == 1
        gate.release()
        assert running.wait(5) and last.wait(5)
    assert last.state is JobState.DONE
    assert not engine.cancel(last.job_id)  # finished: a no-op
    assert not engine.cancel("j_unknown")


def test_interrupt_stops_only_the_running_job() -> None:
    gate = StepGate(2)
    with Engine(FakeRunner(on_step=gate)) as engine:
        running = engine.submit(req("r", steps=5))
        queued = engine.submit(req("q"))
        assert gate.reached.wait(5)
        assert engine.interrupt() == running.job_id
        gate.release()
        assert running.wait(5) and queued.wait(5)
    assert running.state is JobState.CANCELLED and running.events_after(0)[-1].reason == "admin"
    assert queued.state is JobState.DONE


def test_invalid_request_is_rejected_before_queueing() -> None:
    runner = FakeRunner()
    with Engine(runner) as engine:
        with pytest.raises(InvalidRequest) as info:
            engine.submit({"prompt": "x", "width": 1001, "height": 512})
        assert info.value.loc == ("width",)
        with pytest.raises(InvalidRequest):
            engine.submit({"prompt": "x", "bogus": 1})
        with pytest.raises(UnknownStyle) as style_info:
            engine.submit({"prompt": "x", "styles": ["Nope"]})
        assert style_info.value.loc == ("styles", 0)
        assert engine.jobs() == [] and runner.step_log == []


def test_queue_limits_overall_and_per_owner() -> None:
    gate = StepGate(1)
    with Engine(FakeRunner(on_step=gate), max_queue=2, max_queued_per_owner=2) as engine:
        engine.submit(req("run"), owner="alice")
        assert gate.reached.wait(5)
        engine.submit(req("q1"), owner="alice")
        with pytest.raises(QueueFull):
            engine.submit(req("q2"), owner="alice")  # alice: 1 running + 1 queued
        engine.submit(req("q3"), owner="bob")
        with pytest.raises(QueueFull):
            engine.submit(req("q4"), owner="carol")  # overall queue of 2 is full
        gate.release()


def test_out_of_memory_fails_the_job_recovers_and_next_job_runs() -> None:
    runner = FakeRunner(faults={("boom", 2): FakeOutOfMemoryError("CUDA out of memory")})
    with Engine(runner) as engine:
        bad = engine.submit(req("boom"))
        good = engine.submit(req("fine"))
        assert bad.wait(5) and good.wait(5)
    failed = bad.events_after(0)[-1]
    assert isinstance(failed, Failed) and failed.code == "out_of_memory" and failed.error_id
    assert runner.oom_recoveries == 1
    assert good.state is JobState.DONE


def test_unexpected_exception_becomes_internal_error_without_traceback_text() -> None:
    runner = FakeRunner(faults={("boom", 1): ZeroDivisionError("secret detail")})
    with Engine(runner) as engine:
        bad = engine.submit(req("boom"))
        good = engine.submit(req("fine"))
        assert bad.wait(5) and good.wait(5)
    failed = bad.events_after(0)[-1]
    assert failed.code == "internal_error" and "secret" not in failed.message and "Traceback" not in failed.message
    assert failed.error_id in failed.message
    assert good.state is JobState.DONE


def test_subscribe_replays_missed_events_then_follows_live() -> None:
    gate = StepGate(2)
    with Engine(FakeRunner(on_step=gate)) as engine:
        job = engine.submit(req("x", steps=4))
        assert gate.reached.wait(5)
        seen_before = job.events_after(0)
        received: list = []
        lock = threading.Lock()

        def listener(event) -> None:
            with lock:
                received.append(event)

        job.subscribe(listener, after_seq=seen_before[1].seq)
        gate.release()
        assert job.wait(5)
    non_preview = [e for e in received if e.kind != "preview"]
    assert [e.seq for e in non_preview] == [e.seq for e in job.events_after(seen_before[1].seq)]
    assert isinstance(non_preview[-1], Done)


def test_close_cancels_queued_jobs_with_shutting_down_and_refuses_new_ones() -> None:
    gate = StepGate(1)
    engine = Engine(FakeRunner(on_step=gate)).start()
    running = engine.submit(req("r", steps=3))
    assert gate.reached.wait(5)
    queued = [engine.submit(req(f"q{i}")) for i in range(3)]
    closer = threading.Thread(target=engine.close, kwargs={"grace_s": 5.0})
    closer.start()
    for job in queued:
        assert job.wait(5)
        assert job.events_after(0)[-1].reason == "shutting_down"
    gate.release()
    closer.join(10)
    assert running.state is JobState.DONE  # finished within the grace period
    with pytest.raises(ShuttingDown):
        engine.submit(req("late"))


def test_require_job_hides_other_owners_jobs() -> None:
    with Engine(FakeRunner()) as engine:
        job = engine.submit(req("x"), owner="alice")
        assert engine.require_job(job.job_id, owner="alice") is job
        with pytest.raises(NotFound):
            engine.require_job(job.job_id, owner="mallory")
        job.wait(5)


def test_iter_events_yields_until_terminal_and_progress_is_monotonic() -> None:
    with Engine(FakeRunner()) as engine:
        job = engine.submit(req("x", steps=5, image_number=2))
        events = list(job.iter_events(timeout_s=10))
    progress = [(e.image_index, e.step) for e in events if isinstance(e, Progress)]
    assert progress == sorted(progress) and len(progress) == 10
    assert isinstance(events[-1], Done)


def test_request_defaults_and_normalisation() -> None:
    request = GenerationRequest.parse({"prompt": "x", "performance": "extreme_speed", "aspect_ratio": "1024x1024"})
    assert request.performance == "Extreme Speed" and request.size == (1024, 1024)
    assert request.aspect_ratio == "1024*1024"
    with pytest.raises(InvalidRequest):
        GenerationRequest.parse({"width": 512})  # height missing
    with pytest.raises(InvalidRequest):
        GenerationRequest.parse({"seed": 2**63})
    with pytest.raises(InvalidRequest):
        GenerationRequest.parse({"prompt": "x" * 20_000})
    assert GenerationRequest.parse({"seed": "123"}).seed == 123
