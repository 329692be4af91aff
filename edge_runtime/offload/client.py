"""The daemon's side of cloud offload: one MQTT connection, many requests in flight.

    scheduler ── available()? p99 for its length < remaining deadline? ──▶ submit(...)
    submit ─▶ breaker.allow ─▶ PUBLISH edge/{device}/offload/req (QoS 1, correlation id)
    chunk on edge/{device}/offload/res/{session} ─▶ OffloadStream (on its loop: directly
    when the MQTT I/O runs on that loop, else via call_soon_threadsafe from paho's thread)
    ─▶ reorders by seq, drops duplicates ─▶ async for chunk in stream

Every request ends in exactly one outcome for the breaker: the last chunk (success), an error
chunk, the deadline (OffloadTimeoutError), a lost broker (OffloadUnavailableError, and the
breaker trips at once), a worker with no room for it (`worker_busy`: no verdict) or the
caller's `cancel()` (no verdict). While the breaker is open, `submit` raises
OffloadUnavailableError without touching the network: a dead cloud costs one fast decision,
not a timeout per request. Round trips are kept and read in latency.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from edge_runtime.config import OffloadConfig
from edge_runtime.errors import (
    BrokerError,
    ConfigError,
    MessageError,
    OffloadRemoteError,
    OffloadTimeoutError,
    OffloadUnavailableError,
)
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import (
    NO_MATCHING_SUBSCRIBERS,
    Message,
    MqttClient,
    broker_credentials,
)
from edge_runtime.offload.breaker import BreakerConfig, CircuitBreaker
from edge_runtime.offload.latency import LatencyStats, RoundTrips, length_bucket
from edge_runtime.offload.messages import OffloadChunk, OffloadRequest, decode_chunk, encode_request

__all__ = ["CLIENT_ERRORS", "LatencyStats", "OffloadClient", "OffloadStream", "length_bucket"]

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 2.0
"""The offload connection's longest wait between two reconnect attempts (MqttClient: 30 s)."""
RESUBSCRIBE_GRACE_S = 3.0
"""After this client (re)connects, "no matching subscribers" is not held against the cloud for
this long: cloud workers reconnect to a restarted broker on their own backoff (≤ 1 s)."""

# Errors that are the request's fault, not the cloud's: they must not open the breaker.
CLIENT_ERRORS = frozenset({"invalid_request_error"})
BUSY_CODES = frozenset({"worker_busy"})
"""A worker that has no room, or cannot finish in time, says so at once: the device refuses
the request (429), and the breaker, which is there to spot a broken cloud, is not told."""


class OffloadStream:
    """The chunks of one offloaded request, in order. Consume it on the loop that made it."""

    def __init__(
        self, client: OffloadClient, request_id: str, deadline: float, max_tokens: int = 0
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.max_tokens = max_tokens
        """The generation length asked for (0: unknown): the latency bucket it counts in."""
        self.loop = asyncio.get_running_loop()
        self.published_at = 0.0
        self.first_at: float | None = None
        self.duplicates = 0
        self._client = client
        # A deque and one waiter future rather than asyncio.Queue + wait_for: wait_for makes
        # a Task per chunk, tens of µs on a round trip that should take well under a ms.
        self._events: collections.deque[OffloadChunk | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._next = 0
        self._held: dict[int, OffloadChunk] = {}  # arrived ahead of a missing seq
        self.done = False

    def __aiter__(self) -> OffloadStream:
        return self

    async def __anext__(self) -> OffloadChunk:
        if self.done and not self._events:
            raise StopAsyncIteration
        try:
            if not self._events:
                await self._wait(self.deadline - self._client.clock())
            item = self._events.popleft()
        except asyncio.TimeoutError:
            if not self.done:
                self._end(ok=False)
                # A timed-out round trip took at least this long: it counts in the p99 (the
                # successes alone would make a cloud that times out look fast).
                waited = time.perf_counter() - self.published_at
                self._client._observe(self.max_tokens, waited, waited)
            missing = f"; chunk {self._next} never came" if self._held else ""
            raise OffloadTimeoutError(
                f"offload {self.request_id}: no complete answer before its deadline "
                f"({self._next} chunks received{missing})"
            ) from None
        if isinstance(item, BaseException):
            raise item
        if item.error is not None:
            raise OffloadRemoteError(item.error.message, item.error.type, item.error.code)
        return item

    async def _wait(self, remaining: float) -> None:
        """Until an event arrives; TimeoutError after `remaining` seconds."""
        if remaining <= 0:
            raise asyncio.TimeoutError
        fut = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(remaining, _set_timeout, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def _put(self, item: OffloadChunk | BaseException) -> None:
        self._events.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def cancel(self) -> None:
        """The caller stops listening (its client left): forget the request, no verdict."""
        if not self.done:
            self.done = True
            self._client._forget(self, outcome=None)

    async def aclose(self) -> None:
        self.cancel()

    # -- called on the loop, via call_soon_threadsafe from paho's thread ------------------

    def _feed(self, chunk: OffloadChunk) -> None:
        if self.done:
            return
        if chunk.seq < self._next or chunk.seq in self._held:
            self.duplicates += 1  # QoS 1 may deliver twice after a reconnect
            return
        self._held[chunk.seq] = chunk
        while self._next in self._held:
            c = self._held.pop(self._next)
            self._next += 1
            if self.first_at is None:
                self.first_at = c.received_at
            self._put(c)
            if c.final:
                if c.error is not None and c.error.code in BUSY_CODES:
                    self._end(ok=None)  # a full cloud is not a broken one: no verdict
                    return
                remote_fault = c.error is not None and c.error.type not in CLIENT_ERRORS
                self._end(ok=not remote_fault, last_at=c.received_at)
                return

    def _fail(self, error: BaseException, verdict: bool = True) -> None:
        """End with `error`; a failure of the cloud unless `verdict` is False."""
        if not self.done:
            self._put(error)
            self._end(ok=False if verdict else None)

    def _end(self, ok: bool | None, last_at: float | None = None) -> None:
        self.done = True
        self._client._forget(self, outcome=ok)
        if ok and last_at is not None and self.first_at is not None:
            self._client._observe(self.max_tokens, self.first_at - self.published_at,
                                  last_at - self.published_at)


class OffloadClient:
    """One per daemon: a session id, a response topic, the breaker and the latency window."""

    def __init__(
        self,
        broker_url: str,
        device: str,
        *,
        breaker: CircuitBreaker | None = None,
        latency_window: int = 256,
        latency_max_age_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        **mqtt_options: Any,
    ) -> None:
        """`mqtt_options` go to MqttClient (username, password, tls, keepalive_s, ...)."""
        self.device = topics.check_device(device)
        self.session = secrets.token_hex(6)
        self.request_topic = topics.offload_request(device)
        self.response_topic = topics.offload_response(device, self.session)
        self.breaker = breaker or CircuitBreaker(BreakerConfig(), clock)
        self.clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()  # the breaker and _pending are shared with paho's thread
        self._pending: dict[bytes, OffloadStream] = {}
        self._tripped_by_disconnect = False
        self._connected_at = -float("inf")
        self.round_trips = RoundTrips(latency_window, latency_max_age_s, clock)
        self.counts: collections.Counter[str] = collections.Counter()
        # Back soon after the broker: meanwhile every overloaded request is refused. One
        # connection per device, retried at most every ~2 s (with jitter), is light for a
        # broker cluster; the agent's session (fleet) keeps the long default.
        mqtt_options.setdefault("reconnect_max_s", RECONNECT_MAX_S)
        self.mqtt = MqttClient(
            broker_url,
            f"edge-{device}-{self.session}",
            on_connection=self._on_connection,
            **mqtt_options,
        )
        self.mqtt.subscribe(self.response_topic, self._on_response)

    @classmethod
    def from_config(cls, cfg: OffloadConfig) -> OffloadClient:
        """The daemon's client from its [offload] section; ConfigError if it has no broker."""
        if cfg.broker is None:
            raise ConfigError("offload.broker is not set: cloud offload is off")
        password, tls = broker_credentials("offload", cfg.password_file, cfg.ca_file,
                                           cfg.cert_file, cfg.key_file)
        breaker = CircuitBreaker(BreakerConfig(
            failure_rate=cfg.failure_rate, window_s=cfg.window_s,
            min_requests=cfg.min_requests, open_s=cfg.open_s, probes=cfg.half_open_probes))
        device = cfg.device_id or socket.gethostname().split(".")[0]
        return cls(cfg.broker, device, breaker=breaker, latency_window=cfg.latency_window,
                   username=cfg.username, password=password, tls=tls,
                   keepalive_s=cfg.keepalive_s)

    def start(
        self, wait_s: float | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> bool:
        """Connect in the background; with `wait_s`, wait until subscribed (True) or not.

        Pass the event loop that calls `submit` (the daemon's) as `loop`: the MQTT I/O then
        runs on it and answers reach their streams without crossing threads (see
        mqtt/loop.py). Without it, paho's own thread does the I/O (any loop may submit).
        """
        self.mqtt.start(loop=loop)
        return self.mqtt.wait_subscribed(wait_s) if wait_s is not None else self.mqtt.connected

    def stop(self) -> None:
        self.mqtt.stop()
        self._fail_all(OffloadUnavailableError("the offload client stopped"))

    # -- what the scheduler reads -----------------------------------------------------------

    def available(self) -> bool:
        """Would a submit now go out? False while disconnected or the breaker is open."""
        with self._lock:
            return self.mqtt.connected and self.breaker.available()

    def latency(self, max_tokens: int | None = None) -> LatencyStats:
        """Round trips of recent offloads (successes, and timeouts at the time they took):
        all of them, or those in the generation-length bucket of `max_tokens`."""
        return self.round_trips.stats(max_tokens)

    def p99_by_tokens(self, min_samples: int = 5) -> tuple[tuple[int, float], ...]:
        """(bucket's max_tokens, p99 publish → last chunk) per generation-length bucket with
        at least `min_samples` round trips: scheduler.CloudState's table."""
        return self.round_trips.p99_by_tokens(min_samples)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- submit -----------------------------------------------------------------------------

    def submit(
        self,
        body: Mapping[str, Any],
        endpoint: str,
        deadline: float,
        stream: bool = True,
        request_id: str | None = None,
        max_tokens: int | None = None,
    ) -> OffloadStream:
        """Publish one request; iterate the result for its chunks. Call on the event loop.

        `deadline` is on this client's clock (time.monotonic() by default), like
        serving.Request.deadline. Raises at once: OffloadUnavailableError (not connected,
        breaker open), OffloadTimeoutError (deadline already passed), MessageError (body).
        """
        now = self.clock()
        if deadline <= now:
            raise OffloadTimeoutError("the request's deadline passed before it was offloaded")
        request_id = request_id or secrets.token_hex(8)
        corr = request_id.encode()
        deadline_ms = int((self._wall() + (deadline - now)) * 1000)
        payload, props = encode_request(
            OffloadRequest(body, endpoint, self.device, deadline_ms, stream,
                           self.response_topic, corr),
            now_ms=int(self._wall() * 1000),
        )
        if max_tokens is None:  # what the body asks for; 0 (unknown) if it leaves it open
            asked = body.get("max_completion_tokens", body.get("max_tokens"))
            max_tokens = asked if isinstance(asked, int) and asked > 0 else 0
        s = OffloadStream(self, request_id, deadline, max_tokens)
        with self._lock:
            if not self.mqtt.connected:
                self.counts["unavailable"] += 1
                raise OffloadUnavailableError("not connected to the MQTT broker")
            if not self.breaker.allow():
                self.counts["unavailable"] += 1
                raise OffloadUnavailableError("the cloud circuit breaker is open")
            if corr in self._pending:
                self.breaker.release()
                raise MessageError(f"request id {request_id!r} is already in flight")
            self._pending[corr] = s
        self.counts["submitted"] += 1
        s.published_at = time.perf_counter()
        try:
            self.mqtt.publish(self.request_topic, payload, props, qos=1,
                              on_ack=lambda rc: self._on_ack(s, rc))
        except BrokerError as e:  # the connection dropped a moment ago
            s.done = True
            self._forget(s, outcome=False)
            raise OffloadUnavailableError(str(e)) from None
        return s

    # -- internals --------------------------------------------------------------------------

    def _forget(self, s: OffloadStream, outcome: bool | None) -> None:
        with self._lock:
            self._pending.pop(s.request_id.encode(), None)
            if outcome is None:
                self.breaker.release()
            elif outcome:
                self.breaker.record_success()
            else:
                self.breaker.record_failure()
        self.counts[{None: "cancelled", True: "ok", False: "failed"}[outcome]] += 1

    def _observe(self, max_tokens: int, first_s: float, last_s: float) -> None:
        self.round_trips.add(max_tokens, first_s, last_s)

    def _on_ack(self, s: OffloadStream, reason: int) -> None:  # paho thread
        if reason == NO_MATCHING_SUBSCRIBERS:
            err = OffloadUnavailableError("no cloud worker is subscribed to offload requests")
            if self.clock() - self._connected_at < RESUBSCRIBE_GRACE_S:
                # Right after a broker restart the workers may not have subscribed again yet
                # (they reconnect on their own backoff): this request cannot go, but a cloud
                # that is still coming back is not a broken one. No verdict, so the next
                # request probes again instead of waiting out a reopened breaker.
                _call_soon(s, lambda e: s._fail(e, verdict=False), err)
                return
        elif reason >= 0x80:
            err = OffloadUnavailableError(f"the broker refused the request (reason {reason})")
        else:
            return
        _call_soon(s, s._fail, err)

    def _on_response(self, msg: Message) -> None:  # paho thread
        corr = msg.props.correlation_data
        with self._lock:
            s = self._pending.get(corr) if corr is not None else None
        if s is None:
            self.counts["late"] += 1  # cancelled, timed out, or not ours
            return
        try:
            chunk = decode_chunk(msg.payload, received_at=msg.received_at)
        except MessageError as e:
            _call_soon(s, s._fail, OffloadRemoteError(f"malformed answer: {e}"))
            return
        _call_soon(s, s._feed, chunk)

    def _on_connection(self, up: bool) -> None:  # paho thread (or the loop)
        if up:
            with self._lock:
                self._connected_at = self.clock()
                if self._tripped_by_disconnect:
                    # Reconnected: the cause of that trip is gone. Probe at once instead of
                    # waiting out the open interval; a failing probe reopens it as usual.
                    self._tripped_by_disconnect = False
                    self.breaker.probe_now()
            return
        with self._lock:
            self.breaker.trip()  # no statistics needed: nothing can reach the cloud now
            self._tripped_by_disconnect = True
        self._fail_all(OffloadUnavailableError("lost the connection to the MQTT broker"))

    def _fail_all(self, error: OffloadUnavailableError) -> None:
        with self._lock:
            streams = list(self._pending.values())
        for s in streams:
            _call_soon(s, s._fail, error)


def _call_soon(s: OffloadStream, fn: Callable[..., None], arg: Any) -> None:
    """Run `fn(arg)` on the stream's loop: at once when already there (the MQTT I/O runs on
    that loop), else handed over."""
    try:
        here = asyncio.get_running_loop() is s.loop
    except RuntimeError:
        here = False
    if here:
        fn(arg)
        return
    # RuntimeError: the loop is closed, so nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        s.loop.call_soon_threadsafe(fn, arg)


def _set_timeout(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())
