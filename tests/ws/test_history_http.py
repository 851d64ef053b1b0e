"""GET /v1/jobs and GET /v1/jobs/{id} over the SQLite job history: owner or admin only, pages,
finished jobs and their image files after a restart (a new runtime on the same data folder)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.core.history import JobHistory
from engine.core.testing import FakeRunner, StepGate
from tests.ws.conftest import ADMIN, ALICE, BOB, auth, make_app, make_runtime


def serve(tmp_path: Path, runner: FakeRunner | None = None, *, with_history: bool = True) -> TestClient:
    runtime = make_runtime(tmp_path, runner)
    history = JobHistory.from_settings(runtime.settings) if with_history else None
    return TestClient(make_app(runtime, history=history))


def run_jobs(client: TestClient, owners: list[str]) -> list[str]:
    ids = []
    for i, token in enumerate(owners):
        body = client.post("/v1/generate", headers=auth(token), json={"prompt": f"job {i}", "steps": 1,
                                                                      "seed": 100 + i}).json()
        assert body["state"] == "done"
        ids.append(body["job_id"])
    return ids


@pytest.fixture
def finished(tmp_path: Path) -> Iterator[list[str]]:
    """Three finished jobs (alice, bob, alice) recorded in tmp_path's history; the server is stopped."""
    with serve(tmp_path) as client:
        ids = run_jobs(client, [ALICE, BOB, ALICE])
    yield ids


def test_list_is_per_owner_newest_first_and_admins_see_everyone(tmp_path, finished):
    with serve(tmp_path) as client:  # a restart: the engine knows none of these jobs
        mine = client.get("/v1/jobs", headers=auth(ALICE)).json()
        assert [job["job_id"] for job in mine["jobs"]] == [finished[2], finished[0]]
        assert mine["next_before"] is None
        assert all("owner" not in job and "path" not in job["images"][0] for job in mine["jobs"])
        assert [job["job_id"] for job in client.get("/v1/jobs", headers=auth(BOB)).json()["jobs"]] == [finished[1]]
        everyone = client.get("/v1/jobs", headers=auth(ADMIN)).json()["jobs"]
        assert [(job["job_id"], job["owner"]) for job in everyone] == \
            [(finished[2], "alice"), (finished[1], "bob"), (finished[0], "alice")]
        assert all(Path(job["images"][0]["path"]).is_file() for job in everyone)
        page = client.get("/v1/jobs?limit=1", headers=auth(ALICE)).json()
        assert [job["job_id"] for job in page["jobs"]] == [finished[2]] and page["next_before"] == finished[2]
        rest = client.get(f"/v1/jobs?limit=1&before={page['next_before']}", headers=auth(ALICE)).json()
        assert [job["job_id"] for job in rest["jobs"]] == [finished[0]]


@pytest.mark.parametrize(("query", "loc"), [("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"),
                                             ("before=j_nope", "before")])
def test_list_rejects_bad_pages(tmp_path, finished, query, loc):
    with serve(tmp_path) as client:
        response = client.get(f"/v1/jobs?{query}", headers=auth(ALICE))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request" and response.json()["error"]["loc"] == [loc]


def test_someone_elses_cursor_is_unknown_too(tmp_path, finished):
    with serve(tmp_path) as client:
        assert client.get(f"/v1/jobs?before={finished[1]}", headers=auth(ALICE)).status_code == 422
        assert client.get("/v1/jobs").status_code == 401


def test_a_finished_job_and_its_image_after_a_restart(tmp_path, finished):
    with serve(tmp_path) as client:
        job = client.get(f"/v1/jobs/{finished[0]}", headers=auth(ALICE)).json()
        assert job["state"] == "done" and job["seeds"] == ["100"] and job["request"]["prompt"] == "job 0"
        assert job["position"] is None and "owner" not in job and "path" not in job["images"][0]
        image = job["images"][0]
        served = client.get(image["url"])  # signed; not in the (new, empty) image store: read from disk
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert hashlib.sha256(served.content).hexdigest() == image["sha256"]
        # The owner survives the restart (from the history): alice may read by hash, bob may not.
        with_token = client.get(f"/v1/images/{image['sha256']}.png", headers=auth(ALICE))
        assert with_token.content == served.content
        assert client.get(f"/v1/images/{image['sha256']}.png", headers=auth(BOB)).status_code == 404
        assert client.get(f"/v1/images/{image['sha256']}.png", headers=auth(ADMIN)).status_code == 200
        assert client.get(f"/v1/images/{image['sha256']}.jpeg", headers=auth(ALICE)).status_code == 404
        assert client.get(f"/v1/jobs/{finished[0]}", headers=auth(BOB)).status_code == 404  # not an oracle
        assert client.get("/v1/jobs/j_unknown", headers=auth(ALICE)).status_code == 404
        admin_view = client.get(f"/v1/jobs/{finished[0]}", headers=auth(ADMIN)).json()
        assert admin_view["owner"] == "alice" and Path(admin_view["images"][0]["path"]).is_file()


def test_an_unfinished_job_is_shown_live_with_its_progress(tmp_path):
    gate = StepGate(2)
    with serve(tmp_path, FakeRunner(on_step=gate)) as client:
        job_id = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 4, "wait": False}).json()["job_id"]
        assert gate.reached.wait(10)
        queued_id = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 1, "wait": False}).json()["job_id"]
        live = client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()
        assert live["state"] == "running" and live["progress"]["step"] == 1
        listed = client.get("/v1/jobs", headers=auth(ALICE)).json()["jobs"]
        assert [(job["job_id"], job["state"], job["position"]) for job in listed] == \
            [(queued_id, "queued", 1), (job_id, "running", None)]
        gate.release()
        client.app.state.hooocus.runtime.engine.get_job(queued_id).wait(10)
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["state"] == "done"


def test_without_a_history_the_list_shows_the_engines_jobs(tmp_path):
    with serve(tmp_path, with_history=False) as client:
        ids = run_jobs(client, [ALICE, BOB, ALICE])
        mine = client.get("/v1/jobs", headers=auth(ALICE)).json()
        assert [job["job_id"] for job in mine["jobs"]] == [ids[2], ids[0]]
        assert [job["owner"] for job in client.get("/v1/jobs", headers=auth(ADMIN)).json()["jobs"]] == \
            ["alice", "bob", "alice"]
        page = client.get(f"/v1/jobs?limit=1&before={ids[2]}", headers=auth(ALICE)).json()
        assert [job["job_id"] for job in page["jobs"]] == [ids[0]] and page["next_before"] == ids[0]
        assert client.get(f"/v1/images/{'0' * 64}.png", headers=auth(ALICE)).status_code == 404


def test_a_finished_job_keeps_its_progress_after_a_restart(tmp_path, finished):
    """Issue 11 (HTTP): ``progress`` used to become null once a job was done."""
    with serve(tmp_path) as client:
        record = client.get(f"/v1/jobs/{finished[0]}", headers=auth(ALICE)).json()
    assert record["state"] == "done"
    assert record["progress"]["step"] == record["progress"]["total_steps"] >= 1
