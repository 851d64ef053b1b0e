"""Job history: every state recorded, images written to dated folders, survives a reopen, marks
jobs a crashed process left behind as interrupted."""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.errors import HooocusError, InvalidRequest
from engine.core.history import HISTORY_FILE_NAME, JobHistory
from engine.core.jobs import Engine
from engine.core.settings import load_settings
from engine.core.testing import FakeRunner, StepGate

#: A fixed clock, so the dated output folder is known: 2024-05-06 in local time.
CLOCK_S = dt.datetime(2024, 5, 6, 12, 30, 0).timestamp()


def req(prompt: str = "a cat", steps: int = 2, **kw: object) -> dict[str, object]:
    return {"prompt": prompt, "steps": steps, **kw}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / HISTORY_FILE_NAME


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "outputs"


@pytest.fixture
def history(db_path: Path, out_dir: Path) -> Iterator[JobHistory]:
    with JobHistory(db_path, output_dir=out_dir, clock=lambda: CLOCK_S) as h:
        yield h


def test_done_job_is_recorded_with_params_seeds_and_image_files(history: JobHistory, out_dir: Path) -> None:
    with Engine(FakeRunner(image_max_side_px=16)) as engine:
        history.attach(engine)
        job = engine.submit(req(image_number=2, seed=7), owner="alice")
        assert job.wait(10)
    row = history.get_job(job.job_id)
    assert row is not None
    assert row["state"] == "done" and row["owner"] == "alice" and row["error"] is None
    assert row["created_at"] <= row["started_at"] <= row["finished_at"]
    assert row["seeds"] == ["7", "8"]
    assert row["params"]["steps"] == 2 and row["params"]["prompt"] == "a cat"
    assert row["request"]["prompt"] == "a cat" and row["request"]["image_number"] == 2
    assert [img["index"] for img in row["images"]] == [0, 1]
    for img, event in zip(row["images"], job.images, strict=True):
        path = Path(img["path"])
        assert path.parent == out_dir.absolute() / "2024-05-06"  # Fooocus-style dated folder
        assert path.name.startswith("2024-05-06_12-30-00_") and path.suffix == ".png"
        data = path.read_bytes()
        assert data == event.data and hashlib.sha256(data).hexdigest() == img["sha256"] == event.sha256
        assert (img["seed"], img["width"], img["height"], img["size_bytes"]) == (
            str(event.seed), event.width, event.height, len(event.data))
        assert history.image_path(img["sha256"]) == path
    # the same keys as the live view, so a server can answer from either
    assert set(job.info()) <= set(row)


def test_states_are_recorded_as_they_happen(history: JobHistory) -> None:
    gate = StepGate(1)
    with Engine(FakeRunner(on_step=gate, image_max_side_px=16)) as engine:
        history.attach(engine)
        first = engine.submit(req("first"))
        second = engine.submit(req("second"))
        assert gate.reached.wait(10)
        running, queued = history.get_job(first.job_id), history.get_job(second.job_id)
        assert running is not None and running["state"] == "running" and running["started_at"] is not None
        assert running["finished_at"] is None and running["images"] == []
        assert queued is not None and queued["state"] == "queued" and queued["started_at"] is None
        gate.release()
        assert first.wait(10) and second.wait(10)
    assert [history.get_job(j.job_id)["state"] for j in (first, second)] == ["done", "done"]  # type: ignore[index]


def test_cancelled_and_failed_jobs_keep_their_codes(history: JobHistory) -> None:
    gate = StepGate(1)
    runner = FakeRunner(on_step=gate, image_max_side_px=16,
                        faults={("bad", 1): HooocusError("weights are broken", code="model_invalid"),
                                ("crash", 1): RuntimeError("kaboom")})
    with Engine(runner) as engine:
        history.attach(engine)
        running = engine.submit(req("slow", steps=5))
        queued = engine.submit(req("waiting"))
        bad = engine.submit(req("bad"))
        crash = engine.submit(req("crash"))
        assert gate.reached.wait(10)
        assert engine.cancel(queued.job_id)
        assert engine.cancel(running.job_id, reason="admin")
        gate.release()
        for job in (running, queued, bad, crash):
            assert job.wait(10)
    rows = {name: history.get_job(job.job_id) for name, job in
            (("running", running), ("queued", queued), ("bad", bad), ("crash", crash))}
    assert rows["queued"]["state"] == "cancelled" and rows["queued"]["error"]["reason"] == "user"  # type: ignore[index]
    assert rows["queued"]["started_at"] is None  # type: ignore[index]
    assert rows["running"]["state"] == "cancelled" and rows["running"]["error"]["reason"] == "admin"  # type: ignore[index]
    assert rows["bad"]["state"] == "failed"  # type: ignore[index]
    assert rows["bad"]["error"]["code"] == "model_invalid"  # type: ignore[index]
    crash_error = rows["crash"]["error"]  # type: ignore[index]
    assert rows["crash"]["state"] == "failed" and crash_error["code"] == "internal_error"  # type: ignore[index]
    assert crash_error["error_id"] and "kaboom" not in crash_error["message"]


def test_shutdown_cancellations_are_recorded(history: JobHistory) -> None:
    gate = StepGate(1)
    engine = Engine(FakeRunner(on_step=gate, image_max_side_px=16)).start()
    history.attach(engine)
    running = engine.submit(req("running"))
    queued = [engine.submit(req(f"q{i}")) for i in range(3)]
    assert gate.reached.wait(10)
    gate.release()
    engine.close(grace_s=10)
    assert history.get_job(running.job_id)["state"] == "done"  # type: ignore[index]
    for job in queued:
        row = history.get_job(job.job_id)
        assert row is not None and row["state"] == "cancelled" and row["error"]["reason"] == "shutting_down"


def test_history_survives_a_reopen(db_path: Path, out_dir: Path) -> None:
    with JobHistory(db_path, output_dir=out_dir) as first:
        with Engine(FakeRunner(image_max_side_px=16)) as engine:
            first.attach(engine)
            jobs = [engine.submit(req(f"p{i}", seed=i), owner="bob") for i in range(3)]
            for job in jobs:
                assert job.wait(10)
        before = [first.get_job(job.job_id) for job in jobs]
        listing = first.list_jobs()
    with JobHistory(db_path) as second:
        assert second.interrupted_job_ids == ()
        assert [second.get_job(job.job_id) for job in jobs] == before
        assert second.list_jobs() == listing
        assert [j["job_id"] for j in listing] == [job.job_id for job in reversed(jobs)]  # newest first
        assert second.image_path(before[0]["images"][0]["sha256"]) == Path(before[0]["images"][0]["path"])


def test_jobs_left_unfinished_by_a_crash_are_marked_interrupted(db_path: Path) -> None:
    gate = StepGate(1)
    engine = Engine(FakeRunner(on_step=gate, image_max_side_px=16)).start()
    crashed = JobHistory(db_path)
    crashed.attach(engine)
    running = engine.submit(req("running"))
    queued = engine.submit(req("queued"))
    assert gate.reached.wait(10)
    try:
        # A new process opens the same database while the old one's rows still say queued/running.
        with JobHistory(db_path, clock=lambda: CLOCK_S) as restarted:
            assert set(restarted.interrupted_job_ids) == {running.job_id, queued.job_id}
            for job in (running, queued):
                row = restarted.get_job(job.job_id)
                assert row is not None and row["state"] == "failed"
                assert row["error"]["code"] == "interrupted" and row["finished_at"] == CLOCK_S
    finally:
        gate.release()
        engine.close(grace_s=10)
        crashed.close()


def test_list_jobs_filters_by_owner_and_pages_with_a_cursor(history: JobHistory) -> None:
    with Engine(FakeRunner(image_max_side_px=16)) as engine:
        history.attach(engine)
        jobs = [engine.submit(req(f"p{i}", steps=1), owner="alice" if i % 2 == 0 else "bob") for i in range(5)]
        for job in jobs:
            assert job.wait(10)
    newest_first = [job.job_id for job in reversed(jobs)]
    alice = history.list_jobs(owner="alice")
    assert [j["job_id"] for j in alice] == [jid for jid in newest_first if jid in {jobs[0].job_id, jobs[2].job_id,
                                                                                  jobs[4].job_id}]
    assert {j["owner"] for j in alice} == {"alice"}
    assert history.list_jobs(owner="nobody") == []
    page1 = history.list_jobs(limit=2)
    page2 = history.list_jobs(limit=2, before=page1[-1]["job_id"])
    page3 = history.list_jobs(limit=2, before=page2[-1]["job_id"])
    assert [j["job_id"] for j in page1 + page2 + page3] == newest_first
    # a cursor from someone else's job is refused exactly like an unknown one
    with pytest.raises(InvalidRequest) as foreign:
        history.list_jobs(owner="alice", before=jobs[1].job_id)
    with pytest.raises(InvalidRequest) as unknown:
        history.list_jobs(owner="alice", before="j_nope")
    assert foreign.value.loc == unknown.value.loc == ("before",)
    for bad_limit in (0, 501, True):
        with pytest.raises(InvalidRequest):
            history.list_jobs(limit=bad_limit)  # type: ignore[arg-type]
    assert history.get_job("j_nope") is None


def test_image_path_rejects_anything_but_a_sha256(history: JobHistory) -> None:
    assert history.image_path("../../etc/passwd") is None
    assert history.image_path("0" * 64) is None


def test_output_limits_prune_after_each_write(db_path: Path, out_dir: Path) -> None:
    with JobHistory(db_path, output_dir=out_dir, output_max_bytes=0) as history:
        with Engine(FakeRunner(image_max_side_px=16)) as engine:
            history.attach(engine)
            job = engine.submit(req(image_number=2))
            assert job.wait(10)
        row = history.get_job(job.job_id)
    assert row is not None and len(row["images"]) == 2
    assert all(img["path"] is None and img["sha256"] for img in row["images"])  # metadata kept, file gone
    assert not list(out_dir.rglob("*.png"))


def test_without_output_dir_no_files_are_written(db_path: Path, tmp_path: Path) -> None:
    with JobHistory(db_path) as history:
        with Engine(FakeRunner(image_max_side_px=16)) as engine:
            history.attach(engine)
            job = engine.submit(req())
            assert job.wait(10)
        row = history.get_job(job.job_id)
    assert row is not None and row["images"][0]["path"] is None
    assert not list(tmp_path.rglob("*.png"))


def test_from_settings_uses_the_data_and_output_folders(tmp_path: Path) -> None:
    settings, _ = load_settings(env={"HOME": str(tmp_path)}, cli={"data_dir": tmp_path / "d",
                                                                   "output_max_age_days": 3.0},
                                toml_path=None)
    with JobHistory.from_settings(settings) as history:
        assert history.db_path == tmp_path / "d" / HISTORY_FILE_NAME and history.db_path.is_file()
        assert history.output_dir == (tmp_path / "d" / "outputs").absolute()
        assert history.output_max_age_days == 3.0 and history.output_max_bytes is None


def test_a_database_from_a_newer_release_is_refused(db_path: Path) -> None:
    JobHistory(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(HooocusError, match="schema version 99"):
        JobHistory(db_path)


def test_events_after_close_are_ignored(db_path: Path) -> None:
    history = JobHistory(db_path)
    gate = StepGate(1)
    with Engine(FakeRunner(on_step=gate, image_max_side_px=16)) as engine:
        history.attach(engine)
        job = engine.submit(req())
        assert gate.reached.wait(10)
        history.close()
        history.close()
        gate.release()
        assert job.wait(10)
    assert job.state.value == "done"  # the job itself was not disturbed
    with pytest.raises(HooocusError):
        history.list_jobs()
