"""The message parser and the binary frame layout (matrix rows 10 and 28)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hooocus_ws.protocol import (
    FRAME_IMAGE,
    FRAME_PREVIEW,
    CancelMessage,
    GenerateMessage,
    ProtocolError,
    decode_frame,
    encode_frame,
    message_id,
    parse_client_message,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def test_valid_messages_parse_to_their_models():
    message = parse_client_message('{"type":"generate","id":"a","params":{"prompt":"x"},"request_id":"r"}')
    assert isinstance(message, GenerateMessage) and message.params == {"prompt": "x"} and message.request_id == "r"
    assert isinstance(parse_client_message(b'{"type":"cancel","job_id":"j_1"}'), CancelMessage)


@pytest.mark.parametrize(("text", "code", "loc"), [
    ("{", "invalid_json", None),
    ("[1, 2]", "invalid_message", ()),
    ('{"type": 5}', "invalid_message", ("type",)),
    ('{"type": "ping", "id": "a", "x": 1}', "invalid_message", ("x",)),
    ('{"type": "ping", "id": {"nested": 1}}', "invalid_message", ("id",)),
    ("[" * 100_000, "invalid_json", None),
])
def test_invalid_messages(text, code, loc):
    with pytest.raises(ProtocolError) as info:
        parse_client_message(text)
    assert info.value.code == code
    if loc is not None:
        assert info.value.loc[: len(loc)] == loc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_only_ever_gives_protocol_errors(value):
    text = json.dumps(value)
    try:
        parse_client_message(text)
    except ProtocolError as exc:
        assert exc.code in ("invalid_json", "invalid_message")
    message_id(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=256))
def test_random_bytes_only_ever_give_protocol_errors(data):
    try:
        parse_client_message(data)
    except ProtocolError:
        pass
    try:
        decode_frame(data if isinstance(data, bytes) else data.encode())
    except ProtocolError:
        pass


@given(st.sampled_from([FRAME_PREVIEW, FRAME_IMAGE]), st.dictionaries(st.text(max_size=8), st.integers()),
       st.binary(max_size=256))
def test_frames_round_trip(kind, header, payload):
    frame = encode_frame(kind, header, payload)
    assert frame[0] == 1 and frame[1] == kind
    assert struct.unpack(">I", frame[2:6])[0] == len(frame) - 6 - len(payload)
    assert decode_frame(frame) == (kind, header, payload)


@pytest.mark.parametrize("frame", [
    b"",
    b"\x02\x01\x00\x00\x00\x02{}",  # version 2
    b"\x01\x09\x00\x00\x00\x02{}",  # kind 9
    b"\x01\x01\xff\xff\xff\xff{}",  # header longer than the frame
    b"\x01\x01\x00\x00\x00\x02[]",  # header not an object
    b"\x01\x01\x00\x00\x00\x02\xff\xfe",  # not UTF-8
])
def test_bad_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode_frame(frame)


def test_every_published_message_is_typed_by_its_own_literal_listed_first():
    # The messages share their common fields through base classes; the published schema must still
    # list `type` first, as a required constant of that message, and refuse a neighbour's type.
    from pydantic import ValidationError

    from hooocus_ws.protocol import CLIENT_MESSAGES, SERVER_MESSAGES, protocol_schema

    defs = protocol_schema()["$defs"]
    for name, model in {**CLIENT_MESSAGES, **SERVER_MESSAGES}.items():
        schema = defs[model.__name__]
        assert next(iter(schema["properties"])) == "type", name
        assert schema["properties"]["type"]["const"] == name and "type" in schema["required"], name
    with pytest.raises(ValidationError):
        CancelMessage.model_validate({"type": "ping", "job_id": "j"})
