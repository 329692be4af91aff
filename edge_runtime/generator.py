"""Text generation over a decoder graph with a KV cache: prefill, then one token per step.

    prompt ids ─▶ prefill (whole prompt, empty cache) ─▶ logits[-1] ─▶ sampler ─▶ token
                                  ▲                                               │
                                  └──── decode (one token, cache from last step) ◀┘

The cache never passes through numpy: `present.*` outputs of one step are bound as the
`past_key_values.*` inputs of the next as engine tensors (see engines/). Per step, Python does
only what it must: pick a token, detokenize incrementally, look for stop strings.
"""

from __future__ import annotations

import collections.abc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.bundle import Bundle, GenerationDefaults, GraphSpec
from edge_runtime.engines import DeviceTensor, Engine, load_engine
from edge_runtime.errors import BundleError, ContextLengthError, GenerationError
from edge_runtime.sampling import Sampler, SamplingParams
from edge_runtime.tokenizer import IncrementalDecoder, TextTokenizer


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed completion. The last chunk has `finish_reason` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop' (EOS or a stop string) or 'length' (max_tokens or the context is full)."""
    stats: GenerationStats | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    ttft_s: float = 0.0
    """Request start to first sampled token (prefill + first sampling)."""
    decode_s: float = 0.0
    """First token to last token."""

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


ChunkStream = collections.abc.Generator["Chunk", None, None]
"""What `Generator.stream` returns; `close()` on it stops generation between tokens."""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(repr=False)


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        # Hold back the longest suffix that is a prefix of some stop string.
        hold = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Generator:
    """Generates for one sequence at a time on one engine."""

    def __init__(
        self,
        engine: Engine,
        graph: GraphSpec,
        tokenizer: TextTokenizer,
        defaults: GenerationDefaults,
    ) -> None:
        if graph.kv_cache is None:
            raise BundleError("decoder graph has no kv_cache spec; cannot generate")
        self.engine = engine
        self.graph = graph
        self.tokenizer = tokenizer
        self.defaults = defaults
        kv = graph.kv_cache
        self._kv = kv
        self._past = [
            n
            for i in range(kv.num_layers)
            for n in (kv.past_key.format(layer=i), kv.past_value.format(layer=i))
        ]
        self._present = [
            n
            for i in range(kv.num_layers)
            for n in (kv.present_key.format(layer=i), kv.present_value.format(layer=i))
        ]
        names = {s.name for s in engine.inputs}
        missing = [n for n in ("input_ids", *self._past) if n not in names]
        if missing:
            raise BundleError(f"decoder graph lacks inputs {missing}")
        self._has_mask = "attention_mask" in names
        self._has_positions = "position_ids" in names
        self._eos = frozenset(defaults.eos_token_ids)
        ctx = defaults.context_length
        # Reused every step: a view [:, :n] of a C-contiguous row is itself contiguous.
        self._ones = np.ones((1, ctx), dtype=np.int64)
        self._positions = np.arange(ctx, dtype=np.int64)[None, :]
        self._logits: np.ndarray | None = None
        spec = next((o for o in graph.outputs if o.name == "logits"), None)
        if graph.last_token_logits and spec is not None and isinstance(spec.shape[-1], int):
            self._logits = np.empty((1, 1, spec.shape[-1]), dtype=spec.dtype)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, backend: str = "auto", threads: int | None = None
    ) -> Generator:
        m = bundle.manifest
        graph = bundle.graph("decoder")
        engine = load_engine(str(bundle.path(graph.file)), backend=backend, threads=threads)
        tok_cfg = bundle.path(m.tokenizer.config_file) if m.tokenizer.config_file else None
        tokenizer = TextTokenizer.from_files(bundle.path(m.tokenizer.file), tok_cfg)
        if m.tokenizer.chat_template:
            tokenizer.chat_template = m.tokenizer.chat_template
        return cls(engine, graph, tokenizer, m.generation)

    @property
    def context_length(self) -> int:
        return self.defaults.context_length

    # -- prompts ------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat(messages))

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """The max_tokens to use, or a ContextLengthError quoting the numbers."""
        room = self.context_length - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens; the model's context is "
                f"{self.context_length}, leaving no room to generate",
                "messages",
            )
        if max_tokens is None:
            return min(self.defaults.max_new_tokens, room)
        if max_tokens > room:
            raise ContextLengthError(
                f"max_tokens {max_tokens} + prompt {prompt_len} tokens exceeds the "
                f"context length {self.context_length}",
                "max_tokens",
            )
        return max_tokens

    # -- generation ---------------------------------------------------------------------

    def _step(
        self, ids: np.ndarray, start: int, past: Mapping[str, DeviceTensor]
    ) -> tuple[np.ndarray, dict[str, DeviceTensor]]:
        """Run positions [start, start + len(ids)); return last-position logits and cache."""
        end = start + ids.shape[1]
        feeds: dict[str, Any] = {"input_ids": ids, **past}
        if self._has_mask:
            feeds["attention_mask"] = self._ones[:, :end]
        if self._has_positions:
            feeds["position_ids"] = self._positions[:, start:end]
        # A last-position graph always yields [1, 1, V]: ORT writes into one reused buffer.
        out = {"logits": self._logits} if self._logits is not None else None
        host, device = self.engine.run(feeds, ("logits",), self._present, out=out)
        logits = host["logits"][0, -1]  # [V]
        cache = {p: device[q] for p, q in zip(self._past, self._present, strict=True)}
        return logits, cache

    def _empty_cache(self) -> dict[str, DeviceTensor]:
        kv = self._kv
        return {
            name: self.engine.empty((1, kv.num_kv_heads, 0, kv.head_dim), kv.dtype)
            for name in self._past
        }

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> ChunkStream:
        """Yield text deltas as tokens are decoded; the last chunk carries finish and stats."""
        if not prompt_ids:
            raise GenerationError("prompt is empty", "prompt")
        n_prompt = len(prompt_ids)
        max_tokens = self.resolve_max_tokens(n_prompt, params.max_tokens)
        t0 = time.perf_counter()
        stats = GenerationStats(prompt_tokens=n_prompt)
        sampler = Sampler(params)
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopMatcher(params.stop)

        ids = np.asarray([prompt_ids], dtype=np.int64)  # [1, S]
        logits, cache = self._step(ids, 0, self._empty_cache())
        pos = n_prompt
        finish = "length"
        tail: str | None = None  # text before a stop string, once one is hit
        t_first = t0
        pending: list[int] = []  # tokens whose text is not yet out (held back or partial)
        step_ids = np.empty((1, 1), dtype=np.int64)
        while True:
            token = sampler(logits)
            if stats.completion_tokens == 0:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            if token in self._eos:
                finish = "stop"
                break
            stats.completion_tokens += 1
            pending.append(token)
            text, hit = stops.feed(decoder.push(token))
            if hit:
                finish, tail = "stop", text
                break
            if text:
                yield Chunk(text, pending)
                pending = []
            if stats.completion_tokens >= max_tokens:
                break
            step_ids[0, 0] = token
            logits, cache = self._step(step_ids, pos, cache)
            pos += 1
        if tail is None:  # EOS or length: release what was held back
            tail, hit = stops.feed(decoder.flush())
            if hit:
                finish = "stop"
            else:
                tail += stops.flush()
        stats.decode_s = time.perf_counter() - t_first
        yield Chunk(tail, pending, finish, stats)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        parts: list[str] = []
        ids: list[int] = []
        for chunk in self.stream(prompt_ids, params):
            parts.append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                assert chunk.stats is not None
                return Completion("".join(parts), ids, chunk.finish_reason, chunk.stats)
        raise AssertionError("stream ended without a finish chunk")

    def warmup(self) -> None:
        """One short generation so the first real request does not pay for lazy init."""
        self.generate([0], SamplingParams(max_tokens=2, temperature=0.0))
