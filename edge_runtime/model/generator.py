"""Text generation over a decoder graph with a KV cache: prefill, then one token per step.

    prompt ids ─▶ prefill (whole prompt, empty cache) ─▶ logits[-1] ─▶ sampler ─▶ token
                                  ▲                                               │
                                  └──── decode (one token, cache from last step) ◀┘

The cache never passes through numpy: `present.*` outputs of one step are bound as the
`past_key_values.*` inputs of the next as engine tensors (see engines/). Per step, Python does
only what it must: pick a token, detokenize incrementally, look for stop strings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.bundle.manifest import Bundle, GenerationDefaults, GraphSpec
from edge_runtime.engines.load import load_engine
from edge_runtime.engines.protocol import DeviceTensor, Engine
from edge_runtime.errors import BundleError, ContextLengthError
from edge_runtime.model.batching import BatchDecoder
from edge_runtime.model.prefix_cache import MIN_TOKENS, PrefixCache
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.speculative import Speculator
from edge_runtime.model.stream import (
    ChunkStream,
    Completion,
)
from edge_runtime.model.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

DRAFT = "draft"
"""The bundle graph of the draft model speculative decoding proposes tokens with."""


def engine_defaults(engine: Engine, defaults: GenerationDefaults) -> GenerationDefaults:
    """The bundle's generation defaults with the context capped to what the engine holds.

    A TensorRT plan is built for a maximum context (`--profile max_context=N`) that may be
    shorter than the model's: a request that would outgrow it is then refused up front with
    the usual context-length error, instead of failing inside the engine mid-generation.
    """
    limit: int | None = getattr(engine, "max_context", None)
    if limit is None or limit >= defaults.context_length:
        return defaults
    log.info("context capped at %d tokens by the engine %s (the model's is %d)", limit,
             engine.name, defaults.context_length)
    return dataclasses.replace(defaults, context_length=limit)


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
        self.ones = np.ones((1, ctx), dtype=np.int64)
        self.positions = np.arange(ctx, dtype=np.int64)[None, :]
        spec = next((o for o in graph.outputs if o.name == "logits"), None)
        self._logits_spec = spec if spec is not None and isinstance(spec.shape[-1], int) else None
        self._window = graph.logits_window if graph.last_token_logits else None
        self._starts = [np.array([-max(n, 1)], dtype=np.int64) for n in range(18)]
        self.draft: Generator | None = None
        """The bundle's draft model (speculative decoding), when it has one and it is on."""
        self._speculator: Speculator | None = None
        self.prefix_cache: PrefixCache | None = None
        """KV of prompt prefixes reused by later prompts (use_prefix_cache); None: off."""

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, backend: str = "auto", threads: int | None = None,
        speculative: bool = True,
    ) -> Generator:
        m = bundle.manifest
        # The spec of the graph that really runs: TensorRT may run the bundle's QDQ graph
        # (decomposed attention) where ONNX Runtime runs the fused one (engines/load.py).
        engine, graph = load_engine(bundle, "decoder", backend=backend, threads=threads)
        tok_cfg = bundle.path(m.tokenizer.config_file) if m.tokenizer.config_file else None
        tokenizer = TextTokenizer.from_files(bundle.path(m.tokenizer.file), tok_cfg)
        if m.tokenizer.chat_template:
            tokenizer.chat_template = m.tokenizer.chat_template
        gen = cls(engine, graph, tokenizer, engine_defaults(engine, m.generation))
        if speculative and DRAFT in m.graphs and gen.windowed:
            # The draft has no TensorRT plan of its own: "tensorrt" means the decoder's. One
            # CPU thread: its steps alternate with the decoder's, and a second ONNX Runtime
            # pool spinning beside the decoder's took half the CPU from it (measured: 2x
            # slower rounds on two cores); a small model gains nothing from two threads.
            d_backend = "auto" if backend == "tensorrt" else backend
            d_engine, d_graph = load_engine(bundle, DRAFT, backend=d_backend, threads=1)
            gen.draft = cls(d_engine, d_graph, tokenizer, gen.defaults)
            log.info("speculative decoding with the bundle's draft graph (%d of the "
                     "decoder's %d layers)", d_graph.kv_cache.num_layers if d_graph.kv_cache
                     else 0, gen._kv.num_layers)
        return gen

    @property
    def windowed(self) -> bool:
        """This last-position graph returns the logits of its last k positions on request
        (GraphSpec.logits_window): speculative verification, and prompts of different
        lengths prefilled together on a right-padded graph."""
        return self._window is not None

    @property
    def speculative(self) -> bool:
        """A draft model is loaded and this graph returns logits for k + 1 positions."""
        return self.draft is not None and self.windowed

    def speculator(self) -> Speculator | None:
        """The speculative decoder of this generator's batches of one (None without a
        draft): one per generator, so what it learns (acceptance rate, step costs, k) carries
        over from one batch and one request to the next."""
        if self.draft is None or self._window is None:
            return None
        if self._speculator is None:
            self._speculator = Speculator(self, self.draft)
        return self._speculator

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

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def last_token_logits(self) -> bool:
        return self._logits_spec is not None and self.graph.last_token_logits

    @property
    def vocab_size(self) -> int:
        return int(self._logits_spec.shape[-1]) if self._logits_spec is not None else 0

    @property
    def logits_dtype(self) -> str:
        return self._logits_spec.dtype if self._logits_spec is not None else "float32"

    def forward(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        past: Mapping[str, DeviceTensor],
        out: np.ndarray | None = None,
        window: int = 0,
    ) -> tuple[np.ndarray, dict[str, DeviceTensor]]:
        """One graph run: ids/positions [B, S], mask [B, P + S] → logits, new cache.

        `out`, when given, is a [B, 1, V] buffer the engine writes the logits into.
        `window` > 0 asks a last-position graph for the last `window` positions' logits
        (GraphSpec.logits_window: speculative verification).
        """
        feeds: dict[str, Any] = {"input_ids": ids, **past}
        if self._window is not None:  # a required input of such a graph: -1 = last only
            feeds[self._window] = (self._starts[window] if window < len(self._starts)
                                   else np.array([-window], dtype=np.int64))
        if self._has_mask:
            feeds["attention_mask"] = mask
        if self._has_positions:
            feeds["position_ids"] = positions
        host, device = self.engine.run(
            feeds, ("logits",), self._present, out={"logits": out} if out is not None else None
        )
        cache = {p: device[q] for p, q in zip(self._past, self._present, strict=True)}
        return host["logits"], cache

    def empty_cache(self, batch: int) -> dict[str, DeviceTensor]:
        kv = self._kv
        return {
            name: self.engine.empty((batch, kv.num_kv_heads, 0, kv.head_dim), kv.dtype)
            for name in self._past
        }

    def use_prefix_cache(self, budget_bytes: int, min_tokens: int = MIN_TOKENS) -> None:
        """Keep prompt prefixes' KV caches within `budget_bytes` for later prompts (0: off;
        a new budget starts empty). Off for an engine compiled for fixed shape ranges (a
        TensorRT plan): it prefills only over an empty cache, as with chunked prefill."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.prefix_cache = None
        if budget_bytes <= 0:
            return
        if getattr(self.engine, "max_batch", None) is not None:
            log.info("prefix cache off: the engine %s prefills only over an empty cache",
                     self.engine.name)
            return
        self.prefix_cache = PrefixCache(self.engine, self._kv, budget_bytes, min_tokens)

    def batch(self, max_batch: int, prefill_chunk: int = 0,
              reuse_prefixes: bool = True) -> BatchDecoder:
        """A continuous batch of up to `max_batch` sequences on this generator's engine;
        prompts longer than `prefill_chunk` tokens (0: off) are prefilled a chunk per step;
        `reuse_prefixes`: use the prefix cache, if there is one."""

        return BatchDecoder(self, max_batch, prefill_chunk, reuse_prefixes)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> ChunkStream:
        """Yield text deltas as tokens are decoded; the last chunk carries finish and stats.

        A batch of one: the same code path as continuous batching, without its surgery.
        """
        yield from self.batch(1).decode_alone(prompt_ids, params)

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
        """A request's path once, so the first real request does not pay for lazy init: the
        chat template's compilation, a prefill of a chat prompt's length, streamed tokens
        and their detokenization. The demo bundle's first chat request took 15-17 ms more
        than the next ones after a one-token warm-up, 0-1 ms after this one (over HTTP: 45
        against 12 ms) — time the scheduler's estimates, learned from warm requests, did not
        foresee: bench_deadlines' first burst had a request cut off at its deadline."""
        ids = self.chat_prompt([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Warm up: say hello."},
        ])
        limit = max(1, self.context_length - 8)
        # Not through the prefix cache: a warm-up is no request, its prompt no prefix to keep.
        alone = self.batch(1, reuse_prefixes=False)
        for _ in alone.decode_alone(ids[-limit:], SamplingParams(max_tokens=8, temperature=0.0)):
            pass
