"""The one module that imports paho-mqtt: a small MQTT 5 client for offload and fleet.

    MqttClient(url, client_id, ...).start()       connect in the background, keep reconnecting
    .subscribe(filter, handler)                   (re)subscribed on every connect, QoS 1
    .publish(topic, payload, props, on_ack=...)   QoS 1; on_ack gets the PUBACK reason code
    .stop()                                       DISCONNECT, then join the network thread

A fleet agent passes `clean_start=False` with a `session_expiry_s` so that the broker keeps
its subscriptions and queues QoS 1 commands while it is away, and a `Will` (retained
offline status) that the broker publishes if the connection dies without a DISCONNECT.

paho's network thread (`loop_start`) runs every callback, so handlers must be quick and
hand work to other threads. Reconnects are paho's own loop; we set the first delay with
jitter on every disconnect so that a fleet that lost its broker does not come back in
lockstep, and paho doubles it up to a cap. TCP_NODELAY is set as soon as the socket opens:
without it, Nagle's algorithm holds small publishes back until the previous one is acked
(measured on loopback: 88 ms against 0.45 ms per request/response round trip).

PUBLISH properties go through `mqtt_props` instead of paho's `Properties` codec both ways
(a packed block on the way out, a `_Client._handle_publish` that parses the packet itself on
the way in, paho's own decoder for anything that fast path does not handle): paho's decoder
alone costs ~0.19 ms of the offload round trip's p50 (docs/BENCHMARKS.md, "paho-mqtt pin").
What a connection is made of (broker URL, TLS files, Will, a received Message) is in
types.py, free of paho; it is re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_runtime.errors import BrokerError
from edge_runtime.mqtt import props as mqtt_props
from edge_runtime.mqtt.loop import LoopDriver
from edge_runtime.mqtt.types import (
    BrokerURL,
    Handler,
    Message,
    PublishProps,
    TlsFiles,
    Will,
    broker_credentials,
    identity_of,
)

__all__ = [
    "NO_MATCHING_SUBSCRIBERS", "BrokerURL", "Handler", "Message", "MqttClient", "TlsFiles",
    "Will", "broker_credentials",
]

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10
"""PUBACK reason code: the broker took the message but nobody is subscribed to it."""


class MqttClient:
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 0,
        clean_start: bool = True,
        will: Will | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        on_connection: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = BrokerURL.parse(url)
        self.client_id = client_id
        self._keepalive = keepalive_s
        self._session_expiry = session_expiry_s
        self._clean_start = clean_start
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._on_connection = on_connection
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._acks: dict[int, Callable[[int], None]] = {}
        self._early_acks: dict[int, int] = {}  # PUBACKs that beat their publish() call home
        self._pending_subs: set[int] = set()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = False
        self._subscribed = threading.Event()
        c = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if self.url.tls or tls is not None:
            t = tls or TlsFiles()
            c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._client = c
        self.identity = identity_of(username, tls)
        """Who this client logs in as, for error messages: a username, a certificate's CN,
        or `anonymous`; never the password."""
        self.refusal: str | None = None
        """The broker's reason for refusing the last CONNECT (CONNACK `Not authorized`,
        `Bad user name or password`, …); None once a connection is accepted."""
        self.tls_refusal: str | None = None
        """Why the broker refused this client at the TLS level (an alert such as `certificate
        revoked`), with the likely cause; None once a connection is accepted."""
        self.refused_filters: dict[str, str] = {}
        """Subscriptions the broker refused (SUBACK reason code >= 0x80), with the reason."""
        self._sub_mids: dict[int, str] = {}
        self._refused_pubs: dict[int, str] = {}
        self._driver: LoopDriver | None = None
        self._set_reconnect_delay()

    # -- lifecycle --------------------------------------------------------------------------

    def start(
        self, wait_s: float | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> bool:
        """Connect in the background (retrying until `stop`); optionally wait for it.

        With `loop`, the network I/O runs on that asyncio loop (mqtt_loop.LoopDriver) and
        every callback runs there, instead of on paho's own thread: for a client whose
        publishers and consumers live on that loop (the daemon's offload client), it saves
        two thread crossings per round trip. Do not block the loop on `wait_s` then.
        """
        if loop is not None and wait_s is not None and _running_loop() is loop:
            raise ValueError("wait_s would block the loop the client runs on")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(
            self.url.host, self.url.port, self._keepalive, clean_start=self._clean_start,
            properties=props,
        )
        if loop is None:
            self._client.loop_start()
        else:
            self._driver = LoopDriver(
                self._client, loop, self._reconnect,
                on_open=lambda sock: self._on_socket_open(self._client, None, sock),
            )
            self._driver.start()
        return self._connected.wait(wait_s) if wait_s is not None else self.connected

    def stop(self) -> None:
        self._stopping = True  # our own DISCONNECT is not worth a warning
        if self._driver is not None:
            self._driver.stop()
        else:
            self._client.disconnect()
            self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def failure(self, timeout_s: float) -> BrokerError:
        """Why `start`/`wait_subscribed` did not succeed within `timeout_s`: the broker's own
        refusal (CONNACK, SUBACK) with the identity used, else `cannot reach`."""
        where = f"mqtt{'s' if self.url.tls else ''}://{self.url.host}:{self.url.port}"
        if self.refusal is not None:
            return BrokerError(f"the MQTT broker at {where} refused the connection of "
                               f"{self.identity}: {self.refusal} (check the credentials and "
                               "the broker's ACL)")
        if self.tls_refusal is not None:
            return BrokerError(self.tls_refusal)
        if self.refused_filters:
            refused = ", ".join(f"{f!r} ({r})" for f, r in sorted(self.refused_filters.items()))
            return BrokerError(f"the MQTT broker at {where} refused {self.identity} the "
                               f"subscription to {refused} (check the broker's ACL)")
        return BrokerError(f"cannot reach the MQTT broker at {where} within {timeout_s:g}s "
                           f"(as {self.identity})")

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Connected and every subscription acknowledged (SUBACK) by the broker."""
        return self._connected.wait(timeout_s) and self._subscribed.wait(timeout_s)

    # -- subscribe / publish ----------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
            self._subscribed.clear()
        if self.connected:
            self._send_subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)
            self._kick()

    def publish(
        self,
        topic: str,
        payload: bytes,
        props: PublishProps | None = None,
        qos: int = 1,
        on_ack: Callable[[int], None] | None = None,
        wait_s: float | None = None,
        retain: bool = False,
    ) -> int:
        """Queue one message; BrokerError if not connected. Returns its message id.

        `on_ack(reason_code)` runs on the network thread (or loop) when the PUBACK arrives
        (QoS 1); `wait_s` blocks until then instead, and raises BrokerError if it does not
        come (never on the loop the client runs on).
        """
        if not self.connected:
            raise BrokerError(f"not connected to the broker at {self.url.host}:{self.url.port}")
        info = self._client.publish(topic, payload, qos, retain, properties=_to_paho(props))
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        self._kick()
        if on_ack is not None and qos > 0:
            with self._lock:
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._acks[info.mid] = on_ack
            if early is not None:
                on_ack(early)
        if wait_s is not None and qos > 0:
            try:
                info.wait_for_publish(wait_s)
            except (RuntimeError, ValueError) as e:
                raise BrokerError(f"publish to {topic!r} failed: {e}") from None
            if not info.is_published():
                raise BrokerError(f"no PUBACK for {topic!r} within {wait_s:.1f} s")
            with self._lock:
                refused = self._refused_pubs.pop(info.mid, None)
            if refused is not None:
                raise BrokerError(f"the broker refused {self.identity} the publish to "
                                  f"{topic!r}: {refused}")
        return info.mid

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            cast(socket.socket, sock).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as e:  # e.g. a unix socket or a websocket wrapper
            log.debug("cannot set TCP_NODELAY: %s", e)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            # paho retries on its own: say it once, not on every retry
            level = logging.ERROR if self.refusal != str(rc) else logging.DEBUG
            self.refusal = str(rc)
            log.log(level, "broker %s refused the connection of %s: %s", self.url.host,
                    self.identity, rc)
            return
        self.refusal = None
        self.tls_refusal = None
        log.info("connected to mqtt://%s:%d as %s", self.url.host, self.url.port,
                 self.client_id)
        with self._lock:
            subs = list(self._handlers.items())
            self._pending_subs.clear()
            self._sub_mids.clear()  # SUBACKs of a dead connection never come
            if not subs:
                self._subscribed.set()
        # With clean_start the broker forgot our subscriptions; without it, it may still have
        # them, but subscribing again is harmless and covers an expired session.
        for topic_filter, (_, qos) in subs:
            self._send_subscribe(topic_filter, qos)
        self._connected.set()
        self._notify(True)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        was = self.connected
        self._connected.clear()
        self._subscribed.clear()
        with self._lock:
            self._acks.clear()  # those PUBACKs will never come; callers see the disconnect
            self._early_acks.clear()
        self._set_reconnect_delay()
        if not was:
            self._tls_refused()
        else:  # an error that ended a working connection says nothing about the certificate
            self._client.tls_error = None
        if was:
            if not self._stopping:
                log.warning("lost the broker at %s:%d: %s", self.url.host, self.url.port, rc)
            self._notify(False)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._tls_refused()

    def _tls_refused(self) -> None:
        """After a connection that never got its CONNACK: a TLS error on it (the broker's
        alert: Mosquitto sends `certificate revoked` / `certificate expired` when its CRL or
        the dates refuse a client certificate) becomes an ERROR naming the likely cause,
        logged once, not on every retry."""
        err = self._client.tls_error
        self._client.tls_error = None
        if err is None or "alert" not in err.lower():  # an alert is the broker's own word
            return
        low = err.lower()
        cause = ("it is revoked: the fleet's CRL lists it" if "revoked" in low
                 else "it has expired" if "expired" in low
                 else "another CA signed it" if "unknown ca" in low
                 else "the broker wants one and none was given" if "required" in low
                 else "revoked, expired or not from the broker's CA?")
        where = f"{self.url.host}:{self.url.port}"
        msg = (f"the MQTT broker at {where} refused the TLS certificate of {self.identity} "
               f"({cause}): {err}; issue it a new certificate (edge-fleet provision for a device) "
               "and install it")
        level = logging.ERROR if msg != self.tls_refusal else logging.DEBUG
        self.tls_refusal = msg
        log.log(level, "%s", msg)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        t = time.perf_counter()
        p = msg.properties
        if isinstance(p, _Decoded):  # the fast path (_Client._handle_publish)
            props = p.decoded
        else:  # paho's decoder: a packet the fast path left to it
            props = PublishProps(
                response_topic=getattr(p, "ResponseTopic", None),
                correlation_data=getattr(p, "CorrelationData", None),
                message_expiry_s=getattr(p, "MessageExpiryInterval", None),
                user=tuple(getattr(p, "UserProperty", ())),
            )
        message = Message(msg.topic, bytes(msg.payload), props, t)
        with self._lock:
            handlers = [h for f, (h, _) in self._handlers.items() if _matches(f, msg.topic)]
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", msg.topic)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        with self._lock:
            if rc.is_failure:  # Not authorized (ACL), quota exceeded, …
                self._refused_pubs[mid] = str(rc)
                if len(self._refused_pubs) > 1024:
                    self._refused_pubs.pop(next(iter(self._refused_pubs)))
            cb = self._acks.pop(mid, None)
            if cb is None:
                self._early_acks[mid] = rc.value
                if len(self._early_acks) > 1024:  # acks for publishes that wanted none
                    self._early_acks.pop(next(iter(self._early_acks)))
        if cb is not None:
            try:
                cb(rc.value)
            except Exception:
                log.exception("PUBACK callback failed")

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        with self._lock:
            topic_filter = self._sub_mids.pop(mid, "?")
            for rc in rcs:
                if rc.is_failure:
                    self.refused_filters[topic_filter] = str(rc)
                    log.error("the broker refused %s the subscription to %s: %s",
                              self.identity, topic_filter, rc)
                else:
                    self.refused_filters.pop(topic_filter, None)
            self._pending_subs.discard(mid)
            if not self._pending_subs:
                self._subscribed.set()

    # -- helpers ----------------------------------------------------------------------------

    def _kick(self) -> None:
        """With the I/O on an asyncio loop, get what was just queued written: at once when
        called on the loop (not one iteration later), else by the loop. From another thread
        paho's register-write flag alone could lose that wake-up (it is checked here while
        the loop thread clears it)."""
        if self._driver is None:
            return
        if self._driver.on_loop():
            self._driver.flush()
        else:
            self._driver.flush_soon()

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subs.add(mid)
                self._sub_mids[mid] = topic_filter
        self._kick()

    def _set_reconnect_delay(self) -> None:
        lo, hi = self._reconnect
        # paho waits this long before the first retry, then doubles up to `hi`. It reads the
        # values as seconds and sleeps on them, so a float is fine despite the int hint.
        delay = cast(int, lo * random.uniform(0.5, 1.5))
        self._client.reconnect_delay_set(delay, cast(int, hi))

    def _notify(self, up: bool) -> None:
        if self._on_connection is not None:
            try:
                self._on_connection(up)
            except Exception:
                log.exception("connection callback failed")


def _matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]  # $share/{group}/{filter}
    return paho.topic_matches_sub(topic_filter, topic)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _to_paho(props: PublishProps | None) -> Properties | None:
    return None if props is None else _Packed(mqtt_props.encode(props))


class _Packed(Properties):
    """Properties packed by mqtt_props: paho calls only `pack()` on a PUBLISH's properties
    (also when it resends one after a reconnect), so the block is built once, without
    paho's per-name walk. Properties.__init__ is skipped on purpose: it alone costs ~20 µs."""

    def __init__(self, packed: bytes) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        return cast(bytes, object.__getattribute__(self, "_packed"))

    def __str__(self) -> str:  # paho logs properties when its debug log is on
        return f"[packed: {len(self.pack())} bytes]"


class _Decoded(Properties):
    """A received PUBLISH's properties, decoded by mqtt_props (see _Client)."""

    def __init__(self, props: PublishProps) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_decoded", props)

    @property
    def decoded(self) -> PublishProps:
        return cast(PublishProps, object.__getattribute__(self, "_decoded"))

    def __str__(self) -> str:
        return str(self.decoded)


class _Client(paho.Client):
    """paho's client with a fast decoder for received MQTT 5 PUBLISH packets at QoS 0/1.

    It overrides one private method, `_handle_publish` (the same in paho 2.0–2.2, hence the
    pin `paho-mqtt>=2.0,<2.3` in pyproject.toml), and hands every packet the fast path does
    not take (QoS 2, topic aliases, anything malformed) to paho's own.
    tests/mqtt/test_mqtt_props.py checks that the fast path is the one in use. It also wraps
    `reconnect` and the private `_sock_recv` to keep the TLS error paho only logs.
    """

    fast_publishes = 0
    """PUBLISH packets this client decoded itself (for tests and curiosity)."""

    tls_error: str | None = None
    """The last TLS error on this client's socket (paho only logs it), for MqttClient to
    say why the broker refused it."""

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except ssl.SSLError as e:  # a handshake the broker ended with an alert
            self.tls_error = str(e)
            raise

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho turns SSLWantRead/Write into BlockingIOError first: what is left is real
        try:
            return super()._sock_recv(bufsize)
        except ssl.SSLError as e:
            self.tls_error = str(e)
            raise

    def _handle_publish(self) -> MQTTErrorCode:
        if self._protocol != paho.MQTTv5:
            return super()._handle_publish()
        pkt = self._in_packet
        p = mqtt_props.decode_publish(pkt["command"], pkt["packet"])
        if p is None:
            return super()._handle_publish()
        self.fast_publishes += 1
        message = paho.MQTTMessage(mid=p.mid, topic=p.topic.encode())
        message.dup, message.qos, message.retain = p.dup, p.qos, p.retain
        message.properties = _Decoded(p.props)
        message.payload = p.payload
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if p.qos == 1 and not self._manual_ack:
            return self._send_puback(p.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
