#!/usr/bin/env python3
"""On the GPU machine: the start-up capacity probe (serving/capacity.py) on a bundle served by
ONNX Runtime's CUDA provider, and the engine-only cost of N requests decoded together vs one
alone (BatchDecoder, greedy, EOS ignored).

    python scripts/gpu/capacity.py --bundle DIR --pubkey PEM [--concurrent 15] [--tokens 32]

Prints the memory reading (cudaMemGetInfo on a discrete GPU when cuda-python is there, else
MemAvailable), the capacity line the daemon would log, the together ÷ alone ratio, and the
prefill of the N prompts one by one against one batched run (BatchDecoder.add_many).

Run so far on the CPU only (demo bundle, 2 cores: engine only, 32 tokens, alone 5.4 ms, 15
together 35.6 ms, 6.56x). Not yet on a GPU: the GPU machine's image has onnxruntime 1.30
without the CUDA provider (and cuda-python, but not `cryptography`), so the onnxruntime-gpu
wheel must be staged first (scripts/gpu/stage.sh: five calls of about 55 MiB each) and
PYTHONPATH must put it and the pipeline wheels (.gpu/whl) ahead of the image's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.capacity import capacity_for, read_memory
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.signing import trusted_keys


def together(gen: Generator, prompts: list[list[int]], tokens: int) -> float:
    """Seconds to answer `prompts` arriving at once, as the engine loop does: one add_many
    (prompts prefilled together where the graph allows), then steps until all are done."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    batch = gen.batch(max(len(prompts), 1), reuse_prefixes=False)
    t = time.perf_counter()
    batch.add_many([(i, p, params) for i, p in enumerate(prompts)])
    while batch.active:
        batch.step()
    return time.perf_counter() - t


def prefills(gen: Generator, prompts: list[list[int]], one_by_one: bool) -> float:
    """Seconds to prefill `prompts` and sample their first tokens (no decode step)."""
    params = SamplingParams(max_tokens=2, temperature=0.0)
    batch = gen.batch(max(len(prompts), 1), reuse_prefixes=False)
    t = time.perf_counter()
    if one_by_one:
        for i, p in enumerate(prompts):
            batch.add(i, p, params)
    else:
        batch.add_many([(i, p, params) for i, p in enumerate(prompts)])
        assert batch.prefill_batched or len(prompts) < 2, "this graph prefills one by one"
    took = time.perf_counter() - t
    batch.clear()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--pubkey", type=Path, required=True)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--concurrent", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    bundle = verify_bundle(args.bundle, trusted_keys([args.pubkey]))
    gen = Generator.from_bundle(bundle, backend=args.backend)
    gen.warmup()
    print("engine:", gen.engine.name)
    print("memory:", read_memory(gen.engine.name))
    for _ in range(2):
        cap = capacity_for(gen, SchedulerConfig())
        print("capacity:", cap.describe())
    fixed = Generator(gen.engine, gen.graph, gen.tokenizer,
                      dataclasses.replace(gen.defaults, eos_token_ids=[]))
    prompts = [fixed.chat_prompt([{"role": "user", "content": f"Tell me about robot {i}."}])
               for i in range(args.concurrent)]
    together(fixed, prompts, args.tokens)  # warm-up at this shape
    alone = statistics.median(together(fixed, prompts[:1], args.tokens) for _ in range(5))
    many = statistics.median(together(fixed, prompts, args.tokens) for _ in range(5))
    print(f"engine only, {args.tokens} tokens: alone {1000 * alone:.1f} ms, "
          f"{args.concurrent} together {1000 * many:.1f} ms: {many / alone:.2f}x")
    prefills(fixed, prompts, one_by_one=False)  # warm-up at the batched shape
    apart = statistics.median(prefills(fixed, prompts, one_by_one=True) for _ in range(5))
    joint = statistics.median(prefills(fixed, prompts, one_by_one=False) for _ in range(5))
    lengths = sorted(len(p) for p in prompts)
    print(f"prefill of {args.concurrent} prompts ({lengths[0]}-{lengths[-1]} tokens) and their "
          f"first tokens: one by one {1000 * apart:.1f} ms, in one run {1000 * joint:.1f} ms "
          f"({apart / joint:.2f}x)")


if __name__ == "__main__":
    main()
