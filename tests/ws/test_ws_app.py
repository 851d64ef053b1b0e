"""The websocket protocol in-process (Starlette TestClient + FakeRunner): reliability matrix rows 1-6,
8-11, 14-16, 34-35 and the protocol's own promises (replay, idempotency, previews, scopes)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient, WebSocketDenialResponse

from engine.core.jobs import JobState
from engine.core.testing import FakeOutOfMemoryError, FakeRunner, StepGate
from hooocus_ws.context import ServerLimits
from hooocus_ws.protocol import FRAME_IMAGE, FRAME_PREVIEW
from tests.ws.conftest import (
    ADMIN,
    ALICE,
    BOB,
    READER,
    WsReader,
    auth,
    connect,
    make_app,
    make_runtime,
    open_session,
)


def denial(client: TestClient, **kwargs) -> WebSocketDenialResponse:
    with pytest.raises(WebSocketDenialResponse) as info:
        with client.websocket_connect("/v1/ws", **kwargs):
            pass
    return info.value


# -- handshake: rows 1-6 --------------------------------------------------------------------------------


def test_no_token_is_401_before_accept_and_queues_nothing(client, runtime):
    response = denial(client)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"
    assert runtime.engine.jobs() == []


@pytest.mark.parametrize("token", [ALICE[:-1] + "X", "short", ALICE + "-longer-than-the-real-one"])
def test_wrong_token_is_401(client, token):
    assert denial(client, headers=auth(token)).status_code == 401


def test_tokens_are_compared_as_fixed_length_digests_in_constant_time(client, monkeypatch):
    import engine.core.access as tokens_module

    seen: list[tuple[int, int]] = []
    real = tokens_module.hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", spy)
    denial(client, headers=auth("x" * 3))
    with connect(client, ALICE):
        pass
    assert seen and all(pair == (32, 32) for pair in seen)
    assert len(seen) == 2 * 4  # every entry is compared, whether or not one matched


def test_failed_attempts_are_rate_limited_per_address(runtime):
    app = make_app(runtime)
    attacker = TestClient(app, client=("10.0.0.1", 1000))
    other = TestClient(app, client=("10.0.0.2", 1000))
    with attacker, other:
        for _ in range(10):
            assert denial(attacker, headers=auth("wrong-token-0123456789")).status_code == 401
        blocked = denial(attacker, headers=auth("wrong-token-0123456789"))  # further failures wait
        assert blocked.status_code == 429
        assert int(blocked.headers["retry-after"]) >= 1
        assert attacker.get("/v1/options").status_code == 429  # HTTP shares the limiter
        with connect(other, ALICE) as ws:  # another address is unaffected
            assert WsReader(ws).recv()["type"] == "hello"


def test_tokenless_noise_never_locks_out_a_valid_token(runtime):
    """Issue 11.1: ten tokenless requests from one address (a reverse proxy: everyone's address)
    used to make every later request from it 429, valid tokens and admin included."""
    app = make_app(runtime)
    shared = TestClient(app, client=("10.0.0.9", 1000))
    with shared:
        for _ in range(12):
            assert shared.get("/metrics").status_code in (401, 429)
        assert shared.get("/metrics").status_code == 429  # further failures are refused
        assert shared.get("/v1/options", headers=auth(ALICE)).status_code == 200
        assert shared.get("/metrics", headers=auth(ADMIN)).status_code == 200
        with connect(shared, ADMIN) as ws:
            assert WsReader(ws).recv()["type"] == "hello"
        assert denial(shared).status_code == 429


def test_forwarded_address_counts_only_behind_a_trusted_proxy(tmp_path):
    from engine.core.jobs import Engine
    from engine.core.runtime import Runtime
    from engine.core.settings import Settings
    from engine.core.store import ImageStore

    settings = Settings(data_dir=tmp_path, trusted_proxies=("10.1.0.0/16",))
    images = ImageStore()
    runtime = Runtime(settings=settings, engine=Engine(FakeRunner(), image_sink=images.put), images=images)
    app = make_app(runtime)
    proxy = TestClient(app, client=("10.1.2.3", 1000))
    stranger = TestClient(app, client=("192.0.2.7", 1000))
    with proxy, stranger:
        for _ in range(10):
            assert proxy.get("/metrics", headers={"X-Forwarded-For": "1.1.1.1, 203.0.113.5"}).status_code == 401
        # The proxy's right-most untrusted hop (203.0.113.5) is blocked, its other clients are not.
        assert proxy.get("/metrics", headers={"X-Forwarded-For": "203.0.113.5"}).status_code == 429
        assert proxy.get("/metrics", headers={"X-Forwarded-For": "203.0.113.6, 10.1.9.9"}).status_code == 401
        # An untrusted peer's X-Forwarded-For is ignored: it cannot dodge its own budget by forging one.
        for i in range(10):
            stranger.get("/metrics", headers={"X-Forwarded-For": f"198.51.100.{i}"})
        assert stranger.get("/metrics", headers={"X-Forwarded-For": "198.51.100.99"}).status_code == 429


def test_token_in_query_is_refused_and_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(WebSocketDenialResponse) as info:
        with client.websocket_connect(f"/v1/ws?token={ALICE}"):
            pass
    assert info.value.status_code == 401
    assert client.get(f"/v1/options?token={ALICE}").status_code == 401
    server_records = [r for r in caplog.records if r.name.startswith(("hooocus", "uvicorn", "starlette"))]
    assert all(ALICE not in record.getMessage() for record in server_records)


def test_subprotocol_token_for_browsers_is_not_echoed(client):
    with client.websocket_connect("/v1/ws", subprotocols=["hooocus.v1", f"hooocus.token.{ALICE}"]) as ws:
        assert ws.accepted_subprotocol == "hooocus.v1"
        assert WsReader(ws).recv()["principal"] == "alice"
    with client.websocket_connect("/v1/ws", subprotocols=[f"hooocus.token.{ALICE}"]) as ws:
        assert ws.accepted_subprotocol is None
    assert denial(client, subprotocols=["hooocus.v1", "hooocus.token.nope-nope-nope-nope"]).status_code == 401


def test_origin_allowlist(runtime):
    with TestClient(make_app(runtime, allowed_origins=["https://ok.example"])) as client:
        assert denial(client, headers={**auth(ALICE), "origin": "https://evil.example"}).status_code == 403
        assert denial(client, headers={**auth(ALICE), "origin": "null"}).status_code == 403
        for origin in (None, "https://ok.example", "http://testserver"):  # none, listed, same-origin
            headers = {**auth(ALICE), **({"origin": origin} if origin else {})}
            with client.websocket_connect("/v1/ws", headers=headers) as ws:
                assert WsReader(ws).recv()["type"] == "hello"
        assert client.post("/v1/generate", json={}, headers={**auth(ALICE), "origin": "https://evil.example"}
                           ).status_code == 403


def test_host_allowlist_against_dns_rebinding(runtime):
    with TestClient(make_app(runtime, allowed_hosts=["127.0.0.1"])) as client:  # Host: testserver
        refused = client.get("/healthz")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert denial(client, headers=auth(ALICE)).status_code == 403
    with TestClient(make_app(runtime, allowed_hosts=["127.0.0.1"]), base_url="http://127.0.0.1") as client:
        assert client.get("/healthz").status_code == 200


# -- messages: rows 7 (app level), 8-11 -------------------------------------------------------------------


def test_oversized_message_closes_1009(runtime):
    with TestClient(make_app(runtime, limits=ServerLimits(max_message_bytes=1024))) as client:
        with connect(client, ALICE) as ws:
            WsReader(ws).recv()
            ws.send_text(json.dumps({"type": "ping", "id": "x" * 2000}))
            closed = ws.receive()
            assert closed["type"] == "websocket.close" and closed["code"] == 1009
        with connect(client, ALICE) as ws:  # the server is fine
            assert WsReader(ws).recv()["type"] == "hello"


def test_malformed_json_gets_an_error_and_the_connection_stays_usable(client):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        ws.send_text("{")
        error = reader.recv()
        assert error["type"] == "error" and error["code"] == "invalid_json"
        reader.send({"type": "ping", "id": 7})
        assert reader.recv() == {"type": "pong", "re": 7, "seq": 3}


def test_many_bad_messages_in_a_row_close_1008(client):
    with connect(client) as ws:
        WsReader(ws).recv()
        for _ in range(16):
            ws.send_text("nope")
        codes = []
        while True:
            raw = ws.receive()
            if raw["type"] == "websocket.close":
                break
            codes.append(json.loads(raw["text"])["code"])
        assert codes == ["invalid_json"] * 16  # every error is delivered before the close
        assert raw["code"] == 1008


def test_binary_frame_from_client_that_is_not_an_upload_is_an_error(client):
    # Binary frames from the client are uploads (kind 3, issue 14); anything else is refused with
    # invalid_message and the connection stays usable.
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        ws.send_bytes(b"\x00\x01")
        assert reader.recv()["code"] == "invalid_message"
        reader.send({"type": "ping", "id": "p"})
        pong = reader.recv()
        assert (pong["type"], pong["re"]) == ("pong", "p")


@pytest.mark.parametrize(("message", "loc"), [
    ({"type": "explode", "id": "a"}, ["type"]),
    ({"id": "a"}, ["type"]),
    ({"type": "ping", "id": "a", "extra": 1}, ["extra"]),
    ({"type": "cancel", "id": "a", "job_id": 5}, ["job_id"]),
    ({"type": "subscribe", "id": "a", "job_id": "j", "after_seq": -1}, ["after_seq"]),
    ({"type": "generate", "id": "a", "params": "a cat"}, ["params"]),
    ({"type": "set_preview", "id": "a", "max_side": 100000}, ["max_side"]),
])
def test_invalid_messages_name_the_field(client, message, loc):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send(message)
        error = reader.recv()
        assert (error["type"], error["code"], error["loc"], error["re"]) == ("error", "invalid_message", loc, "a")
        reader.send({"type": "ping"})
        assert reader.recv()["type"] == "pong"


@pytest.mark.parametrize(("params", "code", "loc"), [
    ({"width": 1001, "height": 1024}, "invalid_request", ["params", "width"]),
    ({"width": 4096, "height": 1024}, "invalid_request", ["params", "width"]),
    ({"steps": 0}, "invalid_request", ["params", "steps"]),
    ({"seed": 2**64}, "invalid_request", ["params", "seed"]),
    ({"prompt": "x" * 20_000}, "invalid_request", ["params", "prompt"]),
    ({"aspect_ratio": "1001*1000"}, "invalid_request", ["params", "aspect_ratio"]),
    ({"sampler": "nope"}, "invalid_request", ["params", "sampler"]),
    ({"url": "http://169.254.169.254/latest"}, "invalid_request", ["params", "url"]),
    ({"styles": ["Fooocus V2", "No Such Style"]}, "unknown_style", ["params", "styles", 1]),
    ({"base_model": "../../etc/passwd"}, "unknown_model", ["params", "base_model"]),
])
def test_bad_params_error_with_field_path_and_nothing_queued(client, runtime, fake_runner, params, code, loc):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "g1", "params": params})
        error = reader.recv()
        assert (error["type"], error["re"], error["code"], error["loc"]) == ("error", "g1", code, loc)
        assert "Traceback" not in error["message"]
    assert runtime.engine.jobs() == []
    assert fake_runner.step_log == []


# -- jobs ---------------------------------------------------------------------------------------------------


def test_generate_streams_started_progress_image_done(client, runtime):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "g", "params": {"prompt": "a fox", "steps": 3, "image_number": 2,
                                                             "seed": 2**62}})
        messages = reader.until_type("done")
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "accepted" and messages[0]["re"] == "g" and messages[0]["position"] == 0
    job_id = messages[0]["job_id"]
    assert kinds.count("progress") == 6 and kinds.count("image") == 2 and kinds[-1] == "done"
    started = next(m for m in messages if m["type"] == "started")
    assert started["seeds"] == [str(2**62), str(2**62 + 1)]  # seeds as strings: exact beyond 2^53
    assert [m["seq"] for m in messages] == list(range(2, 2 + len(messages)))  # per-connection seq
    job_seqs = [m["job_seq"] for m in messages if "job_seq" in m]
    assert job_seqs == sorted(job_seqs)
    finals = [(h, payload) for kind, h, payload in reader.frames if kind == FRAME_IMAGE]
    images = [m for m in messages if m["type"] == "image"]
    assert [h["index"] for h, _ in finals] == [0, 1]
    for message, (header, payload) in zip(images, finals, strict=True):
        assert header["sha256"] == message["sha256"] == hashlib.sha256(payload).hexdigest()
        assert header["seed"] == message["seed"] and header["job_id"] == job_id
        assert Image.open(io.BytesIO(payload)).size == (message["width"], message["height"])
        assert client.get(message["url"]).content == payload  # the signed URL works without a token
    assert runtime.engine.get_job(job_id).state == JobState.DONE


def test_previews_are_binary_frames_with_the_connection_settings(tmp_path):
    runtime = make_runtime(tmp_path, FakeRunner(step_delay_s=0.01))
    with TestClient(make_app(runtime)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "set_preview", "id": "p", "max_side": 16, "format": "webp", "min_interval_ms": 0})
        assert reader.recv()["type"] == "ack"
        reader.send({"type": "generate", "params": {"steps": 4}})
        reader.until_type("done")
        previews = [(h, p) for kind, h, p in reader.frames if kind == FRAME_PREVIEW]
        assert previews
        header, payload = previews[-1]
        assert header["mime"] == "image/webp" and max(header["width"], header["height"]) <= 16
        assert Image.open(io.BytesIO(payload)).format == "WEBP"
        reader.frames.clear()
        reader.send({"type": "set_preview", "id": "off", "enabled": False})
        reader.recv()
        reader.send({"type": "generate", "params": {"steps": 4}})
        reader.until_type("done")
        assert [k for k, _, _ in reader.frames] == [FRAME_IMAGE]


def test_cancel_at_step_k_stops_that_job_only(tmp_path):
    gate = StepGate(5)
    runner = FakeRunner(on_step=gate)
    runtime = make_runtime(tmp_path, runner)
    with TestClient(make_app(runtime)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": "a", "params": {"prompt": "first", "steps": 30}})
        first = reader.recv()["job_id"]
        reader.send({"type": "generate", "id": "b", "params": {"prompt": "second", "steps": 6}})
        second = reader.until(lambda m: m["type"] == "accepted")[-1]["job_id"]
        assert gate.reached.wait(10)
        reader.send({"type": "cancel", "id": "c", "job_id": first})
        ack = reader.until(lambda m: m["type"] == "ack")[-1]
        assert (ack["re"], ack["job_id"], ack["state"]) == ("c", first, "running")
        gate.release()
        cancelled = reader.until_type("cancelled", job_id=first)[-1]
        assert cancelled["images_done"] == 0 and cancelled["reason"] == "user"
        reader.until_type("done", job_id=second)
    assert max(step for job, step in runner.step_log if job == first) == 5  # stopped at step 5, no image
    assert runtime.engine.get_job(first).images == []
    assert [step for job, step in runner.step_log if job == second] == list(range(1, 7))


def test_cancel_queued_and_finished_jobs(tmp_path):
    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        ids = []
        for i in range(3):
            reader.send({"type": "generate", "params": {"prompt": str(i), "steps": 2}})
            ids.append(reader.until(lambda m: m["type"] == "accepted")[-1]["job_id"])
        assert gate.reached.wait(10)
        reader.send({"type": "cancel", "id": "q", "job_id": ids[1]})  # queued: removed at once
        seen = reader.until_type("cancelled", job_id=ids[1])
        assert any(m["type"] == "ack" and m["state"] == "queued" for m in seen)
        moved = reader.until(lambda m: m["type"] == "queue" and m["job_id"] == ids[2])[-1]
        assert moved["position"] == 1  # the job behind it moved up
        gate.release()
        reader.until_type("done", job_id=ids[2])
        reader.send({"type": "cancel", "id": "f", "job_id": ids[0]})  # finished: a no-op
        ack = reader.until(lambda m: m["type"] == "ack")[-1]
        assert ack["state"] == "done"
        reader.send({"type": "ping", "id": "end"})
        assert reader.recv()["type"] == "pong"  # no `cancelled` for the finished job
    assert [runtime.engine.get_job(i).state for i in ids] == [JobState.DONE, JobState.CANCELLED, JobState.DONE]


def test_someone_elses_job_is_not_found(tmp_path):
    gate = StepGate(2)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        alice_cm, alice = open_session(client, ALICE)
        bob_cm, bob = open_session(client, BOB)
        try:
            alice.send({"type": "generate", "params": {"steps": 3}})
            job_id = alice.recv()["job_id"]
            assert gate.reached.wait(10)
            for message in ({"type": "cancel", "id": 1, "job_id": job_id},
                            {"type": "subscribe", "id": 2, "job_id": job_id},
                            {"type": "cancel", "id": 3, "job_id": "j_does_not_exist"}):
                bob.send(message)
                error = bob.recv()
                assert (error["type"], error["code"]) == ("error", "not_found")
            assert client.get(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
            assert client.delete(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
            gate.release()
            assert alice.until_type("done", "cancelled", "error")[-1]["type"] == "done"
        finally:
            bob_cm.__exit__(None, None, None)
            alice_cm.__exit__(None, None, None)


def test_admin_may_cancel_and_interrupt_any_job_others_may_not(tmp_path):
    gate = StepGate(2)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        alice_cm, alice = open_session(client, ALICE)
        admin_cm, admin = open_session(client, ADMIN)
        try:
            alice.send({"type": "interrupt", "id": "i"})
            assert alice.recv()["code"] == "forbidden"
            alice.send({"type": "generate", "params": {"steps": 4}})
            job_id = alice.recv()["job_id"]
            assert gate.reached.wait(10)
            admin.send({"type": "interrupt", "id": "n", "job_id": "j_not_running"})  # names another job: no-op
            assert admin.recv() == {"type": "ack", "re": "n", "job_id": None, "job_ids": [], "seq": 2}
            assert not runtime.engine.get_job(job_id).cancel_token.is_set()
            admin.send({"type": "interrupt", "id": "x", "job_id": job_id})
            assert admin.recv() == {"type": "ack", "re": "x", "job_id": job_id, "job_ids": [job_id], "seq": 3}
            gate.release()
            assert alice.until_type("cancelled")[-1]["reason"] == "admin"
        finally:
            admin_cm.__exit__(None, None, None)
            alice_cm.__exit__(None, None, None)


def test_scopes_are_enforced(client):
    with connect(client, READER) as ws:
        reader = WsReader(ws)
        assert reader.recv()["scopes"] == ["cancel:own"]
        reader.send({"type": "generate", "id": "g", "params": {}})
        assert reader.recv()["code"] == "forbidden"


def test_queue_full_overall_and_per_principal(tmp_path):
    gate = StepGate(1)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate), queue_size=2, per_owner=2)
    with TestClient(make_app(runtime)) as client:
        alice_cm, alice = open_session(client, ALICE)
        bob_cm, bob = open_session(client, BOB)
        try:
            alice.send({"type": "generate", "params": {"steps": 1}})
            alice.recv()
            assert gate.reached.wait(10)  # running
            alice.send({"type": "generate", "params": {"steps": 1}})
            assert alice.until(lambda m: m["type"] in ("accepted", "error"))[-1]["type"] == "accepted"
            alice.send({"type": "generate", "id": "third", "params": {"steps": 1}})
            error = alice.until(lambda m: m["type"] in ("accepted", "error"))[-1]
            assert (error["code"], error["re"]) == ("queue_full", "third")  # per principal: 2 unfinished
            bob.send({"type": "generate", "params": {"steps": 1}})
            assert bob.recv()["type"] == "accepted"
            bob.send({"type": "generate", "params": {"steps": 1}})
            assert bob.recv()["code"] == "queue_full"  # overall: 2 waiting
            gate.release()
        finally:
            bob_cm.__exit__(None, None, None)
            alice_cm.__exit__(None, None, None)


def test_request_id_makes_generate_idempotent(client, runtime):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "id": 1, "request_id": "retry-me", "params": {"steps": 1}})
        first = reader.recv()
        reader.until_type("done")
        reader.send({"type": "generate", "id": 2, "params": {"steps": 1, "request_id": "retry-me"}})
        again = reader.until(lambda m: m["type"] == "accepted")[-1]
        assert again["job_id"] == first["job_id"] and again["duplicate"] is True
        replay = reader.until_type("done")  # the duplicate re-attaches and replays the finished job
        assert replay[-1]["job_id"] == first["job_id"]
    with connect(client, BOB) as ws:  # keys are per principal
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "request_id": "retry-me", "params": {"steps": 1}})
        assert reader.recv()["job_id"] != first["job_id"]
    assert len(runtime.engine.jobs()) == 2


def test_disconnect_does_not_cancel_and_subscribe_replays_what_was_missed(tmp_path):
    gate = StepGate(3)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        with connect(client) as ws:
            reader = WsReader(ws)
            reader.recv()
            reader.send({"type": "generate", "params": {"steps": 5}})
            first_part = reader.until(lambda m: m["type"] == "progress" and m["step"] == 2)
        job_id = first_part[0]["job_id"]
        gate.release()
        job = runtime.engine.get_job(job_id)
        assert job.wait(10) and job.state == JobState.DONE  # the socket closed; the job went on
        last_seen = max(m["job_seq"] for m in first_part if "job_seq" in m)
        with connect(client) as ws:
            reader = WsReader(ws)
            reader.recv()
            reader.send({"type": "subscribe", "id": "s", "job_id": job_id, "after_seq": last_seen})
            ack = reader.recv()
            assert (ack["type"], ack["state"]) == ("ack", "done")
            second_part = reader.until_type("done")
    received = [m["job_seq"] for m in first_part + second_part if "job_seq" in m]
    assert received == sorted(set(received))  # in order, nothing doubled
    recorded = job.events_after(0)
    missing = {e.seq for e in recorded} - set(received)
    assert all(e.kind == "queued" for e in recorded if e.seq in missing)  # nothing lost (bar the
    # initial queue position, which `accepted` already carried)


def test_cancel_on_disconnect_when_asked(tmp_path):
    gate = StepGate(2)
    runtime = make_runtime(tmp_path, FakeRunner(on_step=gate))
    with TestClient(make_app(runtime)) as client:
        with connect(client) as ws:
            reader = WsReader(ws)
            reader.recv()
            reader.send({"type": "generate", "cancel_on_disconnect": True, "params": {"steps": 5}})
            job_id = reader.recv()["job_id"]
            assert gate.reached.wait(10)
        gate.release()
        job = runtime.engine.get_job(job_id)
        assert job.wait(10)
        assert job.state == JobState.CANCELLED and job.events_after(0)[-1].reason == "disconnect"


def test_failed_job_is_an_error_with_an_opaque_id(tmp_path):
    runner = FakeRunner(faults={("boom", 2): RuntimeError("secret internals"),
                                ("oom", 1): FakeOutOfMemoryError("CUDA out of memory")})
    runtime = make_runtime(tmp_path, runner)
    with TestClient(make_app(runtime)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "params": {"prompt": "boom", "steps": 3}})
        error = reader.until_type("error")[-1]
        assert error["code"] == "internal_error" and error["error_id"] in error["message"]
        assert "secret" not in error["message"] and "Traceback" not in error["message"]
        reader.send({"type": "generate", "params": {"prompt": "oom", "steps": 3}})
        assert reader.until_type("error")[-1]["code"] == "out_of_memory"
        reader.send({"type": "generate", "params": {"prompt": "fine", "steps": 2}})
        assert reader.until_type("done", "error")[-1]["type"] == "done"  # the worker survived


def test_rate_limit_per_connection(runtime):
    limits = ServerLimits(messages_per_s=0.01, message_burst=3)
    with TestClient(make_app(runtime, limits=limits)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        for i in range(5):
            reader.send({"type": "ping", "id": i})
        replies = [reader.recv() for _ in range(5)]
        assert [r["type"] for r in replies] == ["pong"] * 3 + ["error"] * 2
        assert replies[3]["code"] == "rate_limited" and replies[3]["retry_after_s"] > 0 and replies[3]["re"] == 3


def test_another_front_door_queues_behind_a_websocket_job(tmp_path):
    """Row 34: a job submitted directly to the engine (as the MCP door does) waits; steps never interleave."""
    gate = StepGate(2)
    runner = FakeRunner(on_step=gate)
    runtime = make_runtime(tmp_path, runner)
    with TestClient(make_app(runtime)) as client, connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "generate", "params": {"steps": 4}})
        ws_job = reader.recv()["job_id"]
        assert gate.reached.wait(10)
        mcp_job = runtime.engine.submit({"steps": 4}, owner="mcp-agent")
        assert mcp_job.state == JobState.QUEUED and runtime.engine.queue_position(mcp_job.job_id) == 1
        gate.release()
        reader.until_type("done")
        assert mcp_job.wait(10) and mcp_job.state == JobState.DONE
    order = [job for job, _ in runner.step_log]
    assert order == [ws_job] * 4 + [mcp_job.job_id] * 4
    assert runner.max_concurrent_seen == 1


def test_same_request_and_seed_give_identical_bytes(client):
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        for _ in range(2):
            reader.send({"type": "generate", "params": {"seed": 42, "steps": 2}})
            reader.until_type("done")
    finals = [p for kind, _, p in reader.frames if kind == FRAME_IMAGE]
    assert len(finals) == 2 and finals[0] == finals[1]


def test_protocol_schema_is_served(client):
    from hooocus_ws.protocol import CLIENT_MESSAGES, SERVER_MESSAGES, protocol_schema

    schema = client.get("/v1/protocol.json").json()
    assert schema == json.loads(json.dumps(protocol_schema()))
    for model in [*CLIENT_MESSAGES.values(), *SERVER_MESSAGES.values()]:
        assert model.__name__ in schema["$defs"]
    assert {"GenerationRequest", "FrameHeader"} <= set(schema["$defs"])
    assert len(schema["server_messages"]["oneOf"]) == len(SERVER_MESSAGES)


def test_protocol_doc_lists_every_message():
    from hooocus_ws.protocol import CLIENT_MESSAGES, SERVER_MESSAGES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    for name in [*CLIENT_MESSAGES, *SERVER_MESSAGES]:
        assert f"`{name}`" in doc, name


def test_client_vanishing_right_after_the_handshake_is_harmless(client, runtime):
    with connect(client) as ws:
        ws.close()
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        reader.send({"type": "ping", "id": 1})
        assert reader.recv()["type"] == "pong"


def test_websockets_per_principal_are_capped(runtime):
    """Issue 11.3: 16 stalled sockets following one job held 155 MB; a principal gets a bounded number."""
    with TestClient(make_app(runtime, limits=ServerLimits(max_ws_per_principal=2))) as client:
        first, _ = open_session(client, ALICE)
        second, _ = open_session(client, ALICE)
        refused = denial(client, headers=auth(ALICE))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        with connect(client, BOB) as ws:  # another principal is unaffected
            assert WsReader(ws).recv()["type"] == "hello"
        first.__exit__(None, None, None)
        third, _ = open_session(client, ALICE)  # a closed connection frees its slot
        for cm in (second, third):
            cm.__exit__(None, None, None)
        assert client.app.state.hooocus.ws_per_principal == {}
