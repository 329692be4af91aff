"""Interleaved decode benchmark: unfused vs fused int4 decoder, same process, A B A B ...

Batch 1, a `--prompt`-token prompt, `--new` greedy tokens, IOBinding as in
scripts/bench/contenders.py's bare ORT loop. The two graphs alternate round by round so that a
shift in load from other users of the machine hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort


class Decoder:
    def __init__(self, path: str, threads: int) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ins = self.sess.get_inputs()
        self.past = [i.name for i in ins if i.name.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        shape = ins[[i.name for i in ins].index(self.past[0])].shape
        self.vocab = int(self.sess.get_outputs()[0].shape[-1])
        self.empty = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, int(shape[1]), 0, int(shape[3])), np.float32))
        self.io = self.sess.io_binding()

    def _step(self, ids: np.ndarray, start: int, past: list[Any], logits: np.ndarray,
              ones: np.ndarray, pos: np.ndarray) -> list[Any]:
        io, end = self.io, start + ids.shape[1]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", ones[:, :end])
        io.bind_cpu_input("position_ids", pos[:, start:end])
        for name, value in zip(self.past, past, strict=True):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in self.present:
            io.bind_output(name, "cpu")
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[1:]

    def generate(self, prompt: Sequence[int], n: int) -> tuple[list[int], float, float]:
        ctx = len(prompt) + n + 8
        ones = np.ones((1, ctx), np.int64)
        pos = np.arange(ctx, dtype=np.int64)[None, :]
        ids = np.asarray([prompt], np.int64)
        pre = np.empty((1, ids.shape[1], self.vocab), np.float32)
        step = np.empty((1, 1, self.vocab), np.float32)
        tok = np.empty((1, 1), np.int64)
        t0 = time.perf_counter()
        past = self._step(ids, 0, [self.empty] * len(self.past), pre, ones, pos)
        out = [int(pre[0, -1].argmax())]
        t1 = time.perf_counter()
        p = ids.shape[1]
        while len(out) < n:
            tok[0, 0] = out[-1]
            past = self._step(tok, p, past, step, ones, pos)
            out.append(int(step[0, -1].argmax()))
            p += 1
        t2 = time.perf_counter()
        return out, t1 - t0, (n - 1) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("unfused")
    ap.add_argument("fused")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3)
    a = ap.parse_args()
    dec = {"unfused": Decoder(a.unfused, a.threads), "fused": Decoder(a.fused, a.threads)}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, dec["fused"].vocab - 100, a.prompt).tolist()
               for _ in range(a.prompts)]
    tokens: dict[str, list[list[int]]] = {k: [] for k in dec}
    for k, d in dec.items():  # warm-up, and the equality evidence on every prompt
        for p in prompts:
            tokens[k].append(d.generate(p, a.new)[0])
    tps: dict[str, list[float]] = {k: [] for k in dec}
    ttft: dict[str, list[float]] = {k: [] for k in dec}
    for r in range(a.rounds):
        for k in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
            _, t_first, rate = dec[k].generate(prompts[r % len(prompts)], a.new)
            tps[k].append(rate)
            ttft[k].append(t_first)
            print(f"round {r} {k:8s} decode {rate:6.2f} tok/s  prefill {t_first * 1e3:6.1f} ms",
                  flush=True)
    same = [u == f for u, f in zip(tokens["unfused"], tokens["fused"], strict=True)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(u, f, strict=True)) if x != y), None)
                  for u, f in zip(tokens["unfused"], tokens["fused"], strict=True)]
    print(json.dumps({
        "decode_tps_median": {k: statistics.median(v) for k, v in tps.items()},
        "decode_tps_all": tps,
        "prefill_ms_median": {k: 1e3 * statistics.median(v) for k, v in ttft.items()},
        "greedy_equal_per_prompt": same, "first_divergence": first_diff,
    }, indent=1))


if __name__ == "__main__":
    main()
