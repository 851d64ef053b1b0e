"""The Ray backend's stream without Ray: what a replica sends for a job's events, and the front
door re-emitting it, give the same job as running the runner in process; the replica maps a job's
failures the way the engine does. (tests/distributed/test_ray_serve.py runs it on a real Ray.)"""

from __future__ import annotations

from typing import Any

import pytest

from engine.core.errors import HooocusError, JobCancelled
from engine.core.events import Done, Event, Failed, ImageReady, Preview, Started
from engine.core.jobs import Engine, Job, RunContext
from engine.core.request import GenerationRequest
from engine.core.testing import FakeOutOfMemoryError, FakeRunner
from engine.distributed.ray_serve import RayRunner, encode_event, run_job_in_replica

REQUEST = {"prompt": "a fox", "width": 64, "height": 64, "steps": 3, "seed": 5, "image_number": 2}


class StubEngine:
    image_sink = None

    def __init__(self) -> None:
        self.steps = 0

    def _count_step(self) -> None:
        self.steps += 1


def replica_messages(runner: FakeRunner, request: dict[str, Any]) -> tuple[Job, list[dict[str, Any]]]:
    """What a replica streams for ``request``: its job's events, encoded, in order."""
    job = Job("j_replica", GenerationRequest.parse(request), "alice")
    sent: list[dict[str, Any]] = []
    job.subscribe(lambda event: sent.append(encode_event(event)), after_seq=None)
    run_job_in_replica(runner, job, RunContext(job, StubEngine()))  # type: ignore[arg-type]
    return job, sent


def comparable(event: Event) -> tuple[Any, ...]:
    if isinstance(event, ImageReady):
        return (type(event), event.index, event.seed, event.data, event.sha256, event.metadata)
    if isinstance(event, Preview):
        return (type(event), event.step, event.image_index, event.rgb.tobytes())
    fields = event.to_dict()
    fields.pop("job_id"), fields.pop("seq")
    return (type(event), fields)


def test_re_emitted_stream_equals_the_in_process_run() -> None:
    with Engine(FakeRunner(image_max_side_px=32)) as local:
        expected = local.submit(REQUEST)
        assert expected.wait(30)
    replica_job, messages = replica_messages(FakeRunner(image_max_side_px=32), REQUEST)
    assert isinstance(replica_job.events_after(0)[-1], Done)

    front = Job("j_front", GenerationRequest.parse(REQUEST), "alice")
    seen: list[Event] = []
    front.subscribe(seen.append, after_seq=None)
    engine = StubEngine()
    ctx = RunContext(front, engine)  # type: ignore[arg-type]
    ends = [RayRunner._apply(ctx, message) for message in messages]
    assert ends == [False] * (len(messages) - 1) + [True]  # only the terminal Done ends the run
    # Done is the engine's to emit after run() returns, as for a local runner.
    want = [e for e in expected.events_after(0) if not isinstance(e, Done) and e.kind != "queued"]
    got = [e for e in seen if not isinstance(e, Preview)]
    assert [comparable(e) for e in got] == [comparable(e) for e in want]
    assert sum(isinstance(e, Preview) for e in seen) == 3 * 2  # every step's preview crossed too
    assert engine.steps == 3 * 2  # progress counts steps in the front door's engine
    assert isinstance(seen[0], Started) and seen[0].seeds == (5, 6)


@pytest.mark.parametrize(("fault", "code"), [
    (HooocusError("no such lora", code="unknown_lora"), "unknown_lora"),
    (FakeOutOfMemoryError("CUDA out of memory"), "out_of_memory"),
    (ValueError("boom"), "internal_error"),
])
def test_a_failing_job_on_the_replica_arrives_as_its_code(fault: BaseException, code: str) -> None:
    runner = FakeRunner(faults={("a fox", 2): fault})
    replica_job, messages = replica_messages(runner, REQUEST)
    last = replica_job.events_after(0)[-1]
    assert isinstance(last, Failed) and last.code == code
    assert "boom" not in last.message  # an internal error's text stays in the replica's log
    assert runner.oom_recoveries == (1 if code == "out_of_memory" else 0)
    front = Job("j_front", GenerationRequest.parse(REQUEST), "alice")
    ctx = RunContext(front, StubEngine())  # type: ignore[arg-type]
    with pytest.raises(HooocusError) as info:
        for message in messages:
            RayRunner._apply(ctx, message)
    assert info.value.code == code


def test_a_job_cancelled_on_the_replica_ends_cancelled_in_the_front_door() -> None:
    job = Job("j_replica", GenerationRequest.parse(REQUEST), "alice")
    sent: list[dict[str, Any]] = []
    job.subscribe(lambda event: sent.append(encode_event(event)), after_seq=None)
    job.cancel_token.cancel("admin")
    run_job_in_replica(FakeRunner(), job, RunContext(job, StubEngine()))  # type: ignore[arg-type]
    ctx = RunContext(Job("j_front", GenerationRequest.parse(REQUEST), "alice"), StubEngine())  # type: ignore[arg-type]
    with pytest.raises(JobCancelled) as info:
        for message in sent:
            RayRunner._apply(ctx, message)
    assert info.value.reason == "admin"
