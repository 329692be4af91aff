"""What a cloud worker refuses before serving, as pure functions: where it may answer
(topics.check_response_topic), and screen_request / model_refusal (offload/messages.py)."""

from __future__ import annotations

import pytest

from edge_runtime.errors import MessageError
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.types import PublishProps
from edge_runtime.offload.messages import (
    MAX_REQUEST_BYTES,
    model_refusal,
    screen_request,
)

REQ = "edge/dev-a/offload/req"


def test_own_response_topic_is_accepted() -> None:
    assert topics.check_response_topic(REQ, "edge/dev-a/offload/res/s1") == (
        "edge/dev-a/offload/res/s1")


@pytest.mark.parametrize("response, why", [
    ("fleet/victim/cmd", "is not edge/dev-a/offload/res"),
    ("edge/dev-b/offload/res/s1", "belongs to device 'dev-b'"),
    ("edge/dev-a/offload/req", "is not edge/dev-a/offload/res"),
    ("edge/dev-a/offload/res", "is not edge/dev-a/offload/res"),
    ("edge/dev-a/offload/res/s1/x", "is not edge/dev-a/offload/res"),
    ("edge/dev-a/offload/res/+", "'+'"),
    ("edge/dev-a/offload/res/$x", "must not start with '$'"),
    ("/edge/dev-a/offload/res/s1", "is not edge/dev-a/offload/res"),
    ("edge/dev-a/fleet/res/s1", "is not edge/dev-a/offload/res"),
])
def test_any_other_response_topic_is_refused_with_the_reason(response: str, why: str) -> None:
    with pytest.raises(MessageError, match=why.replace("+", r"\+").replace("$", r"\$")):
        topics.check_response_topic(REQ, response)


@pytest.mark.parametrize("request_topic", [
    "edge/+/offload/req", "fleet/dev-a/cmd", "edge/dev-a/offload/req/x", "edge/group/offload/req",
])
def test_a_request_topic_that_names_no_device_is_refused(request_topic: str) -> None:
    with pytest.raises(MessageError):
        topics.check_response_topic(request_topic, "edge/dev-a/offload/res/s1")


def props(response: str | None = "edge/dev-a/offload/res/s1", **user: str) -> PublishProps:
    return PublishProps(response_topic=response, correlation_data=b"1",
                        user=tuple(user.items()))


def test_a_servable_request_passes() -> None:
    assert screen_request(REQ, 100, props()) is None
    assert screen_request(REQ, MAX_REQUEST_BYTES, props(v="1")) is None


def test_no_response_topic_is_logged_not_answered() -> None:
    r = screen_request(REQ, 10, props(None))
    assert r is not None and not r.reply and r.counter == "no_response_topic"
    assert "MQTT 3.1.1" in r.error.message


@pytest.mark.parametrize("response", ["fleet/victim/cmd", "edge/dev-b/offload/res/s1"])
def test_foreign_response_topic_is_dropped_and_counted(response: str) -> None:
    r = screen_request(REQ, 10, props(response))
    assert r is not None and not r.reply and r.counter == "foreign_topic"
    assert r.error.code == "foreign_response_topic"


def test_unknown_version_and_oversized_body_get_an_error_reply() -> None:
    r = screen_request(REQ, 10, props(v="2"))
    assert r is not None and r.reply and r.error.code == "unsupported_version"
    assert "'2'" in r.error.message
    r = screen_request(REQ, MAX_REQUEST_BYTES + 1, props())
    assert r is not None and r.reply and r.error.code == "request_too_large"
    assert str(MAX_REQUEST_BYTES + 1) in r.error.message


def test_foreign_topic_wins_over_every_answerable_refusal() -> None:
    # Never an error reply onto a foreign topic, whatever else is wrong with the request.
    r = screen_request(REQ, MAX_REQUEST_BYTES + 1, props("fleet/victim/cmd", v="9"))
    assert r is not None and not r.reply


def test_model_refusal_is_the_apis_404() -> None:
    assert model_refusal({"model": "tiny"}, "tiny") is None
    assert model_refusal({"model": "other"}, None) is None
    r = model_refusal({"model": "other"}, "tiny")
    assert r is not None and r.reply and r.error.code == "model_not_found"
    assert "'other'" in r.error.message and "'tiny'" in r.error.message
