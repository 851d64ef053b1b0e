"""``hooocus serve``: tokens (file, env, generated on loopback only), uvicorn settings, the parser."""

from __future__ import annotations

import argparse
import io

import pytest

from engine.core.errors import HooocusError
from engine.core.logging_setup import RedactFilter
from engine.core.settings import settings_from_args
from hooocus.cli import main, mcp_mount_factory
from hooocus_ws import cli
from hooocus_ws.protocol import upload_frame_cap
from tests.ws.conftest import ALICE, TOKENS_TEXT, make_runtime


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hooocus")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def prepare(args: argparse.Namespace, *, env: dict[str, str], **kwargs):
    settings, _ = settings_from_args(args, env=env)
    return cli.prepare_server(args, settings, **kwargs)


def test_register_adds_serve_with_every_flag():
    args = parse("--host", "0.0.0.0", "--port", "9000", "--model", "demo", "--tokens-file", "t.txt",
                 "--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example",
                 "--queue-size", "3", "--config", "h.toml")
    assert args.func is cli.run
    assert (args.host, args.port, args.model, str(args.tokens_file), args.queue_size) == \
        ("0.0.0.0", 9000, "demo", "t.txt", 3)
    assert args.allowed_origins == ["https://a.example", "https://b.example"]


def test_backend_ray_flags_reach_the_settings():
    settings, sources = settings_from_args(parse("--backend", "ray", "--ray-address", "ray://head:10001",
                                                 "--ray-min-replicas", "2", "--ray-max-replicas", "4",
                                                 "--ray-max-ongoing-requests", "2", "--ray-num-gpus-per-replica",
                                                 "0.5", "--no-ray-deploy"), env={})
    assert (settings.backend, settings.ray_address, settings.ray_min_replicas, settings.ray_max_replicas,
            settings.ray_max_ongoing_requests, settings.ray_deploy) == ("ray", "ray://head:10001", 2, 4, 2, False)
    assert settings.ray_num_gpus_per_replica == 0.5
    assert settings.ray_job_slots == 8 and sources["backend"] == "cli"
    default, _ = settings_from_args(parse(), env={})
    assert (default.backend, default.ray_deploy) == ("local", True)


def test_ray_replica_bounds_out_of_order_are_a_usage_error_naming_the_settings():
    with pytest.raises(HooocusError) as info:
        settings_from_args(parse("--backend", "ray", "--ray-min-replicas", "3", "--ray-max-replicas", "2"), env={})
    assert info.value.code == "invalid_request"
    assert "ray_min_replicas (3) is above ray_max_replicas (2)" in info.value.message


def test_output_limits_and_grace_reach_the_settings_and_the_history(tmp_path):
    args = parse("--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "imgs"), "--output-max-bytes", "5000",
                 "--output-max-age-days", "7.5", "--shutdown-grace-s", "3")
    prepared = prepare(args, env={}, out=io.StringIO(), runtime=make_runtime(tmp_path))
    history = prepared.history
    assert (history.output_dir, history.output_max_bytes, history.output_max_age_days) == (tmp_path / "imgs", 5000,
                                                                                            7.5)
    assert prepared.config.app.state.hooocus.shutdown_grace_s == 3.0
    assert prepared.config.timeout_graceful_shutdown == 8.0
    history.close()


def test_refuses_a_public_host_without_tokens(tmp_path):
    with pytest.raises(HooocusError) as info:
        prepare(parse("--host", "0.0.0.0", "--data-dir", str(tmp_path)), env={},
                           runtime=make_runtime(tmp_path))
    assert info.value.code == "unauthorized"
    assert main(["serve", "--host", "192.168.1.20", "--data-dir", str(tmp_path)]) == 2


def test_loopback_without_tokens_prints_one_fresh_token(tmp_path):
    out = io.StringIO()
    prepared = prepare(parse("--data-dir", str(tmp_path)), env={}, out=out, runtime=make_runtime(tmp_path))
    token = out.getvalue().split()[-1]
    gate = prepared.config.app.state.hooocus.gate
    assert len(gate.tokens) == 1 and gate.tokens.verify(token).scopes >= {"generate", "admin"}
    assert out.getvalue().count(token) == 1


def test_tokens_from_env_and_file(tmp_path):
    env = {"HOOOCUS_TOKENS": TOKENS_TEXT}
    prepared = prepare(parse("--host", "0.0.0.0", "--data-dir", str(tmp_path)), env=env,
                                  runtime=make_runtime(tmp_path))
    assert prepared.config.app.state.hooocus.gate.tokens.verify(ALICE).name == "alice"
    path = tmp_path / "tokens.txt"
    path.write_text("carol carol-token-0123456789 generate\n")
    out = io.StringIO()
    prepared = prepare(parse("--tokens-file", str(path), "--data-dir", str(tmp_path)), env=env, out=out,
                                  runtime=make_runtime(tmp_path))
    gate = prepared.config.app.state.hooocus.gate
    assert gate.tokens.verify("carol-token-0123456789").name == "carol" and gate.tokens.verify(ALICE) is None
    assert out.getvalue() == ""  # nothing generated, nothing printed


def test_uvicorn_settings(tmp_path):
    prepared = prepare(parse("--port", "0", "--data-dir", str(tmp_path)), env={}, out=io.StringIO(),
                                  runtime=make_runtime(tmp_path))
    config = prepared.config
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    assert issubclass(config.ws, WebSocketsSansIOProtocol) and config.ws_per_message_deflate is False
    # Text frames are capped at max_message_bytes by the session; the transport's frame cap is the
    # larger upload frame (an image in the server's binary frame layout).
    assert prepared.settings.max_message_bytes == 64 * 1024
    assert config.ws_max_size == upload_frame_cap(prepared.settings.max_upload_bytes) > 64 * 1024
    assert config.host == "127.0.0.1" and config.proxy_headers is False
    assert config.log_config is None  # uvicorn's records go through our root handler (masking)
    assert isinstance(prepared.server(), cli.HooocusServer)
    ctx = config.app.state.hooocus
    assert ctx.history is prepared.history and prepared.history.db_path == tmp_path / "history.sqlite3"
    assert ctx.shutdown_grace_s == prepared.settings.shutdown_grace_s
    prepared.history.close()
    assert cli.default_allowed_hosts(prepared.settings) == ("127.0.0.1", "localhost", "::1", "[::1]")
    import logging

    assert any(isinstance(f, RedactFilter) for f in logging.getLogger("uvicorn.error").filters)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                                ("example.org", False)])
def test_is_loopback(host, loopback):
    assert cli.is_loopback(host) is loopback


def test_a_hash_inside_a_token_is_a_start_up_error_naming_the_line(tmp_path, capsys):
    """Issue 11.8: ``carol abc#def0123456789xyz admin`` used to become token ``abc`` ... with default scopes."""
    path = tmp_path / "tokens.txt"
    path.write_text("# comment line\ncarol carol-token-0123456789 generate  # trailing comment is fine\n"
                    "dave dave-tok#en-0123456789 admin\n")
    assert main(["serve", "--tokens-file", str(path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "'#'" in err
    path.write_text("# comment line\ncarol carol-token-0123456789 generate,cancel:own  # trailing comment\n")
    from engine.core.access import TokenStore

    store = TokenStore.from_file(path)
    assert store.verify("carol-token-0123456789").scopes == frozenset({"generate", "cancel:own"})


def test_a_public_bind_answers_only_to_allowed_hosts_on_http_websocket_and_mcp(tmp_path):
    """Issue 11.6: bound to a non-loopback address with no allowlist, a ``Host: evil.example`` upgrade
    passed (the Origin check compares against the request's own Host)."""
    from starlette.testclient import TestClient, WebSocketDenialResponse

    env = {"HOOOCUS_TOKENS": TOKENS_TEXT}
    args = parse("--host", "0.0.0.0", "--data-dir", str(tmp_path), "--public-url", "https://gpu.example.org")
    # /mcp as the product CLI mounts it (hooocus_ws itself never imports the MCP door).
    prepared = prepare(args, env=env, runtime=make_runtime(tmp_path), with_history=False,
                       mcp_mount_factory=mcp_mount_factory())
    assert "gpu.example.org" in cli.default_allowed_hosts(prepared.settings)
    bearer = {"Authorization": f"Bearer {ALICE}"}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "t", "version": "0"}}}
    mcp_headers = {**bearer, "accept": "application/json, text/event-stream"}
    evil, good = {"host": "evil.example"}, {"host": "gpu.example.org"}
    with TestClient(prepared.config.app) as client:
        assert client.get("/v1/options", headers={**bearer, **evil}).status_code == 403
        with pytest.raises(WebSocketDenialResponse) as info:
            with client.websocket_connect("/v1/ws", headers={**bearer, **evil, "origin": "http://evil.example"}):
                pass
        assert info.value.status_code == 403
        assert client.post("/mcp", headers={**mcp_headers, **evil}, json=initialize).status_code == 403
        assert client.get("/v1/options", headers={**bearer, **good}).status_code == 200
        with client.websocket_connect("/v1/ws", headers={**bearer, **good, "origin": "https://gpu.example.org"}) as ws:
            assert ws.receive_json()["type"] == "hello"
        # Remote MCP clients work when their Host is allowed.
        assert client.post("/mcp", headers={**mcp_headers, **good}, json=initialize).status_code == 200


def test_python_m_hooocus_ws_is_the_serve_command_with_its_exit_codes(tmp_path):
    """The launcher hands its argv to hooocus.cli.main: same refusal, one line, exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "hooocus_ws", "serve", "--host", "192.168.1.20", "--data-dir",
                             str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=120,
                            env={"PATH": "", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "refusing to serve on 192.168.1.20 without tokens" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr and result.stdout == ""
