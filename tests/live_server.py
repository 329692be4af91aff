"""Test helpers for the API: a real uvicorn server in a thread, and a scripted generator.

The server runs the app exactly as `edge-runtime serve` does (lifespan on, a free loopback
port), the way httpx's own tests start theirs: `uvicorn.Server` in a thread, wait for
`server.started`. `FakeGenerator` stands in for the model where a test needs to control
timing (a blocked warm-up, a slow or failing generation) or must not depend on torch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from edge_runtime.bundle.manifest import GenerationDefaults
from edge_runtime.errors import EngineError
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk, ChunkStream, GenerationStats


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run `app` on 127.0.0.1:<free port>; yield its base URL; shut it down after."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited before it started")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start within 30 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[Any], wait_s: float = 30.0) -> None:
    """SIGTERM (the process's clean shutdown), SIGKILL if it is still there after `wait_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse an SSE body as OpenAI clients do: `data: <json>` events, `[DONE]` kept as a str."""
    events: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


class FakeGenerator:
    """A byte-level "model" that answers `reply`, one character per token.

    `gate` (if given) blocks each generation before its first token until set; `delay_s`
    spaces tokens; `fail_after` raises an EngineError after that many tokens. `closed` is
    set when a generation's iterator is closed (finished or cancelled).
    """

    def __init__(
        self,
        reply: str = "Hello from the edge!",
        context_length: int = 64,
        delay_s: float = 0.0,
        gate: threading.Event | None = None,
        fail_after: int | None = None,
        warmup_gate: threading.Event | None = None,
    ) -> None:
        self.reply = reply
        self.defaults = GenerationDefaults(
            eos_token_ids=[0], context_length=context_length, max_new_tokens=32, temperature=0.0
        )
        self.delay_s = delay_s
        self.gate = gate
        self.fail_after = fail_after
        self.warmup_gate = warmup_gate
        self.produced = 0
        self.started = threading.Event()
        self.closed = threading.Event()
        self.last_params: SamplingParams | None = None

    @property
    def context_length(self) -> int:
        return self.defaults.context_length

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.text_prompt("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def text_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        # The real rule (it reads only context_length and defaults), not a copy of it.
        return Generator.resolve_max_tokens(self, prompt_len, max_tokens)  # type: ignore[arg-type]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> ChunkStream:
        self.last_params = params
        self.closed.clear()

        def chunks() -> ChunkStream:
            try:
                self.started.set()
                if self.gate is not None:
                    self.gate.wait(30)
                n = 0
                for ch in self.reply[: params.max_tokens]:
                    if self.fail_after is not None and n >= self.fail_after:
                        raise EngineError("the engine fell over")
                    time.sleep(self.delay_s)
                    n += 1
                    self.produced += 1
                    yield Chunk(ch, [ord(ch)])
                finish = "length" if n == params.max_tokens else "stop"
                stats = GenerationStats(len(prompt_ids), n, ttft_s=0.002, decode_s=0.01)
                yield Chunk("", [], finish, stats)
            finally:
                self.closed.set()

        return chunks()

    def batch(self, max_batch: int, prefill_chunk: int = 0) -> StreamBatch:
        return StreamBatch(self, max_batch, prefill_chunk)

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(30)


class StreamBatch:
    """The engine loop's batch interface over `FakeGenerator.stream` iterators: each step
    advances every sequence by one chunk (one character)."""

    def __init__(self, gen: FakeGenerator, max_batch: int, prefill_chunk: int = 0) -> None:
        self._gen = gen
        self._max = self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        """What the engine loop and the scheduler plan with (BatchDecoder's own value)."""
        self._its: dict[Hashable, ChunkStream] = {}
        self.prefill_work: tuple[int, float] = (0, 0.0)
        self.prefilling = 0  # prompts are "prefilled" whole, in add()

    @property
    def active(self) -> int:
        return len(self._its)

    @property
    def keys(self) -> list[Hashable]:
        return list(self._its)

    def add(self, key: Hashable, prompt_ids: Sequence[int], params: SamplingParams) -> list[Chunk]:
        assert len(self._its) < self._max
        t = time.perf_counter()
        it = self._gen.stream(prompt_ids, params)
        first = next(it)
        self.prefill_work = (len(prompt_ids), time.perf_counter() - t)
        if first.finish_reason is None:
            self._its[key] = it
        else:
            it.close()
        return [first]

    prefill_batched = False  # one prompt per "prefill", as add() does them

    def add_many(self, items: Sequence[tuple[Hashable, Sequence[int], SamplingParams]]
                 ) -> dict[Hashable, list[Chunk] | Exception]:
        """One add() per item (a subclass's own add() too), each failing alone."""
        out: dict[Hashable, list[Chunk] | Exception] = {}
        tokens, seconds = 0, 0.0
        for key, ids, params in items:
            try:
                out[key] = self.add(key, ids, params)
            except Exception as e:
                out[key] = e
            tokens, seconds = tokens + self.prefill_work[0], seconds + self.prefill_work[1]
        self.prefill_work = (tokens, seconds)
        return out

    def step(self) -> dict[Hashable, list[Chunk]]:
        self.prefill_work = (0, 0.0)
        out: dict[Hashable, list[Chunk]] = {}
        for key, it in list(self._its.items()):
            chunk = next(it)
            out[key] = [chunk]
            if chunk.finish_reason is not None:
                self._its.pop(key).close()
        return out

    def remove(self, key: Hashable) -> bool:
        it = self._its.pop(key, None)
        if it is not None:
            it.close()
        return it is not None
