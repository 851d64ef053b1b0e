"""Structured logs: job_id/principal on every record, tokens never written, prompts only at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from engine.core.errors import InvalidRequest
from engine.core.logging_setup import (
    MASK,
    RedactFilter,
    configure_logging,
    install_uvicorn_redaction,
    log_context,
    mask_secrets,
    parse_level,
)

TOKEN = "hq_Zx8-Secret_Token.value~42"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn_filters = {name: list(logging.getLogger(name).filters)
                       for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, filters in uvicorn_filters.items():
        logging.getLogger(name).filters[:] = filters


def capture(level: str = "info", *, as_json: bool = False) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, json=as_json, stream=stream)
    return stream


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {TOKEN}",
    f"authorization: bearer {TOKEN}",
    f"Sec-WebSocket-Protocol: hooocus.v1, hooocus.token.{TOKEN}",
    f"GET /v1/ws?token={TOKEN}&x=1 HTTP/1.1",
    f"GET /v1/images/abc?exp=1&sig={TOKEN}",
    f"{{'access_token': '{TOKEN}'}}",
    f'{{"token": "{TOKEN}", "step": 3}}',
    f"Settings(tokens='alice {TOKEN} generate')",
    f"api_key={TOKEN}",
])
def test_mask_secrets_removes_every_known_token_shape(text: str) -> None:
    masked = mask_secrets(text)
    assert TOKEN not in masked and "***" in masked


#: Every query name the websocket door's own redaction masked before issue 13 merged it into
#: RedactFilter (hooocus_ws.auth._REDACT_RE: token|access_token|auth|bearer|api_key|apikey|key|sig),
#: plus the names only logging_setup knew. A name dropped from the merged list fails here.
OLD_WS_QUERY_NAMES = ("token", "access_token", "auth", "bearer", "api_key", "apikey", "key", "sig")
OLD_LOGGING_QUERY_NAMES = ("tokens", "signature", "password", "passwd", "secret", "signing_key", "authorization",
                           "url_signing_key")


@pytest.mark.parametrize("name", OLD_WS_QUERY_NAMES + OLD_LOGGING_QUERY_NAMES)
def test_every_credential_name_of_both_old_filters_is_masked(name: str) -> None:
    for text in (f"GET /v1/ws?{name}={TOKEN}&x=1 HTTP/1.1", f"GET /v1/ws?x=1&{name.upper()}={TOKEN}"):
        masked = mask_secrets(text)
        assert TOKEN not in masked and f"={MASK}" in masked, masked
    assert mask_secrets(f"/v1/ws?{name}={TOKEN}&x=1").endswith("&x=1")  # the rest of the query is kept


def test_uvicorn_access_line_is_masked_argument_by_argument(restore_root: None) -> None:
    """uvicorn's access formatter unpacks ``record.args`` itself, so the filter on its loggers
    masks each argument and keeps the tuple (the websocket door used its own filter for this)."""
    install_uvicorn_redaction()
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" %d',
                               ("127.0.0.1:5", f"/v1/ws?token={TOKEN}&x=1", 401), None)
    for f in logging.getLogger("uvicorn.error").filters:
        f.filter(record)
    assert isinstance(record.args, tuple) and record.args[2] == 401
    assert TOKEN not in record.getMessage() and "token=***&x=1" in record.getMessage()


def test_mask_secrets_leaves_ordinary_text_alone() -> None:
    text = "job j_1 step 3/30 seed=42 width=1024 prompt tokens: 77"
    assert mask_secrets(text) == text


def test_text_records_carry_job_and_principal_and_never_a_token(restore_root: None) -> None:
    stream = capture()
    log = logging.getLogger("hooocus.test")
    log.info("auth header %s", f"Bearer {TOKEN}", extra={"job_id": "j_extra"})
    with log_context(job_id="j_ctx", principal="alice"):
        log.warning("handshake from %s", f"hooocus.token.{TOKEN}")
        log.info("explicit wins", extra={"job_id": "j_explicit"})
    log.error("after the block")
    try:
        raise RuntimeError(f"request failed: ?token={TOKEN}")
    except RuntimeError:
        log.exception("boom", extra={"principal": "bob"})
    out = stream.getvalue()
    assert TOKEN not in out
    lines = out.splitlines()
    assert "[job_id=j_extra]" in lines[0] and "Bearer ***" in lines[0]
    assert "[job_id=j_ctx principal=alice]" in lines[1]
    assert "[job_id=j_explicit principal=alice]" in lines[2]
    assert "after the block" in lines[3] and "[" not in lines[3].split("hooocus.test")[1]
    assert "[principal=bob]" in out and "RuntimeError: request failed: ?token=***" in out


def test_json_records_are_one_object_per_line(restore_root: None) -> None:
    stream = capture("debug", as_json=True)
    log = logging.getLogger("hooocus.test")
    with log_context(principal="carol"):
        log.info("queued %s", "job", extra={"job_id": "j_9", "queue_depth": 2, "api_key": TOKEN})
    record = json.loads(stream.getvalue().splitlines()[0])
    assert record["message"] == "queued job" and record["level"] == "info" and record["logger"] == "hooocus.test"
    assert record["job_id"] == "j_9" and record["principal"] == "carol" and record["queue_depth"] == 2
    assert record["api_key"] == "***" and TOKEN not in stream.getvalue()


def test_prompts_only_at_debug(restore_root: None) -> None:
    stream = capture("debug", as_json=True)
    log = logging.getLogger("hooocus.test")
    log.debug("resolved", extra={"job_id": "j_1", "prompt": "a red fox", "negative_prompt": "blurry"})
    log.info("started", extra={"job_id": "j_1", "prompt": "a red fox", "negative_prompt": "blurry"})
    debug, info = (json.loads(line) for line in stream.getvalue().splitlines())
    assert debug["prompt"] == "a red fox" and debug["negative_prompt"] == "blurry"
    assert "a red fox" not in json.dumps(info) and "blurry" not in json.dumps(info)
    assert "9 chars" in info["prompt"]


def test_level_is_applied_and_reconfiguring_replaces_our_handler(restore_root: None) -> None:
    first = capture("warning")
    logging.getLogger("hooocus.test").info("hidden")
    assert first.getvalue() == ""
    second = capture("info")
    logging.getLogger("hooocus.test").info("shown")
    assert first.getvalue() == "" and "shown" in second.getvalue()
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_hooocus", False)]
    assert len(ours) == 1


def test_context_does_not_leak_between_threads(restore_root: None) -> None:
    stream = capture()
    log = logging.getLogger("hooocus.test")
    with log_context(job_id="j_main"):
        worker = threading.Thread(target=lambda: log.info("from worker"))
        worker.start()
        worker.join()
    assert "job_id" not in stream.getvalue()


def test_uvicorn_access_records_keep_their_arguments(restore_root: None) -> None:
    # uvicorn's access formatter unpacks record.args itself; masking must keep the tuple shape.
    capture()
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/v1/ws?token={TOKEN}", "1.1", 401), None)
    access = logging.getLogger("uvicorn.access")
    assert any(isinstance(f, RedactFilter) for f in access.filters)
    for f in access.filters:
        f.filter(record)
    assert isinstance(record.args, tuple) and len(record.args) == 5 and record.args[4] == 401
    assert TOKEN not in record.getMessage()


def test_parse_level() -> None:
    assert parse_level("debug") == logging.DEBUG and parse_level("INFO") == logging.INFO
    assert parse_level(logging.ERROR) == logging.ERROR
    with pytest.raises(InvalidRequest):
        parse_level("loud")
