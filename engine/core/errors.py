"""Errors with stable codes.

Every failure that can reach a client is a :class:`HooocusError` with a ``code`` from the table
below. Front doors map codes to their own wire format (websocket ``error`` message, HTTP status,
MCP tool error) in one place each; a traceback never leaves the process.
"""

from __future__ import annotations

from typing import Any

#: code -> HTTP status a front door should use. The one table every front door reads.
HTTP_STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 422,
    "invalid_image": 422,
    "image_too_large": 413,
    "unknown_model": 422,
    "unknown_style": 422,
    "unknown_lora": 422,
    "unknown_preset": 422,
    "unsupported_for_model": 422,
    "model_invalid": 422,
    "unsafe_file": 422,
    "assets_missing": 409,
    "queue_full": 429,
    "rate_limited": 429,
    "not_found": 404,
    "unauthorized": 401,
    "forbidden": 403,
    "cancelled": 409,
    "conflict": 409,
    "out_of_memory": 503,
    "model_missing": 409,
    "unsupported": 422,
    "shutting_down": 503,
    "worker_lost": 503,
    "internal_error": 500,
}


#: Process exit codes of every command (``hooocus ...``, ``python -m hooocus_ws|hooocus_mcp``).
EXIT_OK = 0
#: The work was attempted and failed (a job failed, a download broke, a server went away).
EXIT_FAILED = 1
#: The command line, a config file or a request was wrong; nothing was attempted.
EXIT_USAGE = 2
#: Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
#: Error codes that mean "fix your input" (exit code 2) rather than "it failed" (exit code 1).
#: A refusal from a server (``unauthorized``, ``queue_full`` ...) is a failure: exit code 1.
USAGE_ERROR_CODES = frozenset({"invalid_request", "invalid_image", "image_too_large", "unknown_model", "unknown_style", "unknown_lora", "unknown_preset",
                               "unsafe_file", "model_invalid", "unsupported_for_model", "unsupported"})


def exit_code_for(error: HooocusError) -> int:
    """The process exit code for an error that ended a command."""
    return EXIT_USAGE if isinstance(error, UsageError) or error.code in USAGE_ERROR_CODES else EXIT_FAILED


class HooocusError(Exception):
    """Base error. ``code`` is stable and machine-readable; ``message`` is for humans."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, loc: tuple[str | int, ...] | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.loc = loc
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.loc is not None:
            out["loc"] = list(self.loc)
        if self.details is not None:
            out["details"] = self.details
        return out


class InvalidRequest(HooocusError):
    code = "invalid_request"


class InvalidImage(HooocusError):
    """An input image that cannot be used: not an image, damaged or truncated, bad base64."""

    code = "invalid_image"


class ImageTooLarge(HooocusError):
    """An input image over the byte cap (``max_upload_bytes``) or the decoded-pixel cap
    (``max_input_pixels``), refused before it is decoded."""

    code = "image_too_large"


class UsageError(InvalidRequest):
    """A wrong command line or start-up configuration (flags that exclude each other, a missing
    token, no tokens on a public address): printed as the message alone, one line, exit code 2.
    Any entry point may raise it (``code`` may be more specific); the product CLI prints it."""


class UnknownModel(HooocusError):
    code = "unknown_model"


class UnknownStyle(HooocusError):
    code = "unknown_style"


class UnknownLora(HooocusError):
    code = "unknown_lora"


class UnknownPreset(HooocusError):
    code = "unknown_preset"


class UnsupportedForModel(HooocusError):
    """A request field the chosen model's family does not have (e.g. sharpness on FLUX.1), set to a
    value other than its default; ``loc`` names the field. Refused at submit, nothing is queued."""

    code = "unsupported_for_model"


class ModelInvalid(HooocusError):
    """A weight file exists but cannot be used (corrupt, wrong architecture)."""

    code = "model_invalid"


class ModelMissing(HooocusError):
    """A weight file set-up should have installed is not there; the message names the file and the
    ``hooocus setup --only ...`` command that installs it."""

    code = "model_missing"


class Unsupported(HooocusError):
    """A valid request for something this server cannot do yet; nothing is queued."""

    code = "unsupported"


class OutOfMemory(HooocusError):
    """The device ran out of memory even after the fallbacks (smaller tiles, tiled decode)."""

    code = "out_of_memory"


class UnsafeFile(HooocusError):
    """A pickle-format weight file (or a pickle renamed .safetensors). Never unpickled."""

    code = "unsafe_file"


class AssetsMissing(HooocusError):
    code = "assets_missing"


class QueueFull(HooocusError):
    code = "queue_full"


class NotFound(HooocusError):
    code = "not_found"


class Forbidden(HooocusError):
    """The token is valid but lacks the scope this action needs."""

    code = "forbidden"


class ShuttingDown(HooocusError):
    code = "shutting_down"


class WorkerLost(HooocusError):
    """The remote worker running the job went away (a Ray replica died, its node was lost, or it
    went silent); the job failed, the queue goes on and the same request may be submitted again."""

    code = "worker_lost"


class JobCancelled(HooocusError):
    """Raised inside the worker (from a step callback) to stop the running job at once."""

    code = "cancelled"

    def __init__(self, reason: str = "user") -> None:
        super().__init__(f"job cancelled ({reason})")
        self.reason = reason


def pydantic_error_to_hooocus(exc: Any) -> InvalidRequest:
    """Turn a pydantic ``ValidationError`` into one ``InvalidRequest`` with the first field path.

    The message lists every problem so a caller (or an LLM) can fix them all at once.
    """
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    first_loc = tuple(errors[0].get("loc", ())) if errors else None
    details = [{"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")} for e in errors]
    return InvalidRequest("; ".join(parts) or "invalid request", loc=first_loc, details=details)
