"""The fast PUBLISH codec (mqtt_props) against paho's own, and in use on a real broker."""

from __future__ import annotations

import struct
import threading

import pytest
from mqtt_fixtures import Broker
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.mqtt import props as mqtt_props
from edge_runtime.mqtt.client import Message, MqttClient
from edge_runtime.mqtt.types import PublishProps

CASES = [
    PublishProps(),
    PublishProps(correlation_data=b""),
    PublishProps(response_topic="edge/d1/offload/res/ab12", correlation_data=b"\x00\xffid",
                 message_expiry_s=7),
    PublishProps(message_expiry_s=0, user=(("v", "1"), ("v", "2"), ("ключ", "значение ✓"))),
    PublishProps(response_topic="r", correlation_data=bytes(range(256)) * 4,
                 message_expiry_s=2**32 - 1, user=tuple((f"k{i}", "x" * i) for i in range(40))),
]


def _paho(props: PublishProps) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    if props.message_expiry_s is not None:
        p.MessageExpiryInterval = props.message_expiry_s
    if props.response_topic is not None:
        p.ResponseTopic = props.response_topic
    if props.correlation_data is not None:
        p.CorrelationData = props.correlation_data
    if props.user:
        p.UserProperty = list(props.user)
    return p


@pytest.mark.parametrize("props", CASES)
def test_encode_is_what_paho_decodes(props: PublishProps) -> None:
    p = Properties(PacketTypes.PUBLISH)
    p.unpack(mqtt_props.encode(props))
    assert getattr(p, "MessageExpiryInterval", None) == props.message_expiry_s
    assert getattr(p, "ResponseTopic", None) == props.response_topic
    assert getattr(p, "CorrelationData", None) == props.correlation_data
    assert tuple(getattr(p, "UserProperty", ())) == props.user


@pytest.mark.parametrize("props", CASES)
def test_decode_reads_what_paho_encodes(props: PublishProps) -> None:
    packed = _paho(props).pack()
    got, end = mqtt_props.decode_props(packed + b"payload")
    assert got == props and end == len(packed)


def _publish(topic: bytes, props: bytes, payload: bytes, qos: int = 1, mid: int = 7) -> bytes:
    return struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") \
        + props + payload


def test_decode_publish_qos0_and_qos1() -> None:
    props = PublishProps(correlation_data=b"c1")
    raw = _publish(b"a/b", mqtt_props.encode(props), b'{"x":1}')
    p = mqtt_props.decode_publish(0x32 | 0x08, raw)  # PUBLISH, QoS 1, DUP
    assert p == mqtt_props.Publish("a/b", 7, 1, True, False, props, b'{"x":1}')
    p0 = mqtt_props.decode_publish(0x31, _publish(b"t", b"\x00", b"", qos=0))  # retain
    assert p0 == mqtt_props.Publish("t", 0, 0, False, True, PublishProps(), b"")


@pytest.mark.parametrize("header,raw", [
    (0x34, _publish(b"t", b"\x00", b"x")),  # QoS 2: paho's business
    (0x32, _publish(b"", b"\x03\x23\x00\x01", b"x")),  # a topic alias, empty topic
    (0x32, _publish(b"t", b"\x02\x23\x00", b"x")),  # truncated property
    (0x32, _publish(b"t", b"\x05\x08\x00\x05ab", b"")),  # string longer than the packet
    (0x32, _publish(b"t", b"\x02\x17\x01", b"x")),  # 0x17 is no PUBLISH property
    (0x32, _publish(b"\xff\xfe", b"\x00", b"x")),  # topic is not UTF-8
    (0x32, b"\x00"),  # shorter than a topic length
])
def test_decode_publish_leaves_the_rest_to_paho(header: int, raw: bytes) -> None:
    assert mqtt_props.decode_publish(header, raw) is None


def test_fast_path_is_the_one_in_use(broker: Broker) -> None:
    """If a paho upgrade renamed what _Client overrides, this fails instead of going slow."""
    got: list[Message] = []
    done = threading.Event()
    sub = MqttClient(broker.url, "sub")
    sub.subscribe("t/#", lambda m: (got.append(m), done.set()))
    pub = MqttClient(broker.url, "pub")
    try:
        assert sub.start(wait_s=5) and sub.wait_subscribed(5) and pub.start(wait_s=5)
        props = PublishProps("t/reply", b"corr", 30, (("v", "1"),))
        pub.publish("t/x", b"hello", props, wait_s=5)
        assert done.wait(5)
        assert got[0].payload == b"hello" and got[0].props == props
        assert sub._client.fast_publishes == 1  # type: ignore[attr-defined]
    finally:
        sub.stop()
        pub.stop()
