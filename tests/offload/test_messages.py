"""Topic names and MQTT payloads: round trips, and every malformed input named."""

from __future__ import annotations

import json

import pytest

from edge_runtime.errors import MessageError
from edge_runtime.mqtt import topics
from edge_runtime.offload.messages import (
    ErrorInfo,
    OffloadChunk,
    OffloadRequest,
    PublishProps,
    Usage,
    decode_chunk,
    decode_request,
    encode_chunk,
    encode_request,
    expiry_seconds,
    response_props,
)

NOW_MS = 1_700_000_000_000
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_topic_names() -> None:
    assert topics.offload_request("dev-1") == "edge/dev-1/offload/req"
    assert topics.offload_request_shared("cloud") == "$share/cloud/edge/+/offload/req"
    assert topics.offload_response("dev-1", "s1") == "edge/dev-1/offload/res/s1"
    assert topics.fleet_status("d") == "fleet/d/status"
    assert topics.fleet_telemetry("d") == "fleet/d/telemetry"
    assert topics.fleet_cmd("d") == "fleet/d/cmd"
    assert topics.fleet_cmd_ack("d") == "fleet/d/cmd/ack"
    assert topics.fleet_group_cmd("g") == "fleet/group/g/cmd"
    assert topics.device_of("edge/dev-1/offload/req") == "dev-1"


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$sys", "x\0"])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(MessageError):
        topics.offload_request(bad)
    with pytest.raises(MessageError):
        topics.fleet_group_cmd(bad)


def test_device_id_group_is_reserved() -> None:
    with pytest.raises(MessageError, match="reserved"):
        topics.fleet_cmd("group")


@pytest.mark.parametrize(("deadline", "expected"), [(1, 1), (999, 1), (1000, 1), (1001, 2),
                                                     (0, 1), (-5, 1), (60_000, 60)])
def test_expiry_is_whole_seconds_rounded_up_at_least_one(deadline: int, expected: int) -> None:
    assert expiry_seconds(NOW_MS + deadline, NOW_MS) == expected


def _request(**kw: object) -> OffloadRequest:
    args: dict[str, object] = {
        "body": BODY, "endpoint": "chat", "device": "dev-1", "deadline_ms": NOW_MS + 2500,
        "stream": True, "response_topic": "edge/dev-1/offload/res/s1",
        "correlation_data": b"req-1",
    }
    args.update(kw)
    return OffloadRequest(**args)  # type: ignore[arg-type]


def test_request_round_trip() -> None:
    req = _request()
    payload, props = encode_request(req, NOW_MS)
    assert json.loads(payload) == BODY  # the payload is the OpenAI body itself
    assert props.message_expiry_s == 3
    assert dict(props.user) == {"v": "1", "device": "dev-1", "deadline_ms": str(NOW_MS + 2500),
                                "stream": "true", "endpoint": "chat"}
    assert decode_request("edge/dev-1/offload/req", payload, props, NOW_MS) == req


def test_request_without_user_properties_like_mosquitto_rr() -> None:
    props = PublishProps(response_topic="r/1", message_expiry_s=7)
    body = {"model": "m", "prompt": "x", "stream": True}
    req = decode_request("edge/d/offload/req", json.dumps(body).encode(), props, NOW_MS)
    assert (req.endpoint, req.stream, req.deadline_ms, req.device) == (
        "completions", True, NOW_MS + 7000, "d")
    req = decode_request("edge/d/offload/req", b'{"messages": []}',
                         PublishProps(response_topic="r/1"), NOW_MS, default_timeout_ms=5)
    assert (req.endpoint, req.stream, req.deadline_ms) == ("chat", False, NOW_MS + 5)


@pytest.mark.parametrize(("payload", "props", "match"), [
    (b"{}", PublishProps(), "ResponseTopic"),
    (b"{}", PublishProps(response_topic="a/+"), "wildcards"),
    (b"not json", PublishProps(response_topic="r"), "not JSON"),
    (b"[1]", PublishProps(response_topic="r"), "JSON object"),
    (b"\xff", PublishProps(response_topic="r"), "not JSON"),
    (b"{}", PublishProps(response_topic="r", user=(("v", "2"),)), "schema version"),
    (b"{}", PublishProps(response_topic="r", user=(("endpoint", "embed"),)), "endpoint"),
    (b"{}", PublishProps(response_topic="r", user=(("deadline_ms", "soon"),)), "deadline_ms"),
    (b"{}", PublishProps(response_topic="r", user=(("stream", "yes"),)), "stream"),
    (b"{}", PublishProps(response_topic="r", user=(("device", "other"),)), "does not match"),
])
def test_malformed_requests(payload: bytes, props: PublishProps, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode_request("edge/d/offload/req", payload, props, NOW_MS)


def test_request_on_a_topic_without_device() -> None:
    with pytest.raises(MessageError):
        decode_request("fleet/group/g/cmd", b"{}", PublishProps(response_topic="r"), NOW_MS)


def test_encode_refuses_bad_requests() -> None:
    with pytest.raises(MessageError):
        encode_request(_request(endpoint="embeddings"), NOW_MS)
    with pytest.raises(MessageError):
        encode_request(_request(device="a/b"), NOW_MS)


@pytest.mark.parametrize("chunk", [
    OffloadChunk(0, "Hel"),
    OffloadChunk(3, "lo ünïcode", "stop", Usage(9, 4)),
    OffloadChunk(1, "", "length", Usage(1, 2)),
    OffloadChunk(0, error=ErrorInfo("boom", "server_error", "engine_error")),
    OffloadChunk(2, error=ErrorInfo("bad", "invalid_request_error", None)),
])
def test_chunk_round_trip(chunk: OffloadChunk) -> None:
    wire = json.loads(encode_chunk(chunk))
    assert wire["v"] == 1 and wire["served_by"] == "cloud" and wire["seq"] == chunk.seq
    if chunk.usage:
        assert wire["usage"]["total_tokens"] == chunk.usage.total_tokens
    assert decode_chunk(encode_chunk(chunk)) == chunk


@pytest.mark.parametrize(("d", "match"), [
    ({"v": 1, "seq": -1}, "seq"),
    ({"v": 1, "seq": True}, "seq"),
    ({"v": 1}, "seq"),
    ({"v": 9, "seq": 0}, "schema version"),
    ({"v": 1, "seq": 0, "text": 5}, "text"),
    ({"v": 1, "seq": 0, "finish_reason": "eos"}, "finish_reason"),
    ({"v": 1, "seq": 0, "finish_reason": "stop"}, "usage"),
    ({"v": 1, "seq": 0, "finish_reason": "stop", "usage": {"prompt_tokens": 1}}, "usage"),
    ({"v": 1, "seq": 0, "error": {"type": "x"}}, "error"),
    ({"v": 1, "seq": 0, "error": "boom"}, "error"),
    ({"v": 1, "seq": 0, "served_by": 1}, "served_by"),
])
def test_malformed_chunks(d: dict[str, object], match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode_chunk(json.dumps(d).encode())


def test_response_props_carry_correlation_and_version() -> None:
    p = response_props(b"id-7")
    assert p.correlation_data == b"id-7" and p.user_value("v") == "1"
