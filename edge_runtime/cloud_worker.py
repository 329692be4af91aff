"""The cloud side of offload: the same generator behind an MQTT shared subscription.

    broker ─$share/{group}/edge/+/offload/req─▶ MQTT I/O thread: decode, drop if expired
        ─▶ bounded queue ─▶ N worker threads, one Generator each (a Generator is not
           thread-safe) ─▶ chunks ─▶ PUBLISH ResponseTopic (QoS 1, same CorrelationData)

Capacity grows by starting more workers on the same broker: the broker hands each request
to one member of the share group, so there is no load balancer of our own. Every request
that reached us gets an answer or is dropped on purpose: a malformed one gets an error chunk,
a full queue gets an error chunk at once (the device then serves locally or rejects), an
expired one is dropped and counted (nobody is waiting for it). `stop()` unsubscribes first,
so the broker sends new requests to the other workers, then fails what is queued and gives
what runs `drain_s` to finish before failing it too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edge_runtime import topics
from edge_runtime.api import schemas as s
from edge_runtime.errors import BrokerError, GenerationError, MessageError
from edge_runtime.messages import (
    ErrorInfo,
    OffloadChunk,
    OffloadRequest,
    PublishProps,
    Usage,
    decode_request,
    encode_chunk,
    response_props,
)
from edge_runtime.mqtt import Message, MqttClient
from edge_runtime.sampling import SamplingParams
from edge_runtime.serving import TextGenerator

log = logging.getLogger(__name__)


@dataclass
class _Job:
    req: OffloadRequest
    received_ms: int


class _Abort(Exception):
    """Generation stops: the deadline passed or the worker is stopping."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq  # the next chunk number: the error chunk takes it


class CloudWorker:
    def __init__(
        self,
        broker_url: str,
        load: Callable[[], TextGenerator] | None,
        *,
        group: str = "cloud",
        concurrency: int = 1,
        max_queued: int | None = None,
        default_timeout_s: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        **mqtt_options: Any,
    ) -> None:
        """`load` builds one generator per worker thread; None answers at once (echo mode,
        for measuring the transport alone). `mqtt_options` go to MqttClient."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._load = load
        self.group = topics.check_id(group, "group")
        self.topic_filter = topics.offload_request_shared(group)
        self._default_timeout_ms = int(default_timeout_s * 1000)
        self._wall = wall_clock
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_queued or 2 * concurrency)
        self._threads = [
            threading.Thread(target=self._run, name=f"cloud-worker-{i}", daemon=True)
            for i in range(concurrency)
        ]
        self._ready = threading.Semaphore(0)
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self.errors: list[BaseException] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.mqtt = MqttClient(
            broker_url, f"cloud-{group}-{secrets.token_hex(4)}", **mqtt_options
        )
        self._io_loop = asyncio.new_event_loop()
        self._io_thread = threading.Thread(
            target=self._io_loop.run_forever, name="cloud-worker-mqtt", daemon=True
        )

    def start(self, wait_s: float = 10.0) -> bool:
        """Load the model(s), then subscribe; True once the broker acknowledged it within
        `wait_s`. If a model fails to load, `errors` says why and nothing is subscribed."""
        for t in self._threads:
            t.start()
        for _ in self._threads:  # take requests only once every generator is warm
            self._ready.acquire()  # released by each thread, loaded or failed
        if self.errors:
            return False
        self.mqtt.subscribe(self.topic_filter, self._on_request)
        # The MQTT I/O runs on an asyncio loop of its own thread (mqtt_loop.py) rather than
        # paho's: requests are decoded and echo answers sent there without paho's wake-up
        # socket pair (two syscalls and a select wake per packet); generation threads hand
        # their chunks to it.
        self._io_thread.start()
        self.mqtt.start(loop=self._io_loop)
        return self.mqtt.wait_subscribed(wait_s)

    def stop(self, drain_s: float = 10.0) -> None:
        self._stopping.set()
        if self.mqtt.connected:
            self.mqtt.unsubscribe(self.topic_filter)
        while True:  # queued requests: fail them now, so the device hears it at once
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._reply_error(job.req, "the cloud worker is stopping", "worker_stopping")
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + drain_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()  # whatever still runs fails explicitly between two tokens
        for t in self._threads:
            t.join(5.0)
        self.mqtt.stop()
        if self._io_thread.is_alive():
            self._io_loop.call_soon_threadsafe(self._io_loop.stop)
            self._io_thread.join(5.0)
        if not self._io_loop.is_running():
            self._io_loop.close()

    # -- MQTT I/O thread ------------------------------------------------------------------------

    def _on_request(self, msg: Message) -> None:
        now_ms = int(self._wall() * 1000)
        try:
            req = decode_request(msg.topic, msg.payload, msg.props, now_ms,
                                 self._default_timeout_ms)
        except MessageError as e:
            self.counts["malformed"] += 1
            self._reply_raw(msg.props, ErrorInfo(str(e), "invalid_request_error", "bad_message"))
            return
        if req.deadline_ms <= now_ms:
            self.counts["expired"] += 1
            return
        if self._stopping.is_set():
            self._reply_error(req, "the cloud worker is stopping", "worker_stopping")
            return
        if self._load is None:
            # Echo mode answers right here on the network thread: it measures the transport
            # and the protocol, not the two thread hand-offs a real generation adds (~0.3 ms).
            self._serve(None, req)
            self.counts["served"] += 1
            return
        try:
            self._queue.put_nowait(_Job(req, now_ms))
        except queue.Full:
            self.counts["busy"] += 1
            self._reply_error(req, "every cloud worker slot is busy", "worker_busy")

    # -- worker threads ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            gen = self._load() if self._load is not None else None
            if gen is not None:
                gen.warmup()
        except BaseException as e:
            log.error("loading the model failed: %s", e)
            self.errors.append(e)
            return
        finally:
            self._ready.release()
        while (job := self._queue.get()) is not None:
            if job.req.deadline_ms <= self._wall() * 1000:
                self.counts["expired"] += 1  # expired while queued: nobody waits for it
                continue
            try:
                self._serve(gen, job.req)
                self.counts["served"] += 1
            except _Abort as e:
                self.counts["aborted"] += 1
                self._reply_error(job.req, str(e), "aborted", seq=e.seq)
            except BrokerError as e:
                self.counts["unanswered"] += 1
                log.warning("cannot answer %s: %s", job.req.response_topic, e)
            except Exception as e:  # an engine failure fails this request, not the worker
                log.exception("request on %s failed", job.req.response_topic)
                self.counts["failed"] += 1
                self._reply_error(job.req, f"generation failed: {e}", "engine_error")

    def _serve(self, gen: TextGenerator | None, req: OffloadRequest) -> None:
        chat = req.endpoint == "chat"
        try:
            body = (s.ChatCompletionRequest if chat else s.CompletionRequest).model_validate(
                req.body
            )
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            self.counts["invalid"] += 1
            self._send(req, OffloadChunk(0, error=ErrorInfo(
                f"{where}: {err['msg']}", "invalid_request_error", "invalid_body")))
            return
        if gen is None:  # echo mode: the transport alone
            self._send(req, OffloadChunk(0, finish_reason="length", usage=Usage(0, 0)))
            return
        try:
            if isinstance(body, s.ChatCompletionRequest):
                ids = gen.chat_prompt([m.for_template() for m in body.messages])
            else:
                ids = gen.text_prompt(body.prompt_text)
            params = _sampling_params(gen, body, len(ids))
            chunks = gen.stream(ids, params)
        except GenerationError as e:
            self._send(req, OffloadChunk(0, error=ErrorInfo(
                str(e), "invalid_request_error", e.field)))
            return
        seq, parts = 0, []
        try:
            for c in chunks:
                if self._abort.is_set():
                    raise _Abort("the cloud worker stopped mid-request", seq)
                if self._wall() * 1000 > req.deadline_ms:
                    raise _Abort("the request's deadline passed during generation", seq)
                if c.finish_reason is None and not req.stream:
                    parts.append(c.text)
                elif c.finish_reason is None:
                    self._send(req, OffloadChunk(seq, c.text))
                    seq += 1
                else:
                    assert c.stats is not None
                    text = "".join(parts) + c.text
                    usage = Usage(c.stats.prompt_tokens, c.stats.completion_tokens)
                    self._send(req, OffloadChunk(seq, text, c.finish_reason, usage))
        finally:
            chunks.close()

    # -- replies ----------------------------------------------------------------------------

    def _send(self, req: OffloadRequest, chunk: OffloadChunk) -> None:
        props = response_props(req.correlation_data)
        self.mqtt.publish(req.response_topic, encode_chunk(chunk), props, qos=1)

    def _reply_error(self, req: OffloadRequest, message: str, code: str, seq: int = 0) -> None:
        try:
            self._send(req, OffloadChunk(seq, error=ErrorInfo(message, "server_error", code)))
        except BrokerError as e:
            log.warning("cannot send an error to %s: %s", req.response_topic, e)

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


def _sampling_params(
    gen: TextGenerator, body: s.ChatCompletionRequest | s.CompletionRequest, n_prompt: int
) -> SamplingParams:
    """The API's rules (schemas._Sampling.sampling_params): body values, else defaults."""
    if n_prompt == 0:
        raise GenerationError("the prompt encodes to no tokens", "prompt")
    max_tokens, _ = body.requested_max_tokens()
    return body.sampling_params(gen.defaults, gen.resolve_max_tokens(n_prompt, max_tokens))
