"""HTTP companions: POST /v1/generate, jobs, signed image URLs, health, metrics, OpenAPI, the page."""

from __future__ import annotations

import hashlib
import io

from PIL import Image
from starlette.testclient import TestClient

from engine.core.testing import FakeRunner, StepGate
from hooocus_ws.signing import UrlSigner
from tests.ws.conftest import ADMIN, ALICE, BOB, READER, auth, make_app, make_runtime


def test_generate_waits_and_returns_urls_seeds_and_params(client):
    response = client.post("/v1/generate", headers=auth(ALICE), json={"prompt": "a fox", "image_number": 2,
                                                                       "seed": 2**60, "steps": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "done" and body["seeds"] == [str(2**60), str(2**60 + 1)]
    assert body["params"]["prompt"] == "a fox"
    assert [image["seed"] for image in body["images"]] == body["seeds"]
    for image in body["images"]:
        data = client.get(image["url"]).content  # signed: no token needed
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
        assert Image.open(io.BytesIO(data)).size == (image["width"], image["height"])


def test_generate_with_accept_image_returns_the_first_image(client):
    response = client.post("/v1/generate", headers={**auth(ALICE), "accept": "image/png"},
                           json={"seed": 7, "steps": 1})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG") and response.headers["x-hooocus-seed"] == "7"


def test_generate_without_wait_then_poll_and_cancel(tmp_path):
    gate = StepGate(2)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        response = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 5, "wait": False})
        assert response.status_code == 202
        job_id = response.json()["job_id"]
        assert response.json()["status_url"] == f"/v1/jobs/{job_id}"
        assert gate.reached.wait(10)
        status = client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()
        assert status["state"] == "running" and status["progress"]["step"] == 1 and "owner" not in status
        cancel = client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()
        assert cancel == {"job_id": job_id, "state_before": "running", "cancelled": True}
        gate.release()
        assert runtime.engine.get_job(job_id).wait(10)
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["state"] == "cancelled"
        again = client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()
        assert again["cancelled"] is False and again["state_before"] == "cancelled"


def test_request_id_is_idempotent_over_http(client, runtime):
    first = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 1, "request_id": "k1"}).json()
    second = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 1, "request_id": "k1"}).json()
    assert first["job_id"] == second["job_id"] and len(runtime.engine.jobs()) == 1


def test_http_errors_have_codes_and_paths(client, runtime):
    assert client.post("/v1/generate", json={}).status_code == 401
    bad = client.post("/v1/generate", headers=auth(ALICE), json={"width": 1001, "height": 1024})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_request" and bad.json()["error"]["loc"] == ["width"]
    assert client.post("/v1/generate", headers=auth(ALICE), json={"wait": "yes"}).json()["error"]["loc"] == ["wait"]
    not_json = client.post("/v1/generate", headers=auth(ALICE), content=b"{")
    assert not_json.status_code == 422 and not_json.json()["error"]["code"] == "invalid_request"
    assert client.post("/v1/generate", headers=auth(ALICE), json=[1]).status_code == 422
    # The body cap: the JSON cap plus room for one input image as a data URI (issue 14).
    from engine.core.inputs import base64_cap
    from hooocus_ws.context import ServerLimits

    body_cap = ServerLimits().max_http_body_bytes + base64_cap(client.app.state.hooocus.runtime.settings.max_upload_bytes)
    too_big = client.post("/v1/generate", headers=auth(ALICE), json={"prompt": "x" * (body_cap + 1)})
    assert too_big.status_code == 422 and "larger" in too_big.json()["error"]["message"]
    assert client.post("/v1/generate", headers=auth(READER), json={}).status_code == 403
    assert client.get("/v1/jobs/j_nope", headers=auth(ALICE)).status_code == 404
    assert runtime.engine.jobs() == []


def test_failed_job_over_http_has_no_traceback(tmp_path):
    runtime = make_runtime(tmp_path, FakeRunner(faults={("boom", 1): RuntimeError("secret internals")}))
    with TestClient(make_app(runtime)) as client:
        response = client.post("/v1/generate", headers=auth(ALICE), json={"prompt": "boom", "steps": 2})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "internal_error" and "secret" not in response.text
        assert error["details"]["error_id"] in error["message"]


def test_image_urls_need_a_valid_signature_or_a_token(client, runtime):
    body = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 1}).json()
    url = body["images"][0]["url"]
    path = url.split("?")[0]
    assert client.get(url).status_code == 200
    assert client.get(path).status_code == 401
    # Issue 11.7: the PNG metadata holds the prompt, so only the owner (or an admin) may read by hash;
    # anyone else gets the same 404 as for a missing image. The signed URL is for sharing.
    assert client.get(path, headers=auth(ALICE)).status_code == 200
    assert client.get(path, headers=auth(ADMIN)).status_code == 200
    bob = client.get(path, headers=auth(BOB))
    assert bob.status_code == 404 and bob.json()["error"]["code"] == "not_found"
    assert client.get(url.replace("sig=", "sig=x")).status_code == 403
    assert client.get(path.replace(".png", ".jpeg"), headers=auth(ALICE)).status_code == 404
    assert client.get("/v1/images/../../etc/passwd.png", headers=auth(ALICE)).status_code == 404


def test_signed_urls_expire_and_bind_key_and_path():
    signed = UrlSigner(b"k", clock=lambda: 1000.0).sign("/v1/images/a.png", ttl_s=10)
    query = dict(part.split("=", 1) for part in signed.split("?", 1)[1].split("&"))
    assert query["exp"] == "1010"
    assert UrlSigner(b"k", clock=lambda: 1009.0).verify("/v1/images/a.png", query["exp"], query["sig"])
    assert not UrlSigner(b"k", clock=lambda: 1011.0).verify("/v1/images/a.png", query["exp"], query["sig"])
    assert not UrlSigner(b"other", clock=lambda: 1009.0).verify("/v1/images/a.png", query["exp"], query["sig"])
    assert not UrlSigner(b"k", clock=lambda: 1009.0).verify("/v1/images/b.png", query["exp"], query["sig"])
    assert not UrlSigner(b"k", clock=lambda: 1009.0).verify("/v1/images/a.png", "2000", query["sig"])


def test_health_metrics_openapi_and_page(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.get("/metrics").status_code == 401
    client.post("/v1/generate", headers=auth(ALICE), json={"steps": 2})
    metrics = client.get("/metrics", headers=auth(ALICE))
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "hooocus_queue_depth 0" in text and 'hooocus_jobs_total{outcome="done"} 1' in text
    assert "hooocus_steps_total 2" in text and 'hooocus_auth_failures_total{reason="missing_token"} 1' in text
    openapi = client.get("/openapi.json").json()
    assert openapi["openapi"].startswith("3.") and {"/v1/generate", "/v1/jobs/{job_id}"} <= set(openapi["paths"])
    assert "width" in openapi["components"]["schemas"]["GenerateBody"]["properties"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="token"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "WebSocket" in client.get("/static/app.js").text


def test_metrics_report_each_device_worker(tmp_path):
    runtime = make_runtime(tmp_path, [FakeRunner(), FakeRunner()])  # --devices cpu,cpu
    with TestClient(make_app(runtime)) as client:
        for _ in range(3):
            job = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 2}).json()
            assert runtime.engine.require_job(job["job_id"]).wait(10)
        text = client.get("/metrics", headers=auth(ALICE)).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("hooocus_worker_"))
    workers = ('{worker="0",device="cpu"}', '{worker="1",device="cpu"}')
    assert sum(int(samples[f"hooocus_worker_jobs_total{w}"]) for w in workers) == 3
    assert all(samples[f"hooocus_worker_busy{w}"] == "0" for w in workers)
    assert all(float(samples[f"hooocus_worker_busy_seconds_total{w}"]) >= 0 for w in workers)
    assert all(int(samples[f"hooocus_worker_memory_bytes{w}"]) > 0 for w in workers)  # RSS on the CPU
    assert "hooocus_job_running 0" in text


class CachingRunner(FakeRunner):
    """A FakeRunner with a model cache: each job 'loads' its model (by prompt) of 40 bytes."""

    def __init__(self) -> None:
        super().__init__()
        from engine.core.model_cache import ModelCache

        self.models = ModelCache(100)

    def run(self, ctx):
        self.models.get_or_load(ctx.request.prompt, object, size_of=lambda _v: 40)
        super().run(ctx)

    def memory_stats(self):
        return self.models.stats()


def test_metrics_report_each_workers_model_cache(tmp_path):
    runtime = make_runtime(tmp_path, [CachingRunner()])
    with TestClient(make_app(runtime)) as client:
        for model in ("a", "b", "a", "c"):  # a, b; a again (a hit); c evicts b (least recently used)
            job = client.post("/v1/generate", headers=auth(ALICE), json={"prompt": model, "steps": 1}).json()
            assert runtime.engine.require_job(job["job_id"]).wait(10)
        text = client.get("/metrics", headers=auth(ALICE)).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("hooocus_worker_"))
    worker = '{worker="0",device="cpu"}'
    assert samples[f"hooocus_worker_model_cache_bytes{worker}"] == "80"
    assert samples[f"hooocus_worker_model_cache_entries{worker}"] == "2"
    assert samples[f"hooocus_worker_model_cache_budget_bytes{worker}"] == "100"
    assert samples[f"hooocus_worker_model_evictions_total{worker}"] == "1"
    assert samples[f"hooocus_worker_jobs_total{worker}"] == "4"
    assert "# TYPE hooocus_worker_model_evictions_total counter" in text


def test_options_come_from_the_runner(client):
    options = client.get("/v1/options", headers=auth(ALICE)).json()
    assert "Fooocus V2" in options["styles"] and "Speed" in options["performances"]


def test_health_reports_shutdown(runtime):
    client = TestClient(make_app(runtime))
    with client:
        pass
    assert runtime.engine.accepting is False
    assert client.get("/healthz").status_code == 503


class FakeMcpMount:
    """Stands in for hooocus_mcp.http.create_mcp_mount(...): an ASGI app plus a lifespan to enter."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def app(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    def lifespan(self):
        import contextlib

        @contextlib.asynccontextmanager
        async def span():
            self.events.append("enter")
            yield
            self.events.append("exit")

        return span()

    async def close_sessions(self) -> int:
        self.events.append("close_sessions")
        return 0


def test_mcp_mount_is_served_and_its_lifespan_entered(runtime):
    mount = FakeMcpMount()
    with TestClient(make_app(runtime, mcp_mount=mount)) as client:
        assert mount.events == ["enter"]
        bare = client.post("/mcp", follow_redirects=False)  # no 307 to /mcp/: clients are given "/mcp"
        assert bare.status_code == 200 and bare.text == "/mcp"
        assert client.get("/mcp/anything").status_code == 200
    assert mount.events == ["enter", "exit"]


def test_drain_ends_mcp_sessions_after_the_running_job_settles(runtime):
    """Issue 11.2: open /mcp streams must not hold a graceful shutdown; drain() ends the sessions once
    the jobs are settled (a running job's MCP caller still gets its result first)."""
    import anyio

    from hooocus_ws.app import drain

    mount = FakeMcpMount()
    app = make_app(runtime, mcp_mount=mount)
    with TestClient(app):
        assert mount.events == ["enter"]
        anyio.run(lambda: drain(app.state.hooocus, flush_timeout_s=0.1))
        assert mount.events == ["enter", "close_sessions"]


class Mcp401Mount(FakeMcpMount):
    """A mount that, like the real one, answers 401 without a valid bearer token."""

    def __init__(self, tokens) -> None:
        super().__init__()
        self.tokens = tokens
        self.reached = 0

    async def app(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers

        from hooocus_ws.auth import bearer_token

        self.reached += 1
        ok = self.tokens.verify(bearer_token(Headers(scope=scope))) is not None
        await send({"type": "http.response.start", "status": 200 if ok else 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_mcp_failures_count_and_a_valid_token_always_passes(runtime, tokens):
    """Issue 11.1: 30 bad bearer tokens on /mcp were never limited."""
    mount = Mcp401Mount(tokens)
    with TestClient(make_app(runtime, mcp_mount=mount), client=("10.0.0.3", 1)) as client:
        statuses = [client.post("/mcp", headers=auth("bad-token-0123456789abc")).status_code for _ in range(30)]
        assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
        assert mount.reached == 10  # blocked attempts never reach the mount
        blocked = client.post("/mcp")
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
        assert blocked.json()["error"]["code"] == "rate_limited"
        assert client.post("/mcp", headers=auth(ALICE)).status_code == 200
        # The websocket/HTTP routes share the budget.
        assert client.get("/metrics").status_code == 429


def test_cancelled_generate_returns_an_error_object_with_the_reason(tmp_path):
    """Issue 11.5: the summary's ``error: None`` used to overwrite the error object (409 ``"error": null``)."""
    import threading

    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        answer: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: answer.update(
            r=client.post("/v1/generate", headers=auth(ALICE), json={"steps": 4})))
        waiter.start()
        assert gate.reached.wait(10)
        job_id = runtime.engine.jobs()[0].job_id
        assert client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()["cancelled"] is True
        gate.release()
        waiter.join(10)
        response = answer["r"]
        assert response.status_code == 409
        body = response.json()
        assert body["error"]["code"] == "cancelled" and body["error"]["reason"] == "user"
        assert body["job_id"] == job_id and body["state"] == "cancelled"


def test_request_id_reused_with_other_params_is_a_conflict(client, runtime):
    first = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 1, "seed": 1, "request_id": "k"})
    same = client.post("/v1/generate", headers=auth(ALICE), json={"seed": 1, "steps": 1, "request_id": "k"})
    assert same.json()["job_id"] == first.json()["job_id"]  # key order does not matter
    other = client.post("/v1/generate", headers=auth(ALICE), json={"steps": 2, "seed": 1, "request_id": "k"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict" and other.json()["error"]["loc"] == ["request_id"]
    assert len(runtime.engine.jobs()) == 1


def test_queue_full_answers_with_retry_after(tmp_path):
    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate), queue_size=1)
    with TestClient(make_app(runtime)) as client:
        try:
            assert client.post("/v1/generate", headers=auth(ALICE), json={"wait": False}).status_code == 202
            assert gate.reached.wait(10)
            assert client.post("/v1/generate", headers=auth(BOB), json={"wait": False}).status_code == 202
            full = client.post("/v1/generate", headers=auth(BOB), json={"wait": False})
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["retry-after"]) >= 1
        finally:
            gate.release()


def test_admin_sees_the_owner_of_a_running_job(tmp_path):
    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        try:
            job_id = client.post("/v1/generate", headers=auth(ALICE), json={"wait": False}).json()["job_id"]
            assert gate.reached.wait(10)
            assert client.get(f"/v1/jobs/{job_id}", headers=auth(ADMIN)).json()["owner"] == "alice"
            assert "owner" not in client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).json()
        finally:
            gate.release()


def test_openapi_lists_401_for_images():
    from hooocus_ws.http import openapi_document

    responses = openapi_document()["paths"]["/v1/images/{name}"]["get"]["responses"]
    assert {"401", "403", "404"} <= set(responses)



def test_openapi_documents_uploads_and_parameters():
    """Every image-input route is in the OpenAPI document with its auth and error answers."""
    from hooocus_ws.http import openapi_document

    paths = openapi_document()["paths"]
    for path in ("/v1/uploads", "/v1/parameters"):
        post = paths[path]["post"]
        assert post["security"] and "image/*" in post["requestBody"]["content"]
        assert {"401", "413", "422"} <= set(post["responses"])


class LoopCheckingRunner(FakeRunner):
    """Records whether options() ran on an event loop thread (a remote runner's options block)."""

    def __init__(self) -> None:
        super().__init__()
        self.options_on_loop: list[bool] = []

    def options(self) -> dict[str, object]:
        import asyncio

        try:
            asyncio.get_running_loop()
            self.options_on_loop.append(True)
        except RuntimeError:
            self.options_on_loop.append(False)
        return super().options()


def test_options_are_asked_off_the_event_loop(tmp_path):
    runner = LoopCheckingRunner()
    with TestClient(make_app(make_runtime(tmp_path, runner))) as client:
        response = client.get("/v1/options", headers=auth(ALICE))
    assert response.status_code == 200 and response.json()["models"] == ["demo"]
    assert runner.options_on_loop == [False]
