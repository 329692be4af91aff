"""What a cloud worker refuses before serving: the pure functions (where it may answer,
topics.check_response_topic; screen_request / model_refusal of offload/messages.py), then
the same refusals through an echo worker on a real broker (error reply or log line, never
silence; nothing ever published on a foreign topic)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from live_server import wait_until
from mqtt_fixtures import Broker

from edge_runtime.cloud.worker import CloudWorker
from edge_runtime.errors import MessageError
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient
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


# -- the same refusals on a real broker, through the echo worker ----------------------------

BODY = json.dumps({"model": "tiny", "prompt": "hi"}).encode()


@pytest.fixture
def worker(broker: Broker) -> Iterator[CloudWorker]:
    w = CloudWorker(broker.url, None, model="tiny", reconnect_min_s=0.1)
    assert w.start(wait_s=10)
    yield w
    w.stop()


@pytest.fixture
def listener(broker: Broker) -> Iterator[tuple[MqttClient, list[Message]]]:
    got: list[Message] = []
    c = MqttClient(broker.url, "listener")
    c.subscribe("#", got.append)
    assert c.start(wait_s=10) and c.wait_subscribed(10)
    yield c, got
    c.stop()


def _answers(got: list[Message], topic: str) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in got if m.topic == topic]


def test_foreign_response_topics_get_nothing_published(
        worker: CloudWorker, listener: tuple[MqttClient, list[Message]],
        caplog: pytest.LogCaptureFixture) -> None:
    c, got = listener
    for target in ("fleet/victim/cmd", "edge/dev-b/offload/res/s1"):
        c.publish(REQ, BODY, PublishProps(response_topic=target, correlation_data=b"1"),
                  wait_s=5)
    wait_until(lambda: worker.counts["foreign_topic"] == 2, 5)
    time.sleep(0.3)
    assert [m.topic for m in got] == [REQ, REQ]  # only the two requests themselves
    assert worker.counts["messages"] == 0
    assert "belongs to device 'dev-b'" in caplog.text and "fleet/victim/cmd" in caplog.text


@pytest.mark.parametrize("props, payload, code, counter", [
    (props(v="2"), BODY, "unsupported_version", "bad_version"),
    (props(), b" " * (MAX_REQUEST_BYTES + 1), "request_too_large", "too_large"),
    (props(), json.dumps({"model": "other", "prompt": "hi"}).encode(), "model_not_found",
     "unknown_model"),
])
def test_unservable_requests_get_an_error_reply(
        worker: CloudWorker, listener: tuple[MqttClient, list[Message]], props: PublishProps,
        payload: bytes, code: str, counter: str) -> None:
    c, got = listener
    c.publish(REQ, payload, props, wait_s=5)
    wait_until(lambda: _answers(got, "edge/dev-a/offload/res/s1"), 5)
    [answer] = _answers(got, "edge/dev-a/offload/res/s1")
    assert answer["error"]["code"] == code  # type: ignore[index]
    # the worker counts a refusal once it has logged and answered it: the count trails
    wait_until(lambda: worker.counts[counter] == 1, 5)


def test_an_mqtt_311_request_is_logged_not_silent(
        broker: Broker, worker: CloudWorker, caplog: pytest.LogCaptureFixture) -> None:
    pub = shutil.which("mosquitto_pub")
    if pub is None:
        pytest.skip("mosquitto_pub is not installed")
    caplog.set_level(logging.WARNING)
    subprocess.run([pub, "-V", "311", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", REQ, "-m", BODY.decode()], check=True, timeout=10)
    wait_until(lambda: worker.counts["no_response_topic"] == 1, 5)
    assert "MQTT 3.1.1" in caplog.text and REQ in caplog.text
