"""The cloud worker's engine: token coalescing and one continuous batch, on a real Mosquitto.

The Coalescer is pure (an injected clock); the worker tests run a real broker, a real
worker with the tiny bundle on ONNX Runtime and the daemon's OffloadClient, and compare
with local greedy decoding.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mqtt_fixtures import Broker

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.cloud.coalesce import ChunkPolicy, Coalescer
from edge_runtime.cloud.worker import CloudWorker
from edge_runtime.errors import ConfigError, OffloadRemoteError
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.offload.breaker import BreakerConfig, CircuitBreaker, State
from edge_runtime.offload.client import OffloadClient
from edge_runtime.offload.messages import OffloadChunk
from edge_runtime.signing import load_public_key

PROMPTS = ("Once upon", "import os\n", "def main():", "Tell me a story")


# -- the coalescer (pure) ---------------------------------------------------------------------


def test_first_text_goes_out_at_once_then_every_n_tokens() -> None:
    c = Coalescer(ChunkPolicy(tokens=3, ms=1000.0))
    assert c.add("", 1, now=0.0) is None  # half a character: nothing to show yet
    assert c.add("He", 1, now=0.001) == "He"  # the first text: at once (TTFT)
    assert c.add("l", 1, now=0.002) is None
    assert c.add("l", 1, now=0.003) is None
    assert c.add("o", 1, now=0.004) == "llo"  # 3 tokens pending
    assert not c.pending
    assert c.add(" w", 1, now=0.005) is None
    assert c.take() == " w" and c.take() == ""  # the finish takes the rest


def test_held_tokens_go_out_after_ms_on_add_or_on_due() -> None:
    c = Coalescer(ChunkPolicy(tokens=100, ms=25.0))
    assert c.add("a", 1, now=0.0) == "a"
    assert c.add("b", 1, now=0.010) is None
    assert c.due(now=0.030) is None  # "b" has waited 20 ms
    assert c.due(now=0.0351) == "b"  # 25.1 ms
    assert c.add("c", 1, now=0.040) is None
    assert c.add("d", 1, now=0.066) == "cd"  # the oldest pending one waited 26 ms
    assert c.due(now=10.0) is None  # nothing pending


def test_empty_text_is_never_a_message_and_no_policy_holds_all() -> None:
    c = Coalescer(ChunkPolicy(tokens=2, ms=0.0))
    assert c.add("x", 1, now=0.0) == "x"
    assert c.add("", 1, now=1.0) is None and c.add("", 1, now=2.0) is None  # still no text
    assert c.due(now=3.0) is None and c.pending
    assert c.add("é", 1, now=4.0) == "é"
    whole = Coalescer(None)  # a non-streamed answer: one message at the finish
    for i, t in enumerate("abc"):
        assert whole.add(t, 1, now=float(i)) is None
    assert whole.due(now=99.0) is None and whole.take() == "abc"


@pytest.mark.parametrize("kw, bad", [({"tokens": 0}, "tokens must be >= 1, got 0"),
                                     ({"ms": -1.0}, "ms must be >= 0, got -1.0"),
                                     ({"ms": math.nan}, "ms must be >= 0, got nan")])
def test_bad_policy_is_a_config_error_naming_the_value(kw: dict[str, Any], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        ChunkPolicy(**kw)
    assert not ChunkPolicy(tokens=1).coalesces and not ChunkPolicy(ms=0).coalesces


def test_cli_refuses_a_bad_chunk_flag(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    assert main(["cloud-worker", "--echo", "--broker", broker.url, "--chunk-tokens", "0"]) == 1
    assert "chunk tokens must be >= 1, got 0" in capsys.readouterr().err


# -- a real worker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Any) -> Any:
    return verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])


@pytest.fixture(scope="module")
def local_gen(bundle: Any) -> Generator:
    return Generator.from_bundle(bundle, threads=1)


@pytest.fixture
def device(broker: Broker) -> Iterator[OffloadClient]:
    client = OffloadClient(broker.url, "dev1", reconnect_min_s=0.1, reconnect_max_s=0.5)
    assert client.start(wait_s=10)
    yield client
    client.stop()


def start_worker(broker: Broker, bundle: Any, **kw: Any) -> CloudWorker:
    w = CloudWorker(broker.url, lambda: Generator.from_bundle(bundle, threads=1), **kw)
    assert w.start(wait_s=10)
    return w


async def ask(client: OffloadClient, prompt: str, max_tokens: int,
              stream: bool = True) -> list[OffloadChunk]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    s = client.submit(body, "completions", time.monotonic() + 20, stream=stream)
    return [c async for c in s]


def greedy(gen: Generator, prompt: str, max_tokens: int) -> str:
    return gen.generate(gen.text_prompt(prompt),
                        SamplingParams(max_tokens=max_tokens, temperature=0.0)).text


def test_64_tokens_arrive_in_far_fewer_messages_with_the_same_text(
        broker: Broker, bundle: Any, device: OffloadClient, local_gen: Generator) -> None:
    expected = greedy(local_gen, PROMPTS[0], 64)
    answers = {}
    # A window far longer than the generation: messages are cut by token count alone, so
    # their number is exact whatever the machine's load.
    for policy in (ChunkPolicy(tokens=1), ChunkPolicy(tokens=8, ms=60_000.0)):
        w = start_worker(broker, bundle, chunk=policy)
        try:
            answers[policy.tokens] = asyncio.run(ask(device, PROMPTS[0], 64))
        finally:
            w.stop()
    per_token, coalesced = answers[1], answers[8]
    for chunks in (per_token, coalesced):
        assert "".join(c.text for c in chunks) == expected
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 64
    assert len(per_token) >= 48  # about one message per token
    # The first text alone, then 8 tokens a message, then the finish.
    assert len(coalesced) <= 2 + math.ceil(63 / 8)
    assert coalesced[0].text and len(coalesced[0].text) <= len(coalesced[1].text)


@pytest.mark.parametrize("prefill_chunk", [0, 4])  # whole prompts / a chunk per step
def test_concurrent_requests_decode_in_one_batch_and_match_greedy(
        broker: Broker, bundle: Any, device: OffloadClient, local_gen: Generator,
        prefill_chunk: int) -> None:
    assert max(len(local_gen.text_prompt(p)) for p in PROMPTS) > 4
    w = start_worker(broker, bundle, concurrency=4, prefill_chunk=prefill_chunk)
    try:
        async def all_at_once() -> list[list[OffloadChunk]]:
            return list(await asyncio.gather(*(ask(device, p, 48) for p in PROMPTS)))

        answers = asyncio.run(all_at_once())
        streamed_alone = asyncio.run(ask(device, PROMPTS[1], 48, stream=False))
    finally:
        w.stop()
    for p, chunks in zip(PROMPTS, answers, strict=True):
        assert "".join(c.text for c in chunks) == greedy(local_gen, p, 48)
    assert len(streamed_alone) == 1 and streamed_alone[0].text == greedy(local_gen, PROMPTS[1], 48)
    assert w.peak_batch >= 2, "the four requests never shared a decode step"
    assert w.counts["served"] == 5


def test_a_full_worker_answers_busy_at_once(broker: Broker, bundle: Any,
                                            device: OffloadClient) -> None:
    w = start_worker(broker, bundle, concurrency=1, max_queued=1)
    try:
        async def burst() -> list[object]:
            async def one(p: str) -> object:
                try:
                    return await ask(device, p, 200)
                except OffloadRemoteError as e:
                    return e
            return list(await asyncio.gather(*(one(p) for p in PROMPTS * 2)))

        results = asyncio.run(burst())
    finally:
        w.stop()
    busy = [r for r in results if isinstance(r, OffloadRemoteError)]
    assert busy and all(e.code == "worker_busy" for e in busy)
    assert w.counts["busy"] == len(busy) and w.counts["served"] == 8 - len(busy)
    assert w.peak_batch == 1  # bounded: never more than `concurrency` decode together


def test_bad_worker_settings_are_config_errors(broker: Broker) -> None:
    with pytest.raises(ConfigError, match="concurrency must be >= 1, got 0"):
        CloudWorker(broker.url, None, concurrency=0)
    with pytest.raises(ConfigError, match="max_queued must be >= 1, got 0"):
        CloudWorker(broker.url, None, max_queued=0)
    with pytest.raises(ConfigError, match=r"prefill_chunk must be >= 0 \(0: off\), got -1"):
        CloudWorker(broker.url, None, prefill_chunk=-1)


def test_a_deadline_passing_mid_generation_is_an_explicit_error_chunk(
        broker: Broker, bundle: Any, device: OffloadClient, local_gen: Generator) -> None:
    """The worker's clock jumps past the request's deadline once its first chunk is out: the
    batch drops it before the next step and says so in a numbered error chunk; the worker
    then serves the next request normally."""
    late = [False]
    w = start_worker(broker, bundle, concurrency=2, chunk=ChunkPolicy(tokens=1),
                     wall_clock=lambda: time.time() + (3600.0 if late[0] else 0.0))
    try:
        async def run() -> tuple[list[OffloadChunk], BaseException | None]:
            body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 200,
                    "temperature": 0}
            doomed = device.submit(body, "completions", time.monotonic() + 20)
            got: list[OffloadChunk] = []
            try:
                async for c in doomed:
                    got.append(c)
                    late[0] = True  # from now on every deadline has passed, for the worker
            except OffloadRemoteError as e:
                return got, e
            return got, None

        got, err = asyncio.run(run())
        late[0] = False
        after = asyncio.run(ask(device, PROMPTS[3], 16))
    finally:
        w.stop()
    assert isinstance(err, OffloadRemoteError), f"finished anyway: {len(got)} chunks"
    assert err.code == "aborted" and "deadline passed during generation" in str(err)
    assert 1 <= len(got) < 200 and w.counts["aborted"] == 1
    assert "".join(c.text for c in after) == greedy(local_gen, PROMPTS[3], 16)


def test_a_request_that_cannot_finish_in_time_is_refused_at_once_and_spares_the_breaker(
        broker: Broker, bundle: Any) -> None:
    """The worker knows its step time (measured at start-up, then online): at 10 ms a step,
    200 tokens do not fit in 1 s, so it answers `worker_busy` before spending a step on
    them, and the device's breaker, there to spot a broken cloud, does not count it."""
    breaker = CircuitBreaker(BreakerConfig(min_requests=2, open_s=60.0))
    client = OffloadClient(broker.url, "dev1", breaker=breaker)
    assert client.start(wait_s=10)
    w = start_worker(broker, bundle)
    try:
        assert w.rates.step_s[1] < 0.01  # measured, not the 50 ms prior
        w.rates.step_s[1] = 0.010  # a slower engine than the tiny model's
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}

        async def doomed() -> OffloadRemoteError:
            with pytest.raises(OffloadRemoteError) as e:
                [c async for c in client.submit(body, "completions", time.monotonic() + 1.0)]
            return e.value

        for _ in range(3):
            t0 = time.monotonic()
            err = asyncio.run(doomed())
            assert time.monotonic() - t0 < 0.5  # refused at once, not left to expire
            assert err.code == "worker_busy" and "cannot finish 200 tokens in time" in str(err)
        assert w.counts["too_late"] == 3 and w.counts["served"] == 0
        assert breaker.state is State.CLOSED and client.available()
        assert client.latency().samples == 0  # a refusal is no round trip
        ok = asyncio.run(ask(client, PROMPTS[0], 8))  # and a feasible one is served
        assert ok[-1].finish_reason == "length"
    finally:
        w.stop()
        client.stop()
