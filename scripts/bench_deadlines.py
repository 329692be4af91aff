#!/usr/bin/env python3
"""Deadline admission: can a client rely on the daemon's estimates?

    python scripts/bench_deadlines.py [--rounds 20] [--concurrency 15] [--bundle DIR --pubkey PEM]
        [--min-ms 60] [--max-ms 2000] [--seeds 14 15 16] [--no-write]

For each seed (the issue asks across repeated runs), starts one `edge-runtime serve` (its
own process group, a free loopback port) on the demo
bundle (the cached default bundle of `edge-runtime serve`, or `edge-build demo --out DIR`;
built on first use, a few CPU minutes) with the default configuration (no [scheduler] keys:
whatever the daemon picks itself), and no cloud path (refusals are final). Needs only the
project's own dependencies (httpx).

1. Alone: every request shape (4 prompts x max_tokens 8, 16, 32, 64) served alone, one after
   another, no deadline: its median latency over 3 runs, as the client sees it.
2. Rounds: `--rounds` x `--concurrency` concurrent chat requests (greedy; every other one
   streamed), each a random shape with a random budget, uniform in [`--min-ms`, `--max-ms`],
   sent as `x-request-deadline-ms`. Outcomes: 200 (answered; late if after its budget), 504
   `deadline_exceeded` (admitted, then cut off: the estimate was wrong), 429/503 (refused;
   for each: would it have finished in time alone, by phase 1's latency of its shape).
3. Single requests with budgets of 1.5x and 0.6x their shape's latency alone: each should be
   admitted and answered, resp. refused at once (the estimate, without the load).
4. The official `openai` client (a test dependency: `pip install openai`), default
   `max_retries` (2), sends the 0.6x requests again: how long until its caller gets the
   refusal (a retried 429 would take seconds).

The section between the `bench_deadlines` markers of docs/BENCHMARKS.md (`--no-write`: skip).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench.report import cpu_model, update_section
from overload.procs import Procs, free_port

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = "bench_deadlines"
PROMPTS = (
    "Say hello.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours and explain why you like each of them, briefly.",
)
MAX_TOKENS = (8, 16, 32, 64)


@dataclass
class Outcome:
    shape: tuple[int, int]
    budget_s: float
    status: int
    latency_s: float
    code: str | None
    message: str
    stream: bool = False


async def chat(client: httpx.AsyncClient, model: str, shape: tuple[int, int],
               budget_s: float | None, stream: bool = False) -> Outcome:
    """One chat request; a streamed one's error event counts as its status (504 for
    `deadline_exceeded` after the stream began)."""
    prompt, max_tokens = shape
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[prompt]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    headers = {} if budget_s is None else {"x-request-deadline-ms": f"{budget_s * 1000:.0f}"}
    t = time.perf_counter()
    err = None
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        status = r.status_code
        if status != 200:
            err = json.loads(await r.aread()).get("error")
        elif stream:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"error"' in line:
                    err = json.loads(line[6:])["error"]
                    status = 504 if err.get("code") == "deadline_exceeded" else 500
        else:
            await r.aread()
    took = time.perf_counter() - t
    return Outcome(shape, budget_s or 0.0, status, took,
                   err.get("code") if err else None, err.get("message", "") if err else "",
                   stream)


def _openai_refusals(url: str, model: str, asks: list[tuple[tuple[int, int], float]]
                     ) -> list[tuple[str, float]]:
    """(outcome, seconds until the caller had it) per request, through the openai client."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # max_retries: 2
    out = []
    for (prompt, max_tokens), budget_s in asks:
        t = time.perf_counter()
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[prompt]}],
                max_tokens=max_tokens, temperature=0,
                extra_headers={"x-request-deadline-ms": f"{budget_s * 1000:.0f}"})
            outcome = "answered"
        except openai.APIStatusError as e:
            outcome = str(e.status_code)
        out.append((outcome, time.perf_counter() - t))
    return out


def config(bundle: Path | None, pubkey: Path | None) -> str:
    # info: a cut-off request's line says what it was admitted with (--daemon-log keeps it)
    lines = ["[log]", 'access_log = ""', 'level = "info"']
    if bundle is not None:
        lines = ["[model]", f'bundle = "{bundle}"', f'pubkeys = ["{pubkey}"]', "", *lines]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace, url: str, model: str, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    shapes = [(p, n) for p in range(len(PROMPTS)) for n in MAX_TOKENS]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for shape in shapes:  # warm every shape once (first runs allocate)
            await chat(client, model, shape, None)
        alone: dict[tuple[int, int], float] = {}
        for shape in shapes:
            alone[shape] = statistics.median(
                [(await chat(client, model, shape, None)).latency_s for _ in range(3)])
        print("alone (s):", {f"{p}/{n}": round(v, 3) for (p, n), v in alone.items()},
              flush=True)
        outcomes: list[Outcome] = []
        for i in range(args.rounds):
            batch = [(rng.choice(shapes), rng.uniform(args.min_ms, args.max_ms) / 1000)
                     for _ in range(args.concurrency)]
            # every other request streamed (SSE): the serving path's per-token work too
            got = await asyncio.gather(*(chat(client, model, s, b, stream=k % 2 == 1)
                                         for k, (s, b) in enumerate(batch)))
            outcomes += got
            c = Counter(o.status for o in got)
            print(f"round {i + 1}: {dict(sorted(c.items()))}", flush=True)
            await asyncio.sleep(0.3)
        single: list[tuple[str, Outcome]] = []
        for shape in shapes:
            for factor, want in ((1.5, "admit"), (0.6, "refuse")):
                single.append((want, await chat(client, model, shape, factor * alone[shape])))
        metrics = (await client.get("/metrics")).text
    openai_s = await asyncio.to_thread(_openai_refusals, url, model,
                                       [(s, 0.6 * alone[s]) for s in shapes])
    return {"alone": alone, "outcomes": outcomes, "single": single, "openai": openai_s,
            "estimates": [line for line in metrics.splitlines()
                          if line.startswith("edge_runtime_estimate_")]}


def report(args: argparse.Namespace, runs: list[tuple[int, dict[str, object]]],
           wall_s: float) -> str:
    """One section for all seeds: a column per seed, the details of every seed together."""
    rows: dict[str, list[int]] = {}
    cut_lines: list[str] = []
    feasible_lines: list[str] = []
    reasons: Counter[str] = Counter()
    modes: list[str] = []
    late_ms: list[float] = []
    for seed, res in runs:
        alone: dict[tuple[int, int], float] = res["alone"]  # type: ignore[assignment]
        outs: list[Outcome] = res["outcomes"]  # type: ignore[assignment]
        ok = [o for o in outs if o.status == 200]
        cut = [o for o in outs if o.code == "deadline_exceeded"]
        refused = [o for o in outs if o.status in (429, 503)]
        other = [o for o in outs if o.status not in (200, 429, 503) and o not in cut]
        feasible = [o for o in refused if alone[o.shape] <= o.budget_s]
        for label, n in (
            ("sent", len(outs)),
            ("admitted and answered (200)", len(ok)),
            ("of which answered after their budget (client clock)",
             sum(o.latency_s > o.budget_s for o in ok)),
            ("admitted, then cut off (504 `deadline_exceeded`)", len(cut)),
            ("refused (429/503)", len(refused)),
            ("of which would have finished in time alone", len(feasible)),
            ("other statuses", len(other)),
        ):
            rows.setdefault(label, []).append(n)
        reasons.update(_reason(o.message) for o in refused)
        daemon: list[str] = res["cutoffs"]  # type: ignore[assignment]
        cut_lines += [f"- seed {seed}: budget {o.budget_s * 1000:.0f} ms, alone "
                      f"{alone[o.shape] * 1000:.0f} ms" for o in cut]
        cut_lines += [f"  - seed {seed}'s daemon: {line}" for line in daemon]
        feasible_lines += [f"- seed {seed}: {o.budget_s * 1000:.0f}, {alone[o.shape] * 1000:.0f}"
                           f": {o.message}" for o in feasible]
        late_ms += [1000 * (o.latency_s - o.budget_s) for o in ok if o.latency_s > o.budget_s]
        by_mode = {("stream" if st else "json"):
                   dict(sorted(Counter(o.status for o in outs if o.stream == st).items()))
                   for st in (False, True)}
        modes.append(f"seed {seed} {by_mode}")
    seed0, res0 = runs[0]
    alone0: dict[tuple[int, int], float] = res0["alone"]  # type: ignore[assignment]
    single: list[tuple[str, Outcome]] = res0["single"]  # type: ignore[assignment]
    oa: list[tuple[str, float]] = res0["openai"]  # type: ignore[assignment]
    s_admit = [o for want, o in single if want == "admit"]
    s_refuse = [o for want, o in single if want == "refuse"]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = [seed for seed, _ in runs]
    lines = [
        "## Deadline admission: estimates a client can rely on (#14 item 0)",
        "",
        "_Generated by `scripts/bench_deadlines.py`; do not edit between the markers._",
        "",
        f"`python scripts/bench_deadlines.py --rounds {args.rounds} --concurrency "
        f"{args.concurrency} --min-ms {args.min_ms:g} --max-ms {args.max_ms:g} --seeds "
        f"{' '.join(map(str, seeds))}` — {now}, {cpu_model()}, {wall_s:.0f} s. For each seed "
        "a fresh `edge-runtime serve` on the demo bundle with the default configuration, no "
        f"cloud path; {args.rounds} rounds of {args.concurrency} concurrent chat requests "
        "(every other one streamed), each one of 16 shapes (4 prompts x max_tokens "
        f"8/16/32/64) with a budget uniform in [{args.min_ms:g}, {args.max_ms:g}] ms "
        "(`x-request-deadline-ms`). \"Alone\": the shape's median latency served alone "
        "(client-side, 3 runs).",
        "",
        "| outcome | " + " | ".join(f"seed {x}" for x in seeds) + " | all |",
        "|---|" + "---:|" * (len(seeds) + 1),
        *[f"| {label} | " + " | ".join(map(str, ns)) + f" | {sum(ns)} |"
          for label, ns in rows.items()],
        "",
        "Refusal reasons: " + (", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "—")
        + ".",
        "",
        "Answered after their budget, by (client clock, ms): "
        + (", ".join(f"{v:.1f}" for v in sorted(late_ms)) or "—") + ".",
        "",
        f"Single requests (no load, seed {seed0}'s daemon): budget 1.5x alone — "
        f"{sum(o.status == 200 for o in s_admit)} of {len(s_admit)} admitted and answered; "
        f"budget 0.6x alone — {sum(o.status in (429, 503) for o in s_refuse)} of "
        f"{len(s_refuse)} refused at once (slowest refusal "
        f"{max((o.latency_s for o in s_refuse), default=0) * 1000:.0f} ms), "
        f"{sum(o.code == 'deadline_exceeded' for o in s_refuse)} cut off.",
        "",
        *[f"- refused at 1.5x (budget {o.budget_s * 1000:.0f} ms, alone "
          f"{alone0[o.shape] * 1000:.0f} ms): {o.message}"
          for o in s_admit if o.status != 200][:4],
        "",
        f"The openai client (max_retries 2) on the 0.6x requests: "
        f"{dict(Counter(o for o, _ in oa))}, the caller had the refusal after at most "
        f"{max((t for o, t in oa if o != 'answered'), default=0) * 1000:.0f} ms.",
        "",
        f"Latency alone by shape (seed {seed0}; ms; prompt/max_tokens): "
        + ", ".join(f"{p}/{n} {1000 * v:.0f}" for (p, n), v in sorted(alone0.items())) + ".",
        "",
    ]
    if cut_lines:
        lines += ["Cut off (the rounds' requests), and the daemon's log line for every request "
                  "it cut off (the single requests' too): what it was admitted with, how far "
                  "it got:",
                  "", *cut_lines, ""]
    if feasible_lines:
        lines += ["Refused though feasible alone (budget ms, alone ms, reason):", "",
                  *feasible_lines, ""]
    lines += [f"Statuses by mode: {'; '.join(modes)}.", ""]
    estimates: list[str] = res0["estimates"]  # type: ignore[assignment]
    lines += [f"The daemon's estimates at the end of seed {seed0}'s run (`/metrics`):", "",
              "```", *estimates, "```"]
    return "\n".join(lines)


def _reason(message: str) -> str:
    for key, words in (("queue full", "queue is full"), ("estimate > deadline", "exceeds the"),
                       ("would delay an admitted one", "would push"),
                       ("late in the queue", "waited")):
        if words in message:
            return key
    return "other"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the demo bundle)")
    ap.add_argument("--pubkey", type=Path, help="the bundle's public key (PEM)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=15)
    ap.add_argument("--min-ms", type=float, default=60.0)
    ap.add_argument("--max-ms", type=float, default=2000.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[14, 15, 16],
                    help="one run (a fresh daemon) per seed of the random shapes and budgets")
    ap.add_argument("--daemon-log", type=Path,
                    help="keep the daemons' logs here (a directory: serve-SEED.log)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bundle is None:
        from edge_build.demo import default_bundle

        args.bundle, args.pubkey = default_bundle()  # cached after the first build
    t0 = time.perf_counter()
    runs: list[tuple[int, dict[str, object]]] = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-deadlines-") as tmp:
            procs = Procs(Path(tmp))
            try:
                port = free_port()
                daemon = procs.daemon("serve", config(args.bundle, args.pubkey), port)
                url = f"http://127.0.0.1:{port}"
                model = procs.wait_daemon(daemon, url)
                res = asyncio.run(run(args, url, model, seed))
            finally:
                procs.close()
            log = (Path(tmp) / "serve.log").read_text(errors="replace")
            if args.daemon_log is not None:
                args.daemon_log.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(tmp) / "serve.log", args.daemon_log / f"serve-{seed}.log")
        # why each cut-off happened, in the daemon's words
        res["cutoffs"] = [line.split("engine_loop: ", 1)[-1] for line in log.splitlines()
                          if "reached its deadline" in line]
        runs.append((seed, res))
    md = report(args, runs, time.perf_counter() - t0)
    print(md)
    if not args.no_write:
        update_section(DOC, MARK, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
