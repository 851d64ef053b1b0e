"""Logging for entry points: one handler on the root logger, structured context, secrets masked.

Only entry points (``hooocus serve``, ``hooocus generate``, ``hooocus mcp``) call
:func:`configure_logging`; library code never configures logging. The rules for every module:

- Log through ``logging.getLogger("hooocus.<area>")``.
- Give the job and the caller: ``log.info("...", extra={"job_id": job.job_id, "principal": name})``,
  or wrap a block in ``with log_context(job_id=..., principal=...):`` (a contextvar, so it follows
  asyncio tasks). Records without them show ``-``.
- Never log a token, key or signature. :class:`RedactFilter` masks the shapes we know
  (``Bearer X``, the ``hooocus.token.X`` subprotocol, ``token=X`` / ``sig=X`` / ``key=X`` ...
  query values, ``"token": "X"`` in dict/JSON text) as a safety net, not as permission. It is the
  one redaction filter of the project: :func:`configure_logging` puts it on the root handler and
  :func:`install_uvicorn_redaction` on uvicorn's loggers.
- Prompts only at DEBUG. Pass them as ``extra={"prompt": ..., "negative_prompt": ...}``, never
  inside the message text; at INFO and above :class:`RedactFilter` replaces them with their length.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json as jsonlib
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from engine.core.errors import InvalidRequest

_JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("hooocus_log_job_id", default=None)
_PRINCIPAL: contextvars.ContextVar[str | None] = contextvars.ContextVar("hooocus_log_principal", default=None)

MASK = "***"
#: ``extra=`` fields that may carry user prompts: shown only on DEBUG records.
PROMPT_FIELDS = ("prompt", "negative_prompt")

#: Names whose value is a credential. One list for every log line (it also covers the query
#: names the websocket door refuses as tokens: token, access_token, auth, bearer, api_key, apikey, key).
_SECRET_KEY = (r"(?:\w+_)?(?:tokens?|api_?key|apikey|key|sig|signature|password|passwd|secret|signing_key"
               r"|authorization|auth|bearer)")
_SECRET_NAME_RE = re.compile(rf"(?i)^{_SECRET_KEY}$")
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer <token> / Basic <credentials>
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+"), rf"\1\2{MASK}"),
    # the browser subprotocol carrying a token (hooocus_ws.protocol.TOKEN_SUBPROTOCOL_PREFIX)
    (re.compile(r"(hooocus\.(?:token|bearer)\.)[^\s,;'\"\]\)]+"), rf"\1{MASK}"),
    # 'token': 'x', "api_key": "x", tokens='x' (dict reprs, JSON, pydantic reprs)
    (re.compile(rf"(?i)(['\"]?\b{_SECRET_KEY}['\"]?\s*[=:]\s*)(['\"])(?:(?!\2).)*\2"), rf"\1\2{MASK}\2"),
    # token=x in query strings and key=value text
    (re.compile(rf"(?i)(\b{_SECRET_KEY}=)(?!['\"])[^&\s,;'\"\)\]}}]+"), rf"\1{MASK}"),
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "job_id", "principal", "context"}


def mask_secrets(text: str) -> str:
    """``text`` with every credential-looking value replaced by ``***``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _mask_arg(value: Any) -> Any:
    # A non-string argument is replaced by its masked text only when that text held a secret,
    # so numbers keep working with %d.
    text = value if isinstance(value, str) else str(value)
    masked = mask_secrets(text)
    return value if masked == text else masked


@contextlib.contextmanager
def log_context(*, job_id: str | None = None, principal: str | None = None) -> Iterator[None]:
    """Tag every record logged inside the block (this thread / asyncio task) with these values."""
    job_token = _JOB_ID.set(job_id) if job_id is not None else None
    principal_token = _PRINCIPAL.set(principal) if principal is not None else None
    try:
        yield
    finally:
        if principal_token is not None:
            _PRINCIPAL.reset(principal_token)
        if job_token is not None:
            _JOB_ID.reset(job_token)


class ContextFilter(logging.Filter):
    """Give every record ``job_id`` and ``principal`` (from ``extra=``, else the context, else None)
    and a ready-made ``context`` string for text formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None) or _JOB_ID.get()
        principal = getattr(record, "principal", None) or _PRINCIPAL.get()
        record.job_id = job_id
        record.principal = principal
        parts = [f"job_id={job_id}" if job_id else "", f"principal={principal}" if principal else ""]
        record.context = " ".join(p for p in parts if p)
        return True


class RedactFilter(logging.Filter):
    """Mask secrets in the message, its arguments, the traceback and string extras; hide prompt
    extras above DEBUG. The record is rewritten in place, so every handler sees the masked form."""

    def __init__(self, *, merge_args: bool = True) -> None:
        super().__init__()
        #: True: format the message, then mask the result (catches a secret split over template and
        #: arguments). False: mask each argument, keep ``record.args`` (for loggers whose formatter
        #: unpacks the arguments itself, like uvicorn's access log).
        self.merge_args = merge_args

    def filter(self, record: logging.LogRecord) -> bool:
        if self.merge_args:
            try:
                message = record.getMessage()
            except Exception:  # a broken format string must not lose the record
                message = f"{record.msg!r} % {record.args!r}"
            record.msg, record.args = mask_secrets(message), None
        elif record.args:
            if isinstance(record.args, tuple):
                record.args = tuple(_mask_arg(a) for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: _mask_arg(v) for k, v in record.args.items()}
        elif isinstance(record.msg, str):
            record.msg = mask_secrets(record.msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        for name, value in list(vars(record).items()):
            if name in _STANDARD_ATTRS:
                continue
            if _SECRET_NAME_RE.match(name) and value:
                setattr(record, name, MASK)
            elif name in PROMPT_FIELDS and record.levelno > logging.DEBUG and value is not None:
                setattr(record, name, f"<{len(str(value))} chars, shown at DEBUG only>")
            elif isinstance(value, str):
                setattr(record, name, mask_secrets(value))
        return True


class TextFormatter(logging.Formatter):
    """``2024-05-06 12:00:00,123 INFO hooocus.jobs [job_id=j_1 principal=alice]: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context_suffix)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = getattr(record, "context", "")
        record.context_suffix = f" [{context}]" if context else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, principal, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "principal": getattr(record, "principal", None),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name != "context_suffix":
                out[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return jsonlib.dumps(out, default=str, ensure_ascii=False)


def parse_level(level: str | int) -> int:
    """``"info"``/``"DEBUG"``/``20`` -> a logging level number; InvalidRequest for anything else."""
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.strip().upper())
    if not isinstance(number, int):
        raise InvalidRequest(f"unknown log level {level!r}; use debug, info, warning or error", loc=("log_level",))
    return number


def configure_logging(level: str | int, *, json: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Send every record to ``stream`` (default stderr) as text or JSON lines, with context and
    masking. Replaces a handler an earlier call installed; returns the new one."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_hooocus", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._hooocus = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    install_uvicorn_redaction()
    return handler


def install_uvicorn_redaction() -> None:
    """Mask secrets on uvicorn's own loggers: it logs request paths with their query strings, and
    its handlers (when it configures logging itself) do not pass through ours. Idempotent."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactFilter) for f in logger.filters):
            # Per argument: uvicorn's access formatter unpacks ``record.args`` itself.
            logger.addFilter(RedactFilter(merge_args=False))
