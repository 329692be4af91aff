"""Load generation and statistics for the overload benchmark.

One request = one streamed `/v1/completions` call through httpx. Its clock starts at its
*scheduled* arrival time (open loop: a late client does not hide queueing, no coordinated
omission), TTFT is the first SSE event, latency the `[DONE]` event. Outcomes:

    ok        200, a finish_reason and [DONE]
    rejected  429 or 503 (the explicit "no" the issue allows)
    expired   an error event inside the stream saying the deadline passed (an explicit
              failure at the deadline: the cloud could not finish in time, or a local
              generation was ended at its deadline), or a 504
    error     any other status, or any other error event inside the stream
    lost      the connection failed or the stream ended without a finish
    hung      no end within the hard cap (the request is then abandoned)
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

PROMPTS = (
    "The robot arm picks up the red box and",
    "Once upon a time",
    "In the factory cell, the inspection camera reports that",
    "Hello, kiosk. Please tell me",
    "The weather today is",
    "Step one of the maintenance procedure is to",
    "A short story about a lighthouse keeper:",
    "The delivery robot reached the door and",
)


@dataclass
class Result:
    outcome: str = "lost"
    status: int | None = None
    served_by: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    detail: str = ""
    send_lag_s: float | None = None
    """Scheduled arrival → the request leaves this client (its own CPU starvation)."""
    end_s: float | None = None
    """Scheduled arrival → the request's last byte, whatever its outcome."""
    max_tokens: int = 0
    t_arrival: float = 0.0
    """Its scheduled arrival (perf_counter), to place it on a fault timeline."""


@dataclass(frozen=True)
class Workload:
    base_url: str
    model: str
    max_tokens: tuple[int, ...]
    """Each request asks for one of these (seeded choice): generation lengths to compare."""
    hard_cap_s: float
    deadline_ms: float | None = None
    """The request's deadline from its scheduled arrival, when set: sent as
    `x-request-deadline-ms` less the time the client itself was late in sending it."""


async def one_request(
    client: httpx.AsyncClient, w: Workload, prompt: str, t_arrival: float, max_tokens: int
) -> Result:
    """Send one streamed completion at (about) `t_arrival` (perf_counter clock)."""
    res = Result(max_tokens=max_tokens, t_arrival=t_arrival)
    body = {"model": w.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True}

    async def run() -> None:
        res.send_lag_s = time.perf_counter() - t_arrival
        headers = {}
        if w.deadline_ms is not None:
            # The deadline counts from when the user asked (the scheduled arrival), as the
            # latencies do: a client that is late in sending leaves the daemon less time.
            left_ms = max(1.0, w.deadline_ms - res.send_lag_s * 1000)
            headers["x-request-deadline-ms"] = f"{left_ms:.0f}"
        async with client.stream("POST", f"{w.base_url}/v1/completions", json=body,
                                 headers=headers) as resp:
            res.status = resp.status_code
            res.served_by = resp.headers.get("x-served-by")
            if resp.status_code in (429, 503):
                res.outcome = "rejected"
                res.detail = (await resp.aread()).decode(errors="replace")[:300]
                res.latency_s = time.perf_counter() - t_arrival
                return
            if resp.status_code != 200:
                res.outcome = "expired" if resp.status_code == 504 else "error"
                res.detail = (await resp.aread()).decode(errors="replace")[:200]
                return
            finished = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t_arrival
                data = line[6:]
                if data == "[DONE]":
                    if finished:
                        res.outcome = "ok"
                        res.latency_s = time.perf_counter() - t_arrival
                    return
                event = json.loads(data)
                if "error" in event:
                    res.detail = str(event["error"].get("message", event["error"]))[:200]
                    res.outcome = "expired" if "deadline" in res.detail else "error"
                    return
                if any(c.get("finish_reason") for c in event.get("choices", [])):
                    finished = True
            res.detail = "stream ended without [DONE]"

    delay = t_arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        left = t_arrival + w.hard_cap_s - time.perf_counter()
        await asyncio.wait_for(run(), timeout=max(0.1, left))
    except asyncio.TimeoutError:
        res.outcome, res.detail = "hung", f"no end within {w.hard_cap_s:.0f} s"
    except httpx.HTTPError as e:
        res.outcome, res.detail = "lost", f"{type(e).__name__}: {e}"[:200]
    res.end_s = time.perf_counter() - t_arrival
    return res


async def open_loop(w: Workload, rate: float, n: int, seed: int) -> list[Result]:
    """`n` requests with Poisson arrivals at `rate` per second (seeded)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(w.hard_cap_s), limits=limits) as client:
        t = time.perf_counter() + 0.2
        tasks = []
        for _ in range(n):
            prompt, tokens = rng.choice(PROMPTS), rng.choice(w.max_tokens)
            tasks.append(asyncio.create_task(one_request(client, w, prompt, t, tokens)))
            t += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


async def closed_loop(
    w: Workload, concurrency: int, n: int, seed: int
) -> tuple[float, list[Result]]:
    """`concurrency` clients back to back until `n` requests are done: (req/s, results)."""
    rng = random.Random(seed)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(w.hard_cap_s), limits=limits) as client:
        remaining = n

        async def client_loop() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                prompt, tokens = rng.choice(PROMPTS), rng.choice(w.max_tokens)
                results.append(
                    await one_request(client, w, prompt, time.perf_counter(), tokens)
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = sum(r.outcome == "ok" for r in results)
    return ok / elapsed, results


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); nan when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def by_length(results: Sequence[Result]) -> dict[int, dict[str, float | int]]:
    """Per requested max_tokens: how many were served where, and their p99 latencies (the
    cloud's p99 differs by generation length; the scheduler reads it per length)."""
    out: dict[int, dict[str, float | int]] = {}
    for tokens in sorted({r.max_tokens for r in results}):
        rs = [r for r in results if r.max_tokens == tokens and r.outcome == "ok"]
        row: dict[str, float | int] = {}
        for where in ("local", "cloud"):
            lat = [r.latency_s for r in rs if r.served_by == where and r.latency_s is not None]
            row[f"n_{where}"] = len(lat)
            row[f"p99_{where}"] = pct(lat, 99)
        out[tokens] = row
    return out


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.outcome == "ok"]
    local = [r for r in ok if r.served_by == "local"]
    cloud = [r for r in ok if r.served_by == "cloud"]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    lat_local = [r.latency_s for r in local if r.latency_s is not None]
    lat_cloud = [r.latency_s for r in cloud if r.latency_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    ttft_local = [r.ttft_s for r in local if r.ttft_s is not None]
    ttft_cloud = [r.ttft_s for r in cloud if r.ttft_s is not None]
    n = len(results)
    out: dict[str, Any] = {
        "n": n,
        "ok": len(ok),
        "local": len(local),
        "cloud": len(cloud),
        "rejected": sum(r.outcome == "rejected" for r in results),
        "expired": sum(r.outcome == "expired" for r in results),
        "expired_local": sum(r.outcome == "expired" and r.served_by == "local"
                             for r in results),
        "expired_cloud": sum(r.outcome == "expired" and r.served_by == "cloud"
                             for r in results),
        "errors": sum(r.outcome == "error" for r in results),
        "lost": sum(r.outcome == "lost" for r in results),
        "hung": sum(r.outcome == "hung" for r in results),
        "offload_share": len(cloud) / n if n else math.nan,
    }
    lag = [r.send_lag_s for r in results if r.send_lag_s is not None]
    out["send_lag_p99"] = pct(lag, 99)
    for name, vals in (("lat", lat), ("lat_local", lat_local), ("lat_cloud", lat_cloud),
                       ("ttft", ttft), ("ttft_local", ttft_local), ("ttft_cloud", ttft_cloud)):
        for p in (50, 95, 99):
            out[f"{name}_p{p}"] = pct(vals, p)
    out["by_length"] = by_length(results)
    return out
