"""The cloud side of offload: an MQTT front door onto the daemon's own engine loop.

    broker ─$share/{group}/edge/+/offload/req─▶ MQTT I/O thread (an asyncio loop): decode,
        drop if expired, read the body with the API's schemas, tokenize
        ─▶ LocalWorker.submit (serving/engine_loop.py, offload off): the scheduler admits
           it or refuses it at once (`worker_busy`); one continuous batch of up to
           `concurrency` sequences, chunked prefill, deadlines and measured rates
        ─▶ chunks back on the I/O loop ─▶ Coalescer (coalesce.py)
        ─▶ PUBLISH ResponseTopic (QoS 1, CorrelationData)

The engine loop is the one the HTTP API submits to, with the cloud path off (a worker never
offloads) and the wall clock as its clock, the clock the requests' deadlines are written in:
admission, deadline expiry, chunked prefill and rate measurement are the daemon's, not a
second copy. One batch rather than a thread and a model per request: a decode step costs
about the same for 1 or 4 sequences on a CPU (its weights are read once per step), so a
worker's capacity grows with its concurrency instead of being split by it. The first text
of a streamed answer goes out at once; later tokens go out in chunks of `chunk.tokens` or
every `chunk.ms` (see coalesce.py for why).

Capacity also grows by starting more workers on the same broker: the broker hands each
request to one member of the share group, so there is no load balancer of our own. Every
request that reached us gets an answer or is dropped on purpose, and every refusal is
logged: an answer goes only to the requesting device's own response topic (anything else is
dropped and counted, offload.messages.screen_request); a malformed one gets an error chunk;
one the scheduler refuses (queue full: `busy`; cannot finish before its
deadline: `too_late`) gets a `worker_busy` error chunk at once (the device then refuses it
explicitly, its breaker untouched); an expired one is dropped and counted (nobody is
waiting for it), also when it expires in the queue; one whose deadline comes
mid-generation gets an error chunk before the next step. `stop()` unsubscribes first, so
the broker sends new requests to the other workers, then fails what is queued and gives
what runs `drain_s` to finish before failing it too.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_runtime.cloud.body import Body, prompt_and_params, read_body
from edge_runtime.cloud.coalesce import ChunkPolicy, Coalescer
from edge_runtime.errors import (
    BrokerError,
    ConfigError,
    DeadlineExceededError,
    EngineError,
    GenerationError,
    MessageError,
    OverloadedError,
)
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
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import QueueFull, Request, TextGenerator
from edge_runtime.serving.scheduler import Rates, SchedulerConfig

log = logging.getLogger(__name__)


class _Stopped(Exception):
    """stop() ended a running request after its drain time: its answer is an error chunk."""


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
        freeze_heap: bool = False,
        **mqtt_options: Any,
    ) -> None:
        """`load` builds the generator (on the engine thread); None answers at once (echo
        mode, for measuring the transport alone). `concurrency`: sequences decoded together;
        `max_queued`: requests waiting beyond those (default 2 x concurrency); `chunk`: token
        coalescing of streamed answers (default ChunkPolicy()); `prefill_chunk`: prompt
        tokens prefilled per step (0: whole prompts); `model`: the name requests must ask for
        (None: any); `freeze_heap`: once the model is warm, out of the garbage collector's
        sight (the `cloud-worker` command; as serve, engine_loop._freeze_heap). `mqtt_options`
        go to MqttClient."""
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        if prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be >= 0 (0: off), got {prefill_chunk}")
        if max_queued is not None and max_queued < 1:
            raise ConfigError(f"max_queued must be >= 1, got {max_queued}")
        self.model = model
        self.concurrency = concurrency
        self.chunk = chunk or ChunkPolicy()
        self.group = topics.check_id(group, "group")
        self.topic_filter = topics.offload_request_shared(group)
        self._default_timeout_ms = int(default_timeout_s * 1000)
        self._wall = wall_clock
        self.engine: LocalWorker | None = None
        """The engine loop (None in echo mode): the daemon's, with the cloud path off."""
        if load is not None:
            config = SchedulerConfig(
                max_batch=concurrency, max_queue=max_queued or 2 * concurrency,
                default_deadline_s=default_timeout_s, offload_enabled=False,
                prefill_chunk=prefill_chunk)
            # Measured at start-up, then online from the steps it serves; a refusal here is
            # final (no other path), so no re-measuring while idle.
            self.engine = LocalWorker(load, config, clock=wall_clock, reprobe_idle=False,
                                      freeze_heap=freeze_heap)
        self._echo_rates = Rates()
        self._stopping = threading.Event()
        self._ids = itertools.count()
        self._live: dict[Request, asyncio.Task[None]] = {}
        """Requests submitted to the engine loop, by the task that answers each (I/O loop)."""
        self.errors: list[BaseException] = []
        self.counts: collections.Counter[str] = collections.Counter()
        """served, expired, busy, too_late, malformed, invalid, aborted, failed, unanswered,
        messages, and the refusals of offload.messages.screen_request/model_refusal:
        no_response_topic, foreign_topic (an answer asked for elsewhere than the device's own
        response topic), bad_version, too_large, unknown_model"""
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

    @property
    def rates(self) -> Rates:
        """The engine loop's measured prefill and decode-step times (at start-up, then
        online): whether a request can still finish before its deadline."""
        return self.engine.scheduler.rates if self.engine is not None else self._echo_rates

    @property
    def peak_batch(self) -> int:
        """The most sequences one decode step has served so far."""
        return self.engine.peak_batch if self.engine is not None else 0

    def start(self, wait_s: float = 10.0) -> bool:
        """Load the model, then subscribe; True once the broker acknowledged it within
        `wait_s`. If the model fails to load, `errors` says why and nothing is subscribed."""
        engine = self.engine
        if engine is not None:
            engine.start()
            # take requests only once the generator is warm
            while not engine.wait_ready(0.05) and engine.error is None:
                pass
            if engine.error is not None:
                e = engine.error
                if isinstance(e, EngineError) and "max_batch" in str(e):
                    e = EngineError(f"{e} (for the cloud worker: --concurrency 1)")
                self.errors.append(e)
                return False
        self.mqtt.subscribe(self.topic_filter, self._on_request)
        # The MQTT I/O runs on an asyncio loop of its own thread (mqtt/loop.py) rather than
        # paho's: requests are decoded and echo answers sent there without paho's wake-up
        # socket pair (two syscalls and a select wake per packet); the engine loop hands its
        # chunks to it (Request.deliver).
        self._io_thread.start()
        self.mqtt.start(loop=self._io_loop)
        return self.mqtt.wait_subscribed(wait_s)

    def stop(self, drain_s: float = 10.0) -> None:
        self._stopping.set()
        if self.mqtt.connected:
            self.mqtt.unsubscribe(self.topic_filter)
        if self.engine is not None:
            # Queued requests fail now (the device hears it at once); running ones get
            # `drain_s` to finish, then fail explicitly before the next step.
            self.engine.stop(drain_s)
            if self._io_thread.is_alive():
                self._call(self._abort_all)
            self.engine.stop(5.0)
        self.mqtt.stop()
        if self._io_thread.is_alive():
            self._io_loop.call_soon_threadsafe(self._io_loop.stop)
            self._io_thread.join(5.0)
        if not self._io_loop.is_running():
            self._io_loop.close()

    def _call(self, fn: Callable[[], Any], timeout_s: float = 5.0) -> None:
        """Run the coroutine `fn()` on the I/O loop and wait for it (at most `timeout_s`)."""
        try:
            asyncio.run_coroutine_threadsafe(fn(), self._io_loop).result(timeout_s)
        except Exception as e:  # a stop must go on: say what was left unanswered
            log.warning("cloud worker stop: %r", e)

    async def _abort_all(self) -> None:
        """On the I/O loop: fail what still runs, and wait until every answer is out."""
        for run in list(self._live):
            run.cancel()  # the engine loop drops it before its next step
            run.events.put_nowait(_Stopped("the cloud worker stopped mid-request"))
        if self._live:
            await asyncio.wait(list(self._live.values()), timeout=5.0)

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
        if self.engine is None:
            # Echo mode answers right here on the network thread: it measures the transport
            # and the protocol, not the thread hand-off a real generation adds.
            if self._body(req) is not None:
                self._send(req, OffloadChunk(0, finish_reason="length", usage=Usage(0, 0)))
                self.counts["served"] += 1
            return
        self._submit(req)

    def _submit(self, req: OffloadRequest) -> None:
        """Read, tokenize and submit one request to the engine loop (on the I/O loop); a
        refusal is answered at once."""
        assert self.engine is not None
        body = self._body(req)
        gen = self.engine.generator
        if body is None or gen is None:
            return
        try:
            ids, params = prompt_and_params(gen, body)
        except GenerationError as e:
            self._send_quietly(req, OffloadChunk(0, error=ErrorInfo(
                str(e), "invalid_request_error", e.field)))
            return
        run = Request(id=f"cloud-{next(self._ids)}", prompt_ids=ids, params=params,
                      loop=self._io_loop, arrival=self._wall(),
                      deadline=req.deadline_ms / 1000, generator=gen)
        try:
            self.engine.submit(run)
        except OverloadedError as e:
            if self._stopping.is_set():
                self._reply_error(req, "the cloud worker is stopping", "worker_stopping")
            elif isinstance(e, QueueFull):
                self.counts["busy"] += 1
                self._reply_error(req, "every cloud worker slot is busy", "worker_busy")
            else:
                # It would expire mid-generation after taking batch steps from the others:
                # say so now, while the device can still refuse it explicitly.
                self.counts["too_late"] += 1
                self._reply_error(req, f"the cloud cannot finish {params.max_tokens} tokens "
                                  f"in time ({e})", "worker_busy")
            return
        self._live[run] = self._io_loop.create_task(self._answer(req, run))

    async def _answer(self, req: OffloadRequest, run: Request) -> None:
        """Publish the engine loop's chunks of one request, coalesced (on the I/O loop)."""
        text = Coalescer(self.chunk if req.stream else None)
        seq = 0
        try:
            while True:
                wait = text.due_in(time.monotonic())
                try:
                    if wait is None:
                        item = await run.events.get()
                    else:
                        item = await asyncio.wait_for(run.events.get(), wait)
                except asyncio.TimeoutError:  # text held for chunk.ms goes out now
                    held = text.due(time.monotonic())
                    if held is not None:
                        if not self._publish(req, run, OffloadChunk(seq, held)):
                            return
                        seq += 1
                    continue
                if isinstance(item, BaseException):
                    self._failed(req, run, item, seq)
                    return
                if item.finish_reason is None:
                    out = text.add(item.text, len(item.token_ids), time.monotonic())
                    if out is not None:
                        if not self._publish(req, run, OffloadChunk(seq, out)):
                            return
                        seq += 1
                    continue
                assert item.stats is not None
                usage = Usage(item.stats.prompt_tokens, item.stats.completion_tokens)
                last = OffloadChunk(seq, text.take() + item.text, item.finish_reason, usage)
                if self._publish(req, run, last):
                    self.counts["served"] += 1
                return
        finally:
            self._live.pop(run, None)

    def _failed(self, req: OffloadRequest, run: Request, error: BaseException,
                seq: int) -> None:
        """Answer a request the engine loop ended without finishing it."""
        if isinstance(error, DeadlineExceededError):
            if run.started is None:
                self.counts["expired"] += 1  # expired while queued: nobody waits for it
                return
            self.counts["aborted"] += 1
            self._reply_error(req, "the request's deadline passed during generation",
                              "aborted", seq=seq)
        elif isinstance(error, _Stopped):
            self.counts["aborted"] += 1
            self._reply_error(req, str(error), "aborted", seq=seq)
        elif isinstance(error, OverloadedError):  # refused in the queue, or shutting down
            if self._stopping.is_set():
                self._reply_error(req, "the cloud worker is stopping", "worker_stopping")
            else:
                self.counts["busy"] += 1
                self._reply_error(req, f"every cloud worker slot is busy ({error})",
                                  "worker_busy")
        elif isinstance(error, GenerationError):
            self._send_quietly(req, OffloadChunk(seq, error=ErrorInfo(
                str(error), "invalid_request_error", error.field)))
        else:  # an engine failure fails this request, not the worker
            self.counts["failed"] += 1
            self._reply_error(req, f"generation failed: {error}", "engine_error", seq=seq)

    def _publish(self, req: OffloadRequest, run: Request, chunk: OffloadChunk) -> bool:
        """Send one chunk of a running request; on a lost broker the request ends here
        (False): the device fails it itself when its connection drops too."""
        try:
            self._send(req, chunk)
        except BrokerError as e:
            self.counts["unanswered"] += 1
            log.warning("cannot answer %s: %s", req.response_topic, e)
            run.cancel()  # the engine loop drops it before its next step
            return False
        return True

    def _body(self, req: OffloadRequest) -> Body | None:
        """The request's body (body.py); None after answering an invalid one."""
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
        log.warning("refused a request on %r (%s): %s", msg.topic,
                    "answered" if refused.reply else "not answered", refused.error.message)
        if refused.reply:
            self._reply_raw(msg.props, refused.error)
        self.counts[refused.counter] += 1  # last: a reader that sees the count sees the rest

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
