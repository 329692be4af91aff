"""The cloud side of offload: the same generator behind an MQTT shared subscription.

    broker ─$share/{group}/edge/+/offload/req─▶ MQTT I/O thread: decode, drop if expired
        ─▶ bounded queue ─▶ engine thread: one Generator, one continuous batch of up to
           `concurrency` sequences (batching.BatchDecoder, as the daemon's engine loop)
        ─▶ tokens ─▶ Coalescer (coalesce.py) ─▶ PUBLISH ResponseTopic (QoS 1, CorrelationData)

One batch rather than a thread and a model per request: a decode step costs about the same
for 1 or 4 sequences on a CPU (its weights are read once per step), so a worker's capacity
grows with its concurrency instead of being split by it, and there is one copy of the model.
The first text of a streamed answer goes out at once; later tokens go out in chunks of
`chunk.tokens` or every `chunk.ms` (see coalesce.py for why).

Capacity also grows by starting more workers on the same broker: the broker hands each
request to one member of the share group, so there is no load balancer of our own. Every
request that reached us gets an answer or is dropped on purpose, and every refusal is
logged: an answer goes only to the requesting device's own response topic (anything else is
dropped and counted, offload.messages.screen_request), a malformed one gets an error chunk,
a full queue gets an error chunk at once (the device then serves locally or rejects), an
expired one is dropped and counted (nobody is waiting for it), one whose deadline passes
mid-generation gets an error chunk at the next step. `stop()` unsubscribes first, so the
broker sends new requests to the other workers, then fails what is queued and gives what
runs `drain_s` to finish before failing it too.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from edge_runtime.cloud.body import Body, prompt_and_params, read_body
from edge_runtime.cloud.coalesce import ChunkPolicy, Coalescer
from edge_runtime.errors import BrokerError, ConfigError, EngineError, GenerationError, MessageError
from edge_runtime.model.stream import Chunk
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient
from edge_runtime.offload.messages import (
    ErrorInfo,
    OffloadChunk,
    OffloadRequest,
    PublishProps,
    Refusal,
    Usage,
    decode_request,
    encode_chunk,
    model_refusal,
    response_props,
    screen_request,
)
from edge_runtime.serving.rate_probe import measure_rates
from edge_runtime.serving.request import DecodeBatch, TextGenerator
from edge_runtime.serving.scheduler import Rates, prefill_waits

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05
"""How long an idle engine thread waits for a request before looking at `stop()` again."""


@dataclass(eq=False)
class _Live:
    """One request in the batch: where its answer goes and what is still held back."""

    req: OffloadRequest
    text: Coalescer
    seq: int = 0
    """The number of the next chunk it publishes."""


_Batch = dict[Hashable, _Live]
"""The requests in the decode batch, by their key in it."""


class CloudWorker:
    def __init__(
        self,
        broker_url: str,
        load: Callable[[], TextGenerator] | None,
        *,
        group: str = "cloud",
        concurrency: int = 1,
        max_queued: int | None = None,
        chunk: ChunkPolicy | None = None,
        prefill_chunk: int = 128,
        default_timeout_s: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        model: str | None = None,
        **mqtt_options: Any,
    ) -> None:
        """`load` builds the generator (on the engine thread); None answers at once (echo
        mode, for measuring the transport alone). `concurrency`: sequences decoded together;
        `max_queued`: requests waiting beyond those (default 2 x concurrency); `chunk`: token
        coalescing of streamed answers (default ChunkPolicy()); `prefill_chunk`: prompt
        tokens prefilled per step (0: whole prompts); `model`: the name requests must ask for
        (None: any). `mqtt_options` go to MqttClient."""
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be >= 0 (0: off), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if max_queued is not None and max_queued < 1:
            raise ConfigError(f"max_queued must be >= 1, got {max_queued}")
        self._load = load
        self.model = model
        self.concurrency = concurrency
        self.chunk = chunk or ChunkPolicy()
        self.group = topics.check_id(group, "group")
        self.topic_filter = topics.offload_request_shared(group)
        self._default_timeout_ms = int(default_timeout_s * 1000)
        self._wall = wall_clock
        self._queue: queue.Queue[OffloadRequest] = queue.Queue(
            max_queued or 2 * concurrency)
        self._thread = threading.Thread(target=self._run, name="cloud-worker-engine",
                                        daemon=True)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._keys = itertools.count()
        self.rates = Rates()
        """Measured prefill and decode-step times (at start-up, then online): whether a
        request can still finish before its deadline."""
        self.errors: list[BaseException] = []
        self.peak_batch = 0
        """The most sequences one decode step has served so far."""
        self.counts: collections.Counter[str] = collections.Counter()
        """served, expired, busy, malformed, invalid, aborted, failed, unanswered, messages,
        and the refusals of offload.messages.screen_request/model_refusal: no_response_topic,
        foreign_topic (an answer asked for elsewhere than the device's own response topic),
        bad_version, too_large, unknown_model"""
        # Workers must be subscribed again before the devices probe the cloud after a broker
        # restart (a probe that finds no subscriber reopens a device's breaker): they retry
        # sooner than the devices (offload.RECONNECT_MAX_S); there are few of them.
        mqtt_options.setdefault("reconnect_min_s", 0.2)
        mqtt_options.setdefault("reconnect_max_s", 1.0)
        self.mqtt = MqttClient(
            broker_url, f"cloud-{group}-{secrets.token_hex(4)}", **mqtt_options
        )
        self._io_loop = asyncio.new_event_loop()
        self._io_thread = threading.Thread(
            target=self._io_loop.run_forever, name="cloud-worker-mqtt", daemon=True
        )

    def start(self, wait_s: float = 10.0) -> bool:
        """Load the model, then subscribe; True once the broker acknowledged it within
        `wait_s`. If the model fails to load, `errors` says why and nothing is subscribed."""
        if self._load is not None:
            self._thread.start()
            self._ready.wait()  # take requests only once the generator is warm
        if self.errors:
            return False
        self.mqtt.subscribe(self.topic_filter, self._on_request)
        # The MQTT I/O runs on an asyncio loop of its own thread (mqtt_loop.py) rather than
        # paho's: requests are decoded and echo answers sent there without paho's wake-up
        # socket pair (two syscalls and a select wake per packet); the engine thread hands
        # its chunks to it.
        self._io_thread.start()
        self.mqtt.start(loop=self._io_loop)
        return self.mqtt.wait_subscribed(wait_s)

    def stop(self, drain_s: float = 10.0) -> None:
        self._stopping.set()
        if self.mqtt.connected:
            self.mqtt.unsubscribe(self.topic_filter)
        while True:  # queued requests: fail them now, so the device hears it at once
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            self._reply_error(req, "the cloud worker is stopping", "worker_stopping")
        if self._thread.is_alive():
            self._thread.join(drain_s)  # the engine thread ends once its batch is empty
            self._abort.set()  # whatever still runs fails explicitly before the next step
            self._thread.join(5.0)
        self.mqtt.stop()
        if self._io_thread.is_alive():
            self._io_loop.call_soon_threadsafe(self._io_loop.stop)
            self._io_thread.join(5.0)
        if not self._io_loop.is_running():
            self._io_loop.close()

    # -- MQTT I/O thread ------------------------------------------------------------------------

    def _on_request(self, msg: Message) -> None:
        now_ms = int(self._wall() * 1000)
        # Answers go only to the requesting device's own response topic (never to a topic a
        # request names at will); every refusal is logged, and answered where that is allowed.
        refused = screen_request(msg.topic, len(msg.payload), msg.props)
        req = None
        if refused is None:
            try:
                req = decode_request(msg.topic, msg.payload, msg.props, now_ms,
                                     self._default_timeout_ms)
                refused = model_refusal(req.body, self.model)
            except MessageError as e:
                refused = Refusal("malformed", ErrorInfo(str(e), "invalid_request_error",
                                                         "bad_message"), reply=True)
        if refused is not None or req is None:
            self._refuse(msg, refused)
            return
        if req.deadline_ms <= now_ms:
            self.counts["expired"] += 1
            return
        if self._stopping.is_set():
            self._reply_error(req, "the cloud worker is stopping", "worker_stopping")
            return
        if self._load is None:
            # Echo mode answers right here on the network thread: it measures the transport
            # and the protocol, not the thread hand-off a real generation adds.
            if self._body(req) is not None:
                self._send(req, OffloadChunk(0, finish_reason="length", usage=Usage(0, 0)))
                self.counts["served"] += 1
            return
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            self.counts["busy"] += 1
            self._reply_error(req, "every cloud worker slot is busy", "worker_busy")

    # -- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._load is not None
        try:
            gen = self._load()
            gen.warmup()
            try:
                batch = gen.batch(self.concurrency, self.prefill_chunk)
            except EngineError as e:
                raise EngineError(f"{e} (for the cloud worker: --concurrency 1)") from e
            step_s, prefill_tps = measure_rates(gen, self.concurrency)
            self.rates.step_s.update(step_s)
            self.rates.prefill_tokens_per_s = prefill_tps or self.rates.prefill_tokens_per_s
        except BaseException as e:
            log.error("loading the model failed: %s", e)
            self.errors.append(e)
            return
        finally:
            self._ready.set()
        live: _Batch = {}
        while True:
            if not self._take(gen, batch, live):
                break
            if not batch.active:
                continue
            self._expire(batch, live)
            if not batch.active:
                continue
            size = batch.active - batch.prefilling  # rows of the decode step
            self.peak_batch = max(self.peak_batch, batch.active)
            t = time.perf_counter()
            try:
                results = batch.step()
                self.rates.observe_call(size, time.perf_counter() - t, batch.prefill_work)
            except Exception as e:  # an engine failure fails this batch, not the worker
                log.exception("decode step failed for %d sequences", batch.active)
                for key in batch.keys:
                    batch.remove(key)
                    self.counts["failed"] += 1
                    self._reply_error(live.pop(key).req, f"generation failed: {e}",
                                      "engine_error")
                continue
            now = time.monotonic()
            for key, chunks in results.items():
                self._emit(batch, live, key, chunks, now)
            for key, x in list(live.items()):  # text held for chunk.ms goes out now
                text = x.text.due(now)
                if text is not None:
                    self._publish(batch, live, key, OffloadChunk(x.seq, text))

    def _take(self, gen: TextGenerator, batch: DecodeBatch, live: _Batch) -> bool:
        """Start queued requests while the batch has room (waiting for one when it is empty);
        False once the worker stops and nothing runs."""
        while batch.active < self.concurrency:
            try:
                if batch.active:
                    req = self._queue.get_nowait()
                else:
                    req = self._queue.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                return bool(batch.active) or not self._stopping.is_set()
            if req.deadline_ms <= self._wall() * 1000:
                self.counts["expired"] += 1  # expired while queued: nobody waits for it
                continue
            self._start(gen, batch, live, req)
        return True

    def _start(self, gen: TextGenerator, batch: DecodeBatch, live: _Batch,
               req: OffloadRequest) -> None:
        body = self._body(req)
        if body is None:
            return
        try:
            ids, params = prompt_and_params(gen, body)
        except GenerationError as e:
            self._send_quietly(req, OffloadChunk(0, error=ErrorInfo(
                str(e), "invalid_request_error", e.field)))
            return
        steps = params.max_tokens + prefill_waits(len(ids), self.prefill_chunk)
        need_s = (self.rates.prefill_time(len(ids))
                  + steps * self.rates.step_time(batch.active + 1))
        left_s = req.deadline_ms / 1000 - self._wall()
        if need_s > left_s:
            # It would expire mid-generation after taking batch steps from the others: say
            # so now, while the device can still refuse it explicitly.
            self.counts["too_late"] += 1
            self._reply_error(req, f"the cloud cannot finish {params.max_tokens} tokens in "
                              f"time (~{need_s:.2f} s needed, {left_s:.2f} s left)", "worker_busy")
            return
        key = next(self._keys)
        live[key] = _Live(req, Coalescer(self.chunk if req.stream else None))
        try:
            chunks = batch.add(key, ids, params)
        except GenerationError as e:
            del live[key]
            self._send_quietly(req, OffloadChunk(0, error=ErrorInfo(
                str(e), "invalid_request_error", e.field)))
            return
        except Exception as e:  # a request the engine cannot run fails alone
            log.exception("prefill failed for %s", req.response_topic)
            del live[key]
            self.counts["failed"] += 1
            self._reply_error(req, f"generation failed: {e}", "engine_error")
            return
        self.rates.observe_call(0, 0.0, batch.prefill_work)
        self._emit(batch, live, key, chunks, time.monotonic())

    def _expire(self, batch: DecodeBatch, live: _Batch) -> None:
        """Fail, before the next step, what the deadline or stop() ended."""
        now_ms = self._wall() * 1000
        for key in batch.keys:
            x = live[key]
            if self._abort.is_set():
                why = "the cloud worker stopped mid-request"
            elif now_ms > x.req.deadline_ms:
                why = "the request's deadline passed during generation"
            else:
                continue
            batch.remove(key)
            del live[key]
            self.counts["aborted"] += 1
            self._reply_error(x.req, why, "aborted", seq=x.seq)

    def _emit(self, batch: DecodeBatch, live: _Batch, key: Hashable, chunks: list[Chunk],
              now: float) -> None:
        x = live.get(key)
        if x is None:
            return
        for c in chunks:
            if c.finish_reason is None:
                text = x.text.add(c.text, len(c.token_ids), now)
                if text is not None and not self._publish(batch, live, key,
                                                          OffloadChunk(x.seq, text)):
                    return
                continue
            assert c.stats is not None
            usage = Usage(c.stats.prompt_tokens, c.stats.completion_tokens)
            last = OffloadChunk(x.seq, x.text.take() + c.text, c.finish_reason, usage)
            if self._publish(batch, live, key, last):
                self.counts["served"] += 1
                del live[key]
            return

    def _publish(self, batch: DecodeBatch, live: _Batch, key: Hashable,
                 chunk: OffloadChunk) -> bool:
        """Send one chunk of a running request; on a lost broker the request ends here
        (False): the device fails it itself when its connection drops too."""
        x = live[key]
        try:
            self._send(x.req, chunk)
        except BrokerError as e:
            self.counts["unanswered"] += 1
            log.warning("cannot answer %s: %s", x.req.response_topic, e)
            batch.remove(key)
            del live[key]
            return False
        x.seq += 1
        return True

    def _body(self, req: OffloadRequest) -> Body | None:
        """The request's body (offload_body.py); None after answering an invalid one."""
        try:
            return read_body(req)
        except MessageError as e:
            self.counts["invalid"] += 1
            self._send_quietly(req, OffloadChunk(0, error=ErrorInfo(
                str(e), "invalid_request_error", "invalid_body")))
            return None

    # -- replies ----------------------------------------------------------------------------

    def _send(self, req: OffloadRequest, chunk: OffloadChunk) -> None:
        props = response_props(req.correlation_data)
        self.mqtt.publish(req.response_topic, encode_chunk(chunk), props, qos=1)
        self.counts["messages"] += 1

    def _send_quietly(self, req: OffloadRequest, chunk: OffloadChunk) -> None:
        try:
            self._send(req, chunk)
        except BrokerError as e:
            log.warning("cannot answer %s: %s", req.response_topic, e)

    def _reply_error(self, req: OffloadRequest, message: str, code: str, seq: int = 0) -> None:
        self._send_quietly(req, OffloadChunk(seq, error=ErrorInfo(message, "server_error", code)))

    def _refuse(self, msg: Message, refused: Refusal | None) -> None:
        assert refused is not None
        self.counts[refused.counter] += 1
        log.warning("refused a request on %r (%s): %s", msg.topic,
                    "answered" if refused.reply else "not answered", refused.error.message)
        if refused.reply:
            self._reply_raw(msg.props, refused.error)

    def _reply_raw(self, props: PublishProps, error: ErrorInfo) -> None:
        """Answer a request too malformed to decode, if it says where to."""
        topic = props.response_topic
        if not topic or "+" in topic or "#" in topic:
            return
        try:
            self.mqtt.publish(topic, encode_chunk(OffloadChunk(0, error=error)),
                              response_props(props.correlation_data), qos=1)
        except BrokerError as e:
            log.warning("cannot send an error to %s: %s", topic, e)
