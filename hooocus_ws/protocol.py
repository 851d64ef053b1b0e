"""The ``hooocus.v1`` websocket protocol: client messages, server messages, binary frames, JSON Schema.

Text frames carry one JSON object each, with a ``type``. Binary frames carry images only, in one
self-describing layout (api_anchors §10.4, simplified as in issue 4):

    byte 0     protocol version (1)
    byte 1     kind (1 = preview, 2 = final image)
    bytes 2-5  big-endian u32 N
    N bytes    UTF-8 JSON header {job_id, job_seq, index, step?, seed?, mime, width, height, sha256?}
    rest       the encoded image

Client messages are validated here, once (house style A9.3 #4): ``extra="forbid"``, so a typo is an
``invalid_message`` error with a field path, never a silent default. Server messages are plain dicts
built by the session; the pydantic models below describe them for the published JSON Schema and
for the tests, which check every message the server sends against them.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.core.errors import HooocusError
from engine.core.request import GenerationRequest

PROTOCOL = "hooocus.v1"
PROTOCOL_VERSION = 1
#: Browsers cannot set headers on ``new WebSocket``; they offer ``[PROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token]``.
TOKEN_SUBPROTOCOL_PREFIX = "hooocus.token."

FRAME_PREVIEW = 1
FRAME_IMAGE = 2
#: Client → server: an image upload (header :class:`UploadFrameHeader`, payload = the file's bytes).
FRAME_UPLOAD = 3
_FRAME_HEAD = struct.Struct(">BBI")
MAX_FRAME_HEADER_BYTES = 64 * 1024

ClientId = Annotated[str, Field(min_length=1, max_length=128)] | int
JobId = Annotated[str, Field(min_length=1, max_length=64)]


class ProtocolError(HooocusError):
    """A message that is not valid ``hooocus.v1`` (bad JSON, unknown type, wrong fields)."""

    code = "invalid_message"


# -- client -> server ------------------------------------------------------------------------------

_CLIENT = ConfigDict(extra="forbid", frozen=True)


class _ClientMessage(BaseModel):
    """The fields every client message has. Each message narrows ``type`` to its own literal; an
    overridden field keeps its place, so the published schema lists ``type`` and ``id`` first."""

    model_config = _CLIENT
    type: str
    id: ClientId | None = None


class GenerateMessage(_ClientMessage):
    """Queue a job. ``params`` is a GenerationRequest, validated separately so its errors carry
    ``loc`` = ["params", field, ...] and code ``invalid_request``."""

    type: Literal["generate"]
    params: dict[str, Any]
    #: Idempotency key: a retry with the same key (same principal, within the retention time)
    #: returns the first job instead of queuing another.
    request_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    #: Cancel the job if this connection closes before it ends (default: the job goes on).
    cancel_on_disconnect: bool = False


class CancelMessage(_ClientMessage):
    type: Literal["cancel"]
    job_id: JobId


class InterruptMessage(_ClientMessage):
    """Stop running jobs (admin scope): ``job_id`` if it is running, else every running job (one
    per device when the server runs several workers)."""

    type: Literal["interrupt"]
    job_id: JobId | None = None


class SubscribeMessage(_ClientMessage):
    """Attach to a job (after a reconnect): replay its events with ``job_seq > after_seq``, then follow it."""

    type: Literal["subscribe"]
    job_id: JobId
    after_seq: Annotated[int, Field(ge=0)] = 0


class UnsubscribeMessage(_ClientMessage):
    type: Literal["unsubscribe"]
    job_id: JobId


class PreviewSettings(BaseModel):
    """Per-connection preview policy. A slow connection only ever gets the newest preview."""

    model_config = _CLIENT
    enabled: bool = True
    max_side: Annotated[int, Field(ge=16, le=1024)] = 256
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: Annotated[int, Field(ge=1, le=100)] = 75
    min_interval_ms: Annotated[int, Field(ge=0, le=60_000)] = 100


class SetPreviewMessage(_ClientMessage):
    """Change this connection's preview settings; fields left out keep their value."""

    type: Literal["set_preview"]
    enabled: bool | None = None
    max_side: Annotated[int, Field(ge=16, le=1024)] | None = None
    format: Literal["jpeg", "webp"] | None = None
    quality: Annotated[int, Field(ge=1, le=100)] | None = None
    min_interval_ms: Annotated[int, Field(ge=0, le=60_000)] | None = None


class PingMessage(_ClientMessage):
    type: Literal["ping"]


class UploadMessage(_ClientMessage):
    """Upload an input image as base64 in a text frame (small images: the text frame cap,
    ``hello.limits.max_message_bytes``, applies). Larger ones go in a binary upload frame (kind 3).
    Answered with ``uploaded``; use ``"sha256:<sha256>"`` as ``input_image``/``inpaint_mask``."""

    type: Literal["upload"]
    data: Annotated[str, Field(min_length=1, description="the image file, base64")]


class DescribeMessage(_ClientMessage):
    """Describe an image (image → prompt, Fooocus's Describe). Answered at once with ``ack``
    (``job_id`` = the describe's id ``d_...``, which ``cancel`` takes), then ``describe_result`` or
    ``error`` with the same ``re``. ``image``: ``sha256:<hex>`` (an upload or one of your images) or a
    ``data:image/...;base64,`` URI."""

    type: Literal["describe"]
    image: Annotated[str, Field(min_length=1)]
    mode: Literal["photo", "anime", "both"] = "photo"


ClientMessage = (GenerateMessage | CancelMessage | InterruptMessage | SubscribeMessage | UnsubscribeMessage
                 | SetPreviewMessage | PingMessage | UploadMessage | DescribeMessage)
CLIENT_MESSAGES: dict[str, type[BaseModel]] = {
    "generate": GenerateMessage, "cancel": CancelMessage, "interrupt": InterruptMessage, "upload": UploadMessage,
    "subscribe": SubscribeMessage, "unsubscribe": UnsubscribeMessage, "set_preview": SetPreviewMessage,
    "ping": PingMessage, "describe": DescribeMessage,
}


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one text frame. Raises :class:`ProtocolError` (code ``invalid_json`` or ``invalid_message``)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object with a 'type'", loc=())
    kind = data.get("type")
    model = CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(f"unknown message type {kind!r}; known: {', '.join(CLIENT_MESSAGES)}", loc=("type",))
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        text_parts = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors]
        raise ProtocolError("; ".join(text_parts), loc=tuple(errors[0]["loc"]) if errors else None) from None


def message_id(text: str) -> str | int | None:
    """Best-effort ``id`` of a message that failed validation, so the error can still carry ``re``."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= 128:
        return value
    return None


# -- binary frames -----------------------------------------------------------------------------------


def encode_frame(kind: int, header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _FRAME_HEAD.pack(PROTOCOL_VERSION, kind, len(head)) + head + payload


def upload_frame_cap(max_upload_bytes: int) -> int:
    """The largest client binary frame: an upload of ``max_upload_bytes`` plus head and header."""
    return _FRAME_HEAD.size + MAX_FRAME_HEADER_BYTES + max_upload_bytes


def decode_frame(frame: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(kind, header, payload). Raises :class:`ProtocolError` for anything that is not a v1 frame."""
    if len(frame) < _FRAME_HEAD.size:
        raise ProtocolError("binary frame shorter than its 6-byte head")
    version, kind, header_len = _FRAME_HEAD.unpack_from(frame)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported binary frame version {version}")
    if kind not in (FRAME_PREVIEW, FRAME_IMAGE, FRAME_UPLOAD):
        raise ProtocolError(f"unknown binary frame kind {kind}")
    end = _FRAME_HEAD.size + header_len
    if header_len > MAX_FRAME_HEADER_BYTES or end > len(frame):
        raise ProtocolError("binary frame header length out of range")
    try:
        header = json.loads(frame[_FRAME_HEAD.size:end].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("binary frame header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("binary frame header is not a JSON object")
    return kind, header, frame[end:]


# -- server -> client (schema only; the session builds plain dicts) ----------------------------------

_SERVER = ConfigDict(extra="forbid")
ServerSeq = Annotated[int, Field(ge=1, description="per-connection, 1, 2, 3, ...")]
JobSeq = Annotated[int, Field(ge=1, description="the job's own event number; give it to subscribe.after_seq")]
Re = Annotated[str | int | None, Field(description="the id of the client message this answers")]


class _ServerMessage(BaseModel):
    """The fields every server message has; each narrows ``type`` to its own literal (an overridden
    field keeps its place, so the published schema lists ``type`` and ``seq`` first)."""

    model_config = _SERVER
    type: str
    seq: ServerSeq


class _JobEventOut(_ServerMessage):
    """A job's event, as the engine recorded it: the job and its own event number."""

    job_id: str
    job_seq: JobSeq


class Limits(BaseModel):
    model_config = _SERVER
    max_message_bytes: int
    max_queue: int
    max_queued_per_principal: int | None
    messages_per_s: float
    event_retention_s: float


class HelloOut(_ServerMessage):
    type: Literal["hello"]
    protocol: Literal["hooocus.v1"]
    principal: str
    scopes: list[str]
    limits: Limits
    preview: PreviewSettings


class AcceptedOut(_ServerMessage):
    type: Literal["accepted"]
    re: Re = None
    job_id: str
    position: Annotated[int, Field(ge=0, description="0 = running next")]
    duplicate: bool = False


class QueueOut(_JobEventOut):
    type: Literal["queue"]
    position: int


class StartedOut(_JobEventOut):
    type: Literal["started"]
    params: dict[str, Any]
    seeds: list[str]
    total_steps: int


class ProgressOut(_JobEventOut):
    type: Literal["progress"]
    step: int
    total_steps: int
    stage: str
    image_index: int
    image_count: int


class ImageOut(_JobEventOut):
    """Followed at once by a binary frame of kind 2 with the image bytes."""

    type: Literal["image"]
    index: int
    seed: str
    sha256: str
    width: int
    height: int
    mime: str
    size_bytes: int
    url: str


class DoneOut(_JobEventOut):
    type: Literal["done"]
    images_done: int


class CancelledOut(_JobEventOut):
    type: Literal["cancelled"]
    images_done: int
    reason: str


class ErrorOut(_ServerMessage):
    """A request that failed (with ``re``) or a job that failed (with ``job_id``, terminal)."""

    type: Literal["error"]
    re: Re = None
    job_id: str | None = None
    job_seq: int | None = None
    code: str
    message: str
    loc: list[str | int] | None = None
    details: Any = None
    error_id: str | None = None
    retry_after_s: float | None = None
    images_done: int | None = None


class WarningOut(_JobEventOut):
    type: Literal["warning"]
    code: str
    message: str


class AckOut(_ServerMessage):
    """Reply to cancel / interrupt / subscribe / unsubscribe / set_preview. ``state`` is the job's
    state when the request arrived."""

    type: Literal["ack"]
    re: Re = None
    job_id: str | None = None
    state: str | None = None
    #: interrupt only: every job it stopped (``job_id`` is the first of them).
    job_ids: list[str] | None = None


class PongOut(_ServerMessage):
    type: Literal["pong"]
    re: Re = None


class UploadedOut(_ServerMessage):
    """Answer to an ``upload`` message or a binary upload frame: the image is kept for this
    token's principal (no one else can use it) by content hash."""

    type: Literal["uploaded"]
    re: Re = None
    sha256: str
    width: int
    height: int
    content_type: str
    size_bytes: int


class DescribeResultOut(_ServerMessage):
    """The answer to ``describe``: the prompt and styles as Fooocus's Describe sets them."""

    type: Literal["describe_result"]
    re: Re = None
    describe_id: str
    prompt: str
    styles: list[str]
    mode: str
    elapsed_s: float


class UploadFrameHeader(BaseModel):
    """The JSON header of a client binary upload frame (kind 3); ``id`` comes back as ``re``."""

    model_config = _CLIENT
    id: ClientId | None = None


class FrameHeader(BaseModel):
    """The JSON header of a binary frame."""

    model_config = _SERVER
    job_id: str
    job_seq: int
    index: int
    step: int | None = None
    seed: str | None = None
    mime: str
    width: int
    height: int
    sha256: str | None = None


SERVER_MESSAGES: dict[str, type[BaseModel]] = {
    "hello": HelloOut, "accepted": AcceptedOut, "queue": QueueOut, "started": StartedOut,
    "progress": ProgressOut, "image": ImageOut, "done": DoneOut, "cancelled": CancelledOut,
    "error": ErrorOut, "warning": WarningOut, "ack": AckOut, "pong": PongOut, "uploaded": UploadedOut,
    "describe_result": DescribeResultOut,
}


def validate_server_message(message: dict[str, Any]) -> BaseModel:
    """Check one server message against the published schema (used by the tests)."""
    return SERVER_MESSAGES[message["type"]].model_validate(message)


def protocol_schema() -> dict[str, Any]:
    """The JSON Schema document served at ``GET /v1/protocol.json``."""
    defs: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
        return {"$ref": f"#/$defs/{model.__name__}"}

    client = {name: ref(model) for name, model in CLIENT_MESSAGES.items()}
    server = {name: ref(model) for name, model in SERVER_MESSAGES.items()}
    ref(GenerationRequest)
    ref(FrameHeader)
    ref(UploadFrameHeader)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "hooocus.v1",
        "title": "hooocus.v1 websocket protocol",
        "description": "Text frames: one JSON object with 'type'. Binary frames: [u8 version=1][u8 kind 1=preview "
                       "2=image 3=upload (client to server)][u32 BE N][N bytes UTF-8 JSON FrameHeader, or "
                       "UploadFrameHeader for kind 3][image bytes]. generate.params is a GenerationRequest. "
                       "See docs/protocol.md.",
        "client_messages": {"oneOf": list(client.values()), "discriminator": {"propertyName": "type"}},
        "server_messages": {"oneOf": list(server.values()), "discriminator": {"propertyName": "type"}},
        "binary_frame_header": {"$ref": "#/$defs/FrameHeader"},
        "generation_request": {"$ref": "#/$defs/GenerationRequest"},
        "upload_frame_header": {"$ref": "#/$defs/UploadFrameHeader"},
        "frame_kinds": {"preview": FRAME_PREVIEW, "image": FRAME_IMAGE, "upload": FRAME_UPLOAD},
        "$defs": defs,
    }
