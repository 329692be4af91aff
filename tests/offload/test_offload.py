"""Offload end to end on a real Mosquitto: device client ↔ broker ↔ cloud worker(s).

Nothing is mocked: each test starts its own broker (mqtt_fixtures.py). Workers run in this
process where the test is about the protocol, and as `edge-runtime cloud-worker` processes
where one must be killed. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from live_server import wait_until
from mqtt_fixtures import Broker

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.cloud.worker import CloudWorker
from edge_runtime.errors import (
    OffloadError,
    OffloadRemoteError,
    OffloadTimeoutError,
    OffloadUnavailableError,
)
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.mqtt.client import MqttClient
from edge_runtime.mqtt.types import PublishProps
from edge_runtime.offload import client as offload
from edge_runtime.offload.breaker import BreakerConfig, CircuitBreaker, State
from edge_runtime.offload.client import OffloadClient
from edge_runtime.offload.messages import OffloadChunk
from edge_runtime.signing import load_public_key

CHAT: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "max_tokens": 16,
    "temperature": 0,
}


async def collect(client: OffloadClient, body: dict[str, Any], endpoint: str = "chat",
                  timeout_s: float = 10.0, stream: bool = True) -> list[OffloadChunk]:
    s = client.submit(body, endpoint, time.monotonic() + timeout_s, stream=stream)
    return [c async for c in s]


@pytest.fixture
def device(broker: Broker) -> Iterator[OffloadClient]:
    breaker = CircuitBreaker(BreakerConfig(min_requests=2, open_s=0.3))
    client = OffloadClient(broker.url, "dev1", breaker=breaker, reconnect_min_s=0.1,
                           reconnect_max_s=0.5)
    assert client.start(wait_s=10)
    yield client
    client.stop()


def echo_worker(broker: Broker, **kw: Any) -> CloudWorker:
    w = CloudWorker(broker.url, None, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)
    assert w.start(wait_s=10)
    return w


@pytest.fixture(scope="module")
def local_gen(tiny_bundle: Any) -> Generator:
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    return Generator.from_bundle(bundle, threads=1)


@pytest.fixture
def model_worker(broker: Broker, tiny_bundle: Any) -> Iterator[CloudWorker]:
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    w = CloudWorker(broker.url, lambda: Generator.from_bundle(bundle, threads=1))
    assert w.start(wait_s=10)
    yield w
    w.stop()


# -- the protocol, with a real model ------------------------------------------------------


def test_offloaded_text_equals_local_greedy(model_worker: CloudWorker, device: OffloadClient,
                                            local_gen: Generator) -> None:
    ids = local_gen.chat_prompt(CHAT["messages"])
    local = local_gen.generate(ids, SamplingParams(max_tokens=16, temperature=0.0))
    chunks = asyncio.run(collect(device, CHAT))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(c.served_by == "cloud" for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert "".join(c.text for c in chunks) == local.text
    assert last.finish_reason == local.finish_reason
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        len(ids), local.stats.completion_tokens)
    lat = device.latency()
    assert lat.samples == 1 and lat.first_p99_s is not None and lat.last_p99_s is not None
    assert 0 < lat.first_p99_s <= lat.last_p99_s


def test_completions_not_streamed_is_one_chunk(model_worker: CloudWorker, device: OffloadClient,
                                               local_gen: Generator) -> None:
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 0}
    local = local_gen.generate(local_gen.text_prompt("Once upon"),
                               SamplingParams(max_tokens=8, temperature=0.0))
    chunks = asyncio.run(collect(device, body, "completions", stream=False))
    assert len(chunks) == 1 and chunks[0].seq == 0
    assert chunks[0].text == local.text and chunks[0].finish_reason == local.finish_reason


def test_mosquitto_rr_calls_the_worker(model_worker: CloudWorker, broker: Broker) -> None:
    rr = shutil.which("mosquitto_rr")
    if rr is None:
        pytest.skip("mosquitto_rr is not installed (apt-get install mosquitto-clients)")
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    out = subprocess.run(
        [rr, "-V", "5", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-W", "10",
         "-t", "edge/rr-dev/offload/req", "-e", "edge/rr-dev/offload/res/cli", "-m", body],
        capture_output=True, text=True, timeout=20, check=True,
    )
    answer = json.loads(out.stdout)
    assert answer["v"] == 1 and answer["seq"] == 0 and answer["served_by"] == "cloud"
    assert answer["finish_reason"] in ("stop", "length") and isinstance(answer["text"], str)
    assert answer["usage"]["completion_tokens"] <= 5
    assert answer["usage"]["total_tokens"] == (answer["usage"]["prompt_tokens"]
                                               + answer["usage"]["completion_tokens"])


def test_malformed_body_gets_an_error_chunk_not_a_breaker_failure(
        model_worker: CloudWorker, device: OffloadClient) -> None:
    bad = {**CHAT, "temperature": "hot"}
    for _ in range(3):  # more than min_requests: the breaker must stay closed
        with pytest.raises(OffloadRemoteError) as e:
            asyncio.run(collect(device, bad))
        assert e.value.type == "invalid_request_error" and "temperature" in str(e.value)
    assert device.breaker.state is State.CLOSED
    assert model_worker.counts["invalid"] == 3


# -- the protocol, on the echo worker ------------------------------------------------------


def test_expired_request_is_dropped_not_served(broker: Broker) -> None:
    w = echo_worker(broker)
    got: list[bytes] = []
    c = MqttClient(broker.url, "raw")
    try:
        c.subscribe("edge/d/offload/res/s", lambda m: got.append(m.payload))
        assert c.start(wait_s=5) and c.wait_subscribed(5)
        past_ms = int(time.time() * 1000) - 50
        props = PublishProps(response_topic="edge/d/offload/res/s", correlation_data=b"1",
                             message_expiry_s=5, user=(("deadline_ms", str(past_ms)),))
        c.publish("edge/d/offload/req", json.dumps(CHAT).encode(), props, wait_s=5)
        wait_until(lambda: w.counts["expired"] == 1, 5)
        time.sleep(0.2)
        assert got == [] and w.counts["served"] == 0
    finally:
        c.stop()
        w.stop()


def test_round_trips_are_kept_per_generation_length(broker: Broker,
                                                    device: OffloadClient) -> None:
    w = echo_worker(broker)
    try:
        async def run() -> None:
            for tokens, n in ((8, 6), (16, 2), (200, 5), (None, 5)):
                body = {**CHAT, "max_tokens": tokens} if tokens else {
                    k: v for k, v in CHAT.items() if k != "max_tokens"}
                for _ in range(n):
                    assert (await collect(device, body))[-1].final
        asyncio.run(run())
        # 8 and 16 share the 16 bucket; 200 is in 256; an unknown length stays out.
        table = device.p99_by_tokens()
        assert [b for b, _ in table] == [16, 256]
        assert device.latency(9).samples == 8 and device.latency(129).samples == 5
        assert device.latency().samples == 18
    finally:
        w.stop()


def test_two_workers_on_one_shared_subscription_split_the_load(
        broker: Broker, device: OffloadClient) -> None:
    a, b = echo_worker(broker), echo_worker(broker)
    try:
        async def many() -> None:
            for _ in range(20):
                chunks = await collect(device, CHAT)
                assert chunks[-1].finish_reason == "length"
        asyncio.run(many())
        # A worker counts an answer just after publishing it: the last count may trail the
        # answer's arrival here by a moment.
        wait_until(lambda: a.counts["served"] + b.counts["served"] == 20, 2.0)
        assert a.counts["served"] > 0 and b.counts["served"] > 0
    finally:
        a.stop()
        b.stop()


def test_no_worker_is_a_fast_unavailable_and_opens_the_breaker(
    device: OffloadClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long connected: the grace after a (re)connect is over.
    monkeypatch.setattr(offload, "RESUBSCRIBE_GRACE_S", 0.0)
    # Mosquitto acks with "no matching subscribers": no need to wait for the deadline.
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(OffloadUnavailableError, match="no cloud worker"):
            asyncio.run(collect(device, CHAT, timeout_s=10))
        assert time.monotonic() - t0 < 1.0
    assert device.breaker.state is State.OPEN and not device.available()
    with pytest.raises(OffloadUnavailableError, match="breaker"):
        asyncio.run(collect(device, CHAT))


def test_no_worker_yet_after_a_broker_restart_is_no_verdict(
    broker: Broker, device: OffloadClient
) -> None:
    """Workers reconnect to a restarted broker on their own backoff: a device that is back
    first gets "no matching subscribers" for a moment. That request cannot go (a fast,
    explicit unavailable), but the breaker must not reopen for its open interval: the first
    request after a worker is back is served."""
    broker.kill()
    wait_until(lambda: device.breaker.state is State.OPEN, 1.0)
    broker.start()
    wait_until(device.available, 10)  # reconnected: half-open, probing at once
    t0 = time.monotonic()
    with pytest.raises(OffloadUnavailableError, match="no cloud worker"):
        asyncio.run(collect(device, CHAT, timeout_s=10))
    assert time.monotonic() - t0 < 1.0
    assert device.breaker.state is State.HALF_OPEN and device.available()
    w = echo_worker(broker)
    try:
        chunks = asyncio.run(collect(device, CHAT))  # the probe goes through and closes it
        assert chunks[-1].finish_reason == "length"
        assert device.breaker.state is State.CLOSED
    finally:
        w.stop()


def test_deadline_is_explicit(broker: Broker, device: OffloadClient) -> None:
    w = echo_worker(broker)
    w.stop()  # unsubscribed, but a raw subscriber swallows requests without answering
    sink = MqttClient(broker.url, "sink")
    sink.subscribe("$share/cloud/edge/+/offload/req", lambda m: None)
    assert sink.start(wait_s=5) and sink.wait_subscribed(5)
    try:
        t0 = time.monotonic()
        with pytest.raises(OffloadTimeoutError):
            asyncio.run(collect(device, CHAT, timeout_s=0.3))
        assert 0.25 < time.monotonic() - t0 < 1.0
        assert device.in_flight == 0
        # The timeout counts in the cloud's p99 at the time it took (CHAT asks 16 tokens).
        lat = device.latency(16)
        assert lat.samples == 1 and lat.last_p99_s is not None and lat.last_p99_s >= 0.25
        assert device.latency(17).samples == 0
    finally:
        sink.stop()


# -- faults ---------------------------------------------------------------------------------


def test_broker_killed_then_restarted(broker: Broker, device: OffloadClient) -> None:
    w = echo_worker(broker)
    try:
        asyncio.run(collect(device, CHAT))
        broker.kill()
        t0 = time.monotonic()
        # The connection is seen lost a moment before the disconnect callback trips the
        # breaker (paho's thread): wait for both, within the second.
        wait_until(lambda: not device.available() and device.breaker.state is State.OPEN, 1.0)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(OffloadUnavailableError):  # at once, no timeout
            asyncio.run(collect(device, CHAT))
        broker.start()
        wait_until(device.available, 10)
        assert w.mqtt.wait_subscribed(10)
        chunks = asyncio.run(collect(device, CHAT))  # the half-open probe closes it
        assert chunks[-1].finish_reason == "length"
        assert device.breaker.state is State.CLOSED
    finally:
        w.stop()


def _spawn_worker(broker: Broker, tiny_bundle: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "import sys; from edge_runtime.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "cloud-worker", "--bundle", str(tiny_bundle.path),
           "--pubkey", str(tiny_bundle.pubkey), "--broker", broker.url, "--threads", "1",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def test_one_of_two_workers_killed_mid_request(broker: Broker, device: OffloadClient,
                                               tiny_bundle: Any) -> None:
    procs = [_spawn_worker(broker, tiny_bundle) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert "subscribed" in p.stdout.readline()
        deadline_s = 3.0
        body = {**CHAT, "max_tokens": 200}

        async def run_all() -> list[object]:
            async def one() -> object:
                try:
                    return await collect(device, body, timeout_s=deadline_s)
                except OffloadError as e:
                    return e
            tasks = [asyncio.ensure_future(one()) for _ in range(6)]
            await asyncio.sleep(0.05)  # both workers have taken requests by now
            procs[0].kill()
            return await asyncio.gather(*tasks)

        t0 = time.monotonic()
        results = asyncio.run(run_all())
        assert time.monotonic() - t0 < deadline_s + 0.5  # nothing hangs past its deadline
        answered = [r for r in results if isinstance(r, list)]
        failed = [r for r in results if isinstance(r, OffloadError)]
        assert len(answered) + len(failed) == 6
        assert answered, "the surviving worker answered nothing"
        assert all(r[-1].final and r[-1].error is None for r in answered)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


# -- the client's MQTT I/O on the caller's event loop (as the daemon runs it) ----------------


def test_on_loop_round_trip_and_broker_restart(broker: Broker) -> None:
    """start(loop=...): no paho thread; requests, answers, PUBACKs, keepalive and reconnects
    all on the loop that submits. The broker dies and comes back: the breaker opens at once
    and the client recovers by itself."""
    w = echo_worker(broker)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # open_s far beyond the test: recovery comes from the reconnect (probe_now), not
        # from waiting out the open interval.
        breaker = CircuitBreaker(BreakerConfig(min_requests=2, open_s=60.0))
        client = OffloadClient(broker.url, "dev1", breaker=breaker, reconnect_min_s=0.1,
                               reconnect_max_s=0.5)
        client.start(loop=loop)
        with pytest.raises(ValueError, match="block the loop"):
            client.mqtt.start(wait_s=1, loop=loop)
        try:
            assert await loop.run_in_executor(None, client.mqtt.wait_subscribed, 10.0)
            assert client.mqtt._client._thread is None  # type: ignore[attr-defined]
            for _ in range(5):
                chunks = [c async for c in client.submit(CHAT, "chat", time.monotonic() + 5)]
                assert chunks[-1].finish_reason == "length"
            assert client.latency().samples == 5
            await loop.run_in_executor(None, broker.kill)
            t0 = time.monotonic()
            while client.available():
                assert time.monotonic() - t0 < 1.0, "the breaker did not open within 1 s"
                await asyncio.sleep(0.01)
            with pytest.raises(OffloadUnavailableError):
                client.submit(CHAT, "chat", time.monotonic() + 5)
            await loop.run_in_executor(None, broker.start)
            t0 = time.monotonic()
            while not (client.available() and w.mqtt.wait_subscribed(0)):
                assert time.monotonic() - t0 < 10, "no reconnect within 10 s"
                await asyncio.sleep(0.05)
            chunks = [c async for c in client.submit(CHAT, "chat", time.monotonic() + 5)]
            assert chunks[-1].finish_reason == "length"
            assert client.breaker.state is State.CLOSED
        finally:
            client.stop()
        assert not client.mqtt.connected

    try:
        asyncio.run(scenario())
    finally:
        w.stop()


def test_cloud_round_trips_age_out_so_a_slow_spell_is_not_forever():
    """A cloud that timed out once must get another chance: once nothing is offloaded no
    new sample comes, so old round trips stop counting after `latency_max_age_s` and the
    scheduler falls back to the prior (and tries again)."""
    now = [1000.0]
    client = OffloadClient("mqtt://127.0.0.1:1", "dev1", latency_max_age_s=30.0,
                           clock=lambda: now[0])
    for _ in range(5):
        client._observe(32, 0.1, 2.0)  # five slow (timed-out) round trips
    assert client.p99_by_tokens() == ((32, 2.0),)
    assert client.latency(32).samples == 5
    now[0] += 29.0
    assert client.p99_by_tokens() == ((32, 2.0),)  # still recent
    client._observe(32, 0.1, 0.2)
    now[0] += 2.0  # the five slow ones are 31 s old, the fast one 2 s
    assert client.p99_by_tokens() == ()  # one sample is too few for a bucket
    lat = client.latency(32)
    assert (lat.samples, lat.last_p99_s) == (1, 0.2)
    now[0] += 31.0
    assert client.latency().samples == 0 and client.latency().last_p99_s is None
