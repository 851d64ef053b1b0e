"""Typed job events, shared by every front door.

A job's events form one ordered stream with a per-job ``seq`` (1, 2, ...), assigned when the
event is recorded. Previews are the exception: they are not kept in the replay log (only the
latest one is), because a slow client must only ever see the newest preview.

Events are small frozen dataclasses, not pydantic models: the worker creates one per step.
``to_dict()`` gives the JSON-safe form (seeds as strings, no image bytes).

Wire format: ``to_wire()`` gives the event's ``hooocus.v1`` server message (docs/protocol.md,
``GET /v1/protocol.json``) without the per-connection ``seq``, which the sending connection adds;
``Event.from_wire(message)`` parses such a message back into the same event. This is the one place
that maps events to the protocol's names (``queue``, ``error``, ``index`` ...): the websocket
session sends what ``to_wire`` builds and the MCP proxy reads what ``from_wire`` parses. Previews are
not text messages; they travel as binary frames whose header is ``Preview.frame_header``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from engine.core.formats import extension_for_mime

#: protocol message ``type`` -> event class; filled by ``Event.__init_subclass__``.
_BY_WIRE_TYPE: dict[str, type[Event]] = {}


class WireFormatError(ValueError):
    """A ``hooocus.v1`` job message that lacks a field or has one of the wrong type."""


def _int(message: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = message.get(key, default)
    if value is None:
        value = default
    # bool is an int in Python, but never a count or a seed on the wire.
    if isinstance(value, bool) or value is None:
        raise WireFormatError(f"{message.get('type')} message: {key!r} must be an integer, got {value!r}")
    try:
        return int(value)  # seeds travel as decimal strings (64-bit, beyond JavaScript's numbers)
    except (TypeError, ValueError):
        raise WireFormatError(f"{message.get('type')} message: {key!r} must be an integer, got {value!r}") from None


def _str(message: Mapping[str, Any], key: str, default: str = "") -> str:
    value = message.get(key)
    return default if value is None else str(value)


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    #: The ``type`` of this event's hooocus.v1 server message; None: not sent as a text message.
    wire_type: ClassVar[str | None] = None
    job_id: str
    seq: int = 0  # assigned by Job.emit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("wire_type") is not None:
            _BY_WIRE_TYPE[cls.wire_type] = cls  # type: ignore[index]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    # -- hooocus.v1 ----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The hooocus.v1 server message for this event, without the connection's ``seq``."""
        if self.wire_type is None:
            raise TypeError(f"{type(self).__name__} is not sent as a text message")
        return {"type": self.wire_type, "job_id": self.job_id, "job_seq": self.seq, **self._wire_fields()}

    def _wire_fields(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def from_wire(message: Mapping[str, Any]) -> Event | None:
        """The event a hooocus.v1 server message carries; None for a message that is not a job event
        (``hello``, ``accepted``, ``ack``, ``pong``, a request's ``error`` without ``job_id``, and
        types this version does not know, so a newer server's additions are ignored). An ``image``
        message may carry its bytes under ``data`` (``hooocus_ws.client`` joins the binary frame).
        Raises :class:`WireFormatError` for a job message with a missing or mistyped field."""
        cls = _BY_WIRE_TYPE.get(str(message.get("type", "")))
        job_id = message.get("job_id")
        if cls is None or not job_id:
            return None
        return cls._from_wire(message, job_id=str(job_id), seq=_int(message, "job_seq", 0))

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Event:
        return cls(job_id=job_id, seq=seq)


@dataclass(frozen=True)
class Queued(Event):
    kind: ClassVar[str] = "queued"
    wire_type: ClassVar[str | None] = "queue"
    position: int = 0  # 0 = next to run

    def _wire_fields(self) -> dict[str, Any]:
        return {"position": self.position}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Queued:
        return cls(job_id=job_id, seq=seq, position=_int(message, "position"))


@dataclass(frozen=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    #: Every resolved parameter (JSON-safe; seeds as strings).
    params: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    total_steps: int = 0  # over all images

    wire_type: ClassVar[str | None] = "started"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["seeds"] = [str(s) for s in self.seeds]
        return out

    def _wire_fields(self) -> dict[str, Any]:
        return {"params": self.params, "seeds": [str(s) for s in self.seeds], "total_steps": self.total_steps}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Started:
        params = message.get("params", {})
        seeds = message.get("seeds", [])
        if not isinstance(params, Mapping) or not isinstance(seeds, list):
            raise WireFormatError("started message: 'params' must be an object and 'seeds' a list")
        return cls(job_id=job_id, seq=seq, params=dict(params),
                   seeds=tuple(_int({"type": "started", f"seeds[{i}]": s}, f"seeds[{i}]") for i, s in enumerate(seeds)),
                   total_steps=_int(message, "total_steps"))


@dataclass(frozen=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    step: int = 0  # 1-based, within the current image
    total_steps: int = 0  # steps of the current image
    stage: str = "sample"  # encode | sample | refine | decode | save
    image_index: int = 0
    image_count: int = 1

    wire_type: ClassVar[str | None] = "progress"

    def _wire_fields(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "stage": self.stage,
                "image_index": self.image_index, "image_count": self.image_count}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Progress:
        return cls(job_id=job_id, seq=seq, step=_int(message, "step"), total_steps=_int(message, "total_steps"),
                   stage=_str(message, "stage", "sample"), image_index=_int(message, "image_index", 0),
                   image_count=_int(message, "image_count", 1))


@dataclass(frozen=True)
class Preview(Event):
    kind: ClassVar[str] = "preview"
    image_index: int = 0
    step: int = 0
    #: uint8 RGB array [H, W, 3]; front doors resize and encode it as they wish.
    rgb: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        height, width = (self.rgb.shape[:2] if self.rgb is not None else (0, 0))
        return {"type": self.kind, "job_id": self.job_id, "seq": self.seq, "image_index": self.image_index,
                "step": self.step, "width": int(width), "height": int(height)}

    def frame_header(self, *, mime: str, width: int, height: int) -> dict[str, Any]:
        """The JSON header of this preview's binary frame (kind 1); ``mime``/``width``/``height`` are
        those of the encoded (resized) preview the connection sends."""
        return {"job_id": self.job_id, "job_seq": self.seq, "index": self.image_index, "step": self.step,
                "mime": mime, "width": width, "height": height}


@dataclass(frozen=True)
class ImageReady(Event):
    kind: ClassVar[str] = "image"
    wire_type: ClassVar[str | None] = "image"
    index: int = 0
    seed: int = 0
    data: bytes = field(default=b"", compare=False, repr=False)  # the encoded file
    mime: str = "image/png"
    width: int = 0
    height: int = 0
    sha256: str = ""
    #: Parameters as written into the file (fooocus scheme dict), for history and clients.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def extension(self) -> str:
        return extension_for_mime(self.mime)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "job_id": self.job_id, "seq": self.seq, "index": self.index,
                "seed": str(self.seed), "mime": self.mime, "width": self.width, "height": self.height,
                "sha256": self.sha256, "size_bytes": len(self.data)}

    def _wire_fields(self) -> dict[str, Any]:
        # The websocket session adds the image's (signed) ``url``, which only the server knows.
        return {"index": self.index, "seed": str(self.seed), "sha256": self.sha256, "width": self.width,
                "height": self.height, "mime": self.mime, "size_bytes": len(self.data)}

    def frame_header(self) -> dict[str, Any]:
        """The JSON header of the binary frame (kind 2) that carries this image's bytes."""
        return {"job_id": self.job_id, "job_seq": self.seq, "index": self.index, "seed": str(self.seed),
                "mime": self.mime, "width": self.width, "height": self.height, "sha256": self.sha256}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> ImageReady:
        data = message.get("data")
        return cls(job_id=job_id, seq=seq, index=_int(message, "index"), seed=_int(message, "seed"),
                   data=bytes(data) if isinstance(data, bytes | bytearray) else b"",
                   mime=_str(message, "mime", "image/png"), width=_int(message, "width"),
                   height=_int(message, "height"), sha256=_str(message, "sha256"))


@dataclass(frozen=True)
class Done(Event):
    kind: ClassVar[str] = "done"
    wire_type: ClassVar[str | None] = "done"
    images_done: int = 0

    def _wire_fields(self) -> dict[str, Any]:
        return {"images_done": self.images_done}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Done:
        return cls(job_id=job_id, seq=seq, images_done=_int(message, "images_done", 0))


@dataclass(frozen=True)
class Cancelled(Event):
    kind: ClassVar[str] = "cancelled"
    images_done: int = 0
    reason: str = "user"  # user | admin | disconnect | shutting_down

    wire_type: ClassVar[str | None] = "cancelled"

    def _wire_fields(self) -> dict[str, Any]:
        return {"images_done": self.images_done, "reason": self.reason}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Cancelled:
        return cls(job_id=job_id, seq=seq, images_done=_int(message, "images_done", 0),
                   reason=_str(message, "reason", "user"))


@dataclass(frozen=True)
class Failed(Event):
    kind: ClassVar[str] = "failed"
    code: str = "internal_error"
    message: str = ""
    error_id: str = ""  # opaque id that also appears in the server log
    images_done: int = 0

    #: A failed job is an ``error`` message that names the job (a refused request names none).
    wire_type: ClassVar[str | None] = "error"

    def _wire_fields(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "error_id": self.error_id or None,
                "images_done": self.images_done}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> Failed:
        return cls(job_id=job_id, seq=seq, code=_str(message, "code", "internal_error"),
                   message=_str(message, "message"), error_id=_str(message, "error_id"),
                   images_done=_int(message, "images_done", 0))


@dataclass(frozen=True)
class JobWarning(Event):
    """Something the caller should know that does not stop the job (e.g. expansion assets missing)."""

    kind: ClassVar[str] = "warning"
    wire_type: ClassVar[str | None] = "warning"
    code: str = ""
    message: str = ""

    def _wire_fields(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def _from_wire(cls, message: Mapping[str, Any], *, job_id: str, seq: int) -> JobWarning:
        return cls(job_id=job_id, seq=seq, code=_str(message, "code"), message=_str(message, "message"))


TERMINAL_EVENTS: tuple[type[Event], ...] = (Done, Cancelled, Failed)
