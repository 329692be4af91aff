#!/usr/bin/env python3
"""llama.cpp as the batching peer: aggregate decode tokens/s of 1, 2 and 4 parallel sequences.

The same measurement as scripts/bench_batching.py makes of our `BatchDecoder`, on the same
weights (bench_decode's Qwen2-0.5B-shape checkpoint as GGUF Q4_0) and the same prompt token
ids: every sequence is prefilled first, then only the decode steps are timed, one
`llama_decode` per step with one token per sequence (`seq_id` = stream). Greedy argmax over
each sequence's logits row, EOS ignored. Each stream's tokens are compared with llama.cpp's
own single-sequence greedy run of the same prompt.

It answers one question for the 2.5x bar: is "4 streams give about 2x one stream on this
CPU" a property of our runtime or of the machine? Run by bench_batching.py `--llama-peer` in
its own process (llama.cpp's and ONNX Runtime's thread pools do not share a process well):

    python scripts/bench/llama_batch.py --gguf G --prompts '[[1,2,3],[4,5]]' --tokens 64

prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STREAMS = (1, 2, 4)


class LlamaBatch:
    """One llama.cpp model and context with `streams` sequences; greedy decode by steps."""

    def __init__(self, gguf: Path, streams: int, n_ctx_per_seq: int, threads: int) -> None:
        import llama_cpp

        self.lc = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = streams * n_ctx_per_seq
        cparams.n_batch = cparams.n_ubatch = max(512, n_ctx_per_seq)
        cparams.n_seq_max = streams
        cparams.n_threads = cparams.n_threads_batch = threads
        self.kv_unified = bool(cparams.kv_unified)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, streams)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, items: Sequence[tuple[int, int, int]]) -> None:
        """(token, position, sequence) per batch row; logits for every row."""
        b = self.batch
        for i, (tok, pos, seq) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, row: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run(self, prompts: Sequence[Sequence[int]], tokens: int) -> tuple[float, int,
                                                                         list[list[int]]]:
        """(decode seconds, tokens produced by steps, token ids per stream)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        ids: list[list[int]] = []
        for seq, p in enumerate(prompts):  # prefill one sequence at a time, as ours joins
            self._decode([(t, pos, seq) for pos, t in enumerate(p)])
            ids.append([self._argmax(len(p) - 1)])
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            self._decode([(ids[s][-1], pos[s], s) for s in range(len(prompts))])
            for s in range(len(prompts)):
                ids[s].append(self._argmax(s))
                pos[s] += 1
        elapsed = time.perf_counter() - t0
        return elapsed, (tokens - 1) * len(prompts), ids


def measure(gguf: Path, prompts: Sequence[Sequence[int]], tokens: int, repeats: int,
            threads: int) -> dict[str, Any]:
    """Rows like bench_batching.measure's: median aggregate tok/s per stream count, ratio
    to one stream, tokens identical to llama.cpp's own single-sequence greedy run."""
    n_ctx = max(len(p) for p in prompts) + tokens + 16
    contexts = {n: LlamaBatch(gguf, n, n_ctx, threads) for n in STREAMS}
    try:
        one = contexts[1]
        reference = [one.run([p], tokens)[2][0] for p in prompts[: max(STREAMS)]]
        for n in STREAMS:  # warm-up
            contexts[n].run(prompts[:n], 4)
        runs: dict[int, list[float]] = {n: [] for n in STREAMS}
        identical = {n: True for n in STREAMS}
        for _ in range(repeats):  # stream counts interleaved, as in bench_batching
            for n in STREAMS:
                secs, produced, ids = contexts[n].run(prompts[:n], tokens)
                runs[n].append(produced / secs)
                identical[n] &= all(ids[i] == reference[i] for i in range(n))
        rows = [{"streams": n, "tok_s": statistics.median(runs[n]), "runs": runs[n],
                 "identical": identical[n]} for n in STREAMS]
        for r in rows:
            r["per_stream_tok_s"] = r["tok_s"] / r["streams"]
            r["ratio"] = r["tok_s"] / rows[0]["tok_s"]
        import llama_cpp

        return {"rows": rows, "kv_unified": contexts[4].kv_unified,
                "llama_cpp_version": llama_cpp.__version__,
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}
    finally:
        for c in contexts.values():
            c.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    prompts = json.loads(args.prompts)
    if len(prompts) < max(STREAMS):
        ap.error(f"--prompts needs {max(STREAMS)} prompts, got {len(prompts)}")
    out = measure(args.gguf, prompts, args.tokens, args.repeats, args.threads)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
