"""Fault phases of the overload benchmark: the broker dies under load; a cloud worker dies.

Both run open-loop load against the `ours` daemon and act on a timeline measured from the
first scheduled arrival (the arrivals span about n / rate seconds):

    broker:  kill Mosquitto (SIGKILL) at 1/4 of the span, start it again on the same port at
             1/2 (the second half shows the recovery: the daemon's and the workers'
             reconnect backoff, then the breaker's probe). Recorded: when /metrics says
             offload is unavailable (the breaker opened, or the connection is known lost),
             when it is available again, and when the first request after the restart is
             served by the cloud. Local serving must go on with
             no errors; requests that were in the cloud when it died fail explicitly.
    worker:  two cloud workers share the subscription; one is SIGKILLed at 1/3 of the span,
             in the middle of its requests. Every request must end — answered, refused
             (429/503) or failed explicitly — within its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from overload.load import Result, Workload, open_loop, summarize

GAUGE = "edge_runtime_offload_available"
LATE_MARGIN_S = 0.25
"""An end counts as late when it comes this long after the request's deadline (the daemon
answers at the deadline; this covers the loopback hop and the client's own scheduling)."""


def offload_available(base: str) -> bool:
    """The daemon's gauge, read once (blocking)."""
    async def read() -> bool | None:
        async with httpx.AsyncClient() as client:
            return await _offload_available(client, base)
    return asyncio.run(read()) is True


async def _offload_available(client: httpx.AsyncClient, base: str) -> bool | None:
    try:
        text = (await client.get(f"{base}/metrics", timeout=2.0)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(GAUGE + " "):
            return float(line.split()[1]) > 0.5
    return None


async def _wait_gauge(client: httpx.AsyncClient, base: str, want: bool, limit_s: float,
                      t0: float) -> float | None:
    """Seconds after `t0` at which the gauge reads `want` (polled every 10 ms), or None."""
    while time.perf_counter() - t0 < limit_s:
        if await _offload_available(client, base) is want:
            return time.perf_counter() - t0
        await asyncio.sleep(0.01)
    return None


async def _run(w: Workload, rate: float, n: int, seed: int,
               actions: list[tuple[float, str, Callable[[], None]]],
               probe: bool) -> tuple[list[Result], dict[str, float | None]]:
    """Load plus `actions` (share of the span, name, blocking call) on one timeline."""
    marks: dict[str, float | None] = {}
    span = n / rate
    loop = asyncio.get_running_loop()
    load = asyncio.create_task(open_loop(w, rate, n, seed))
    t_first = time.perf_counter() + 0.2  # open_loop's first arrival
    async with httpx.AsyncClient() as client:
        for share, name, act in actions:
            await asyncio.sleep(max(0.0, t_first + share * span - time.perf_counter()))
            t = time.perf_counter()
            await loop.run_in_executor(None, act)
            marks[name] = t - t_first
            if probe and name == "broker_killed":
                got = await _wait_gauge(client, w.base_url, False, 5.0, t)
                marks["breaker_open_after_s"] = got
            if probe and name == "broker_restarted":
                got = await _wait_gauge(client, w.base_url, True, 30.0, t)
                marks["offload_available_after_s"] = got
    results = await load
    for r in results:
        r.t_arrival -= t_first
    return results, marks


def _late(r: Result, deadline_s: float) -> bool:
    if r.end_s is None:
        return True
    # The deadline counts from the scheduled arrival (load.one_request sends what is left of
    # it); a request the client sent only after its deadline gets 1 ms.
    lag = r.send_lag_s or 0.0
    return r.end_s > max(deadline_s, lag) + LATE_MARGIN_S


def _counts(results: list[Result], deadline_s: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        where = r.served_by or "none"
        key = f"{r.outcome}_{where}" if r.outcome in ("ok", "error", "expired") else r.outcome
        out[key] = out.get(key, 0) + 1
    out["late"] = sum(_late(r, deadline_s) for r in results if r.outcome != "hung")
    return out


def broker_phase(w: Workload, rate: float, n: int, seed: int, kill: Callable[[], None],
                 restart: Callable[[], None]) -> dict[str, Any]:
    assert w.deadline_ms is not None
    deadline_s = w.deadline_ms / 1000
    results, marks = asyncio.run(_run(
        w, rate, n, seed,
        [(1 / 4, "broker_killed", kill), (1 / 2, "broker_restarted", restart)], probe=True))
    killed, back = marks["broker_killed"] or 0.0, marks["broker_restarted"] or 0.0
    during = [r for r in results if killed <= r.t_arrival < back]
    after = [r for r in results if r.t_arrival >= back]
    cloud_after = sorted(r.t_arrival + (r.end_s or 0) - back for r in after
                         if r.outcome == "ok" and r.served_by == "cloud")
    local_during = [r for r in during if r.served_by == "local"]
    return {
        "marks": marks,
        "offload_recovered_after_s": cloud_after[0] if cloud_after else None,
        "outage": _counts(during, deadline_s),
        "local_during_outage": {
            "ok": sum(r.outcome == "ok" for r in local_during),
            "failed": sum(r.outcome in ("error", "lost", "hung") for r in local_during),
        },
        "all": _counts(results, deadline_s),
        "summary": summarize(results),
    }


def worker_phase(w: Workload, rate: float, n: int, seed: int,
                 kill: Callable[[], None]) -> dict[str, Any]:
    assert w.deadline_ms is not None
    deadline_s = w.deadline_ms / 1000
    results, marks = asyncio.run(_run(w, rate, n, seed, [(1 / 3, "worker_killed", kill)],
                                      probe=False))
    c = _counts(results, deadline_s)
    unexplained = c.get("lost", 0) + c.get("hung", 0) + c["late"]
    late = [f"{r.outcome}/{r.served_by}: ended {r.end_s:.2f} s after arrival (send lag "
            f"{r.send_lag_s or 0:.2f} s) {r.detail[:80]}"
            for r in results if r.outcome != "hung" and _late(r, deadline_s) and r.end_s]
    return {"marks": marks, "counts": c, "unexplained": unexplained, "late": late[:5],
            "summary": summarize(results)}
