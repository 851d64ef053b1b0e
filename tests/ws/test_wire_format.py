"""One wire format (issue 13.3): ``Event.to_wire()`` builds each job event's hooocus.v1 message and
``Event.from_wire()`` parses it back, so the websocket session and the MCP proxy cannot drift apart.

Checked three ways: against the published schema (hooocus_ws.protocol, GET /v1/protocol.json),
against the messages the session built by hand before this change (``legacy_message`` below is
that code, kept verbatim as the reference), and as a round trip for every event type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.core.events import (
    Cancelled,
    Done,
    Event,
    Failed,
    ImageReady,
    JobWarning,
    Preview,
    Progress,
    Queued,
    Started,
    WireFormatError,
)
from hooocus_ws.protocol import FrameHeader, validate_server_message

#: One instance of every event type that travels as a text message, with values that exercise the
#: conversions (64-bit seeds as strings, an empty error_id as null, image bytes counted not sent).
SAMPLES: list[Event] = [
    Queued(job_id="j_1", seq=1, position=3),
    Started(job_id="j_1", seq=2, params={"prompt": "a fox", "steps": 4}, seeds=(2**64 - 1, 7), total_steps=8),
    Progress(job_id="j_1", seq=3, step=2, total_steps=4, stage="refine", image_index=1, image_count=2),
    ImageReady(job_id="j_1", seq=4, index=1, seed=2**63, data=b"\x89PNG-bytes", mime="image/webp", width=64,
               height=48, sha256="ab" * 32),
    Done(job_id="j_1", seq=5, images_done=2),
    Cancelled(job_id="j_2", seq=6, images_done=1, reason="disconnect"),
    Failed(job_id="j_3", seq=7, code="out_of_memory", message="out of memory", error_id="e12", images_done=1),
    Failed(job_id="j_3", seq=8, code="invalid_request", message="bad"),  # no error_id: null on the wire
    JobWarning(job_id="j_1", seq=9, code="expansion_unavailable", message="prompt expansion is off"),
]


def all_event_types() -> set[type[Event]]:
    found: set[type[Event]] = set()
    todo = [Event]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == "engine.core.events":
                found.add(sub)
                todo.append(sub)
    return found


def legacy_message(event: Event, url: str) -> dict[str, Any] | None:
    """What hooocus_ws/session.py built for ``event`` before ``to_wire`` existed (without ``seq``)."""
    base = {"job_id": event.job_id, "job_seq": event.seq}
    if isinstance(event, Queued):
        return {"type": "queue", **base, "position": event.position}
    if isinstance(event, Started):
        return {"type": "started", **base, "params": event.params, "seeds": [str(s) for s in event.seeds],
                "total_steps": event.total_steps}
    if isinstance(event, Progress):
        return {"type": "progress", **base, "step": event.step, "total_steps": event.total_steps,
                "stage": event.stage, "image_index": event.image_index, "image_count": event.image_count}
    if isinstance(event, ImageReady):
        return {"type": "image", **base, "index": event.index, "seed": str(event.seed), "sha256": event.sha256,
                "width": event.width, "height": event.height, "mime": event.mime, "size_bytes": len(event.data),
                "url": url}
    if isinstance(event, Done):
        return {"type": "done", **base, "images_done": event.images_done}
    if isinstance(event, Cancelled):
        return {"type": "cancelled", **base, "images_done": event.images_done, "reason": event.reason}
    if isinstance(event, Failed):
        return {"type": "error", **base, "code": event.code, "message": event.message,
                "error_id": event.error_id or None, "images_done": event.images_done}
    if isinstance(event, JobWarning):
        return {"type": "warning", **base, "code": event.code, "message": event.message}
    return None


def sent(event: Event) -> dict[str, Any]:
    """The message as the session sends it: ``to_wire`` plus the image url and the connection seq."""
    message = event.to_wire()
    if isinstance(event, ImageReady):
        message["url"] = "/v1/images/x.webp?exp=1&sig=s"
    return {**message, "seq": 11}


def test_every_text_event_type_has_a_sample() -> None:
    text_types = {t for t in all_event_types() if t.wire_type is not None}
    assert text_types == {type(e) for e in SAMPLES}
    assert {t for t in all_event_types() if t.wire_type is None} == {Preview}  # previews are binary frames


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_to_wire_matches_the_schema_and_the_session_of_before(event: Event) -> None:
    message = sent(event)
    validate_server_message(message)  # extra="forbid": no field more, none missing
    legacy = legacy_message(event, url=message.get("url", ""))
    assert legacy is not None
    assert message == {**legacy, "seq": 11}
    assert list(message) == [*legacy, "seq"]  # same key order, so the JSON text is byte-identical


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_from_wire_gives_back_the_same_event(event: Event) -> None:
    assert Event.from_wire(sent(event)) == event


def test_an_image_message_takes_its_bytes_from_the_joined_frame() -> None:
    image = SAMPLES[3]
    assert isinstance(image, ImageReady)
    parsed = Event.from_wire({**sent(image), "data": image.data})
    assert isinstance(parsed, ImageReady) and parsed.data == image.data and parsed.seed == 2**63


def test_frame_headers_match_the_schema() -> None:
    image = SAMPLES[3]
    assert isinstance(image, ImageReady)
    header = FrameHeader.model_validate(image.frame_header())
    assert (header.job_seq, header.index, header.seed, header.sha256) == (4, 1, str(2**63), "ab" * 32)
    preview = Preview(job_id="j_1", seq=12, image_index=1, step=5, rgb=np.zeros((8, 8, 3), dtype=np.uint8))
    header = FrameHeader.model_validate(preview.frame_header(mime="image/jpeg", width=4, height=4))
    assert (header.job_seq, header.index, header.step, header.width) == (12, 1, 5, 4)
    with pytest.raises(TypeError):
        preview.to_wire()


@pytest.mark.parametrize("message", [
    {"type": "hello", "seq": 1, "protocol": "hooocus.v1"},
    {"type": "accepted", "seq": 2, "re": "c1", "job_id": "j_1", "position": 0, "duplicate": False},
    {"type": "ack", "seq": 3, "re": 1, "job_id": "j_1", "state": "queued"},
    {"type": "pong", "seq": 4, "re": 2},
    {"type": "error", "seq": 5, "re": 3, "code": "queue_full", "message": "full"},  # a request, not a job
    {"type": "queued", "job_id": "j_1", "job_seq": 1, "position": 0},  # not a protocol name
    {"type": "failed", "job_id": "j_1", "job_seq": 1, "code": "x", "message": "y"},  # not a protocol name
    {"type": "something_newer", "job_id": "j_1", "job_seq": 1},
])
def test_messages_that_are_not_job_events_parse_to_none(message: dict[str, Any]) -> None:
    assert Event.from_wire(message) is None


@pytest.mark.parametrize("message", [
    {"type": "progress", "job_id": "j", "job_seq": 2, "total_steps": 4},  # step missing
    {"type": "started", "job_id": "j", "job_seq": 2, "params": {}, "seeds": ["not-a-seed"], "total_steps": 4},
    {"type": "image", "job_id": "j", "job_seq": 3, "index": True, "seed": "1", "width": 8, "height": 8},
    {"type": "started", "job_id": "j", "job_seq": 2, "params": [], "seeds": [], "total_steps": 4},
])
def test_a_malformed_job_message_is_a_clear_error(message: dict[str, Any]) -> None:
    with pytest.raises(WireFormatError, match=message["type"]):
        Event.from_wire(message)
