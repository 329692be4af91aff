"""Tables, the fault summary and the plot of the overload benchmark (bench_overload.py)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overload import faults


def fmt(x: float | int, digits: int = 2) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows: Sequence[dict[str, Any]], slo_s: float) -> str:
    head = ("| Mode | Load | Offered req/s | Requests | Served local / cloud | Offloaded | "
            "Rejected (429/503) | Failed at deadline | Errors | Lost | Hung | "
            "Latency p50 / p95 / p99 s | "
            "Local p99 s | Cloud p99 s | TTFT p50 / p99 s | Local / cloud TTFT p99 s | "
            "Client send lag p99 s |")
    lines = [head, "|---" + "|--:" * 16 + "|"]
    for r in rows:
        local_p99 = fmt(r["lat_local_p99"])
        if not math.isnan(r["lat_local_p99"]) and r["mode"] == "ours":
            local_p99 += " ✓" if r["lat_local_p99"] <= slo_s else " ✗"
        lines.append(
            f"| {r['mode']} | {r['mult']:g}x | {r['rate']:.2f} | {r['n']} | "
            f"{r['local']} / {r['cloud']} | {100 * r['offload_share']:.0f}% | "
            f"{r['rejected']} | {r['expired']} ({r.get('expired_local', 0)} local) | "
            f"{r['errors']} | {r['lost']} | {r['hung']} | "
            f"{fmt(r['lat_p50'])} / {fmt(r['lat_p95'])} / {fmt(r['lat_p99'])} | {local_p99} | "
            f"{fmt(r['lat_cloud_p99'])} | {fmt(r['ttft_p50'])} / {fmt(r['ttft_p99'])} | "
            f"{fmt(r['ttft_local_p99'])} / {fmt(r['ttft_cloud_p99'])} | "
            f"{fmt(r['send_lag_p99'])} |"
        )
    return "\n".join(lines)


def length_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| Load | max_tokens | Served local / cloud | Local p99 s | Cloud p99 s |",
             "|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["mode"] != "ours":
            continue
        for tokens, x in r["by_length"].items():
            lines.append(f"| {r['mult']:g}x | {tokens} | {x['n_local']} / {x['n_cloud']} | "
                         f"{fmt(x['p99_local'])} | {fmt(x['p99_cloud'])} |")
    return "\n".join(lines)


def fault_report(f: dict[str, Any], slo_s: float, args: argparse.Namespace) -> str:
    b, k = f["broker"], f["worker"]
    m = b["marks"]

    def s_(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f} s"

    return "\n".join([
        f"**Faults under load** ({args.fault_load:g}x capacity = {f['rate']:.2f} req/s, "
        f"{f['n']} requests per phase, same daemon and deadlines as `ours`):",
        "",
        f"- *Broker killed* (SIGKILL) at {m['broker_killed']:.1f} s, restarted at "
        f"{m['broker_restarted']:.1f} s: /metrics showed offload unavailable (breaker open) "
        f"**{s_(m.get('breaker_open_after_s'))}** after the kill and available again "
        f"{s_(m.get('offload_available_after_s'))} after the restart; "
        + (f"the first request served by the cloud after the restart finished "
           f"**{s_(b['offload_recovered_after_s'])}** after it. "
           if b["offload_recovered_after_s"] is not None else
           "**no request was served by the cloud in the rest of the phase**: the cloud "
           "path was available, but the scheduler offloads only when the cloud's measured "
           "p99 for the request's length fits its remaining deadline, and the p99 measured "
           "under load before the kill did not (round trips age out after 30 s). ")
        + f"Requests that arrived during "
        f"the outage: {b['outage']}; served locally then: {b['local_during_outage']['ok']} "
        f"ok, **{b['local_during_outage']['failed']} failed**.",
        f"- *One of two cloud workers killed* (SIGKILL) at {k['marks']['worker_killed']:.1f} "
        f"s: outcomes {k['counts']} — **{k['unexplained']} lost, hung or ended later than "
        f"{faults.LATE_MARGIN_S:g} s past their deadline** (ok_cloud/ok_local = answered; "
        "rejected = 429/503; expired_* = an explicit error at the deadline; error_cloud = "
        "an explicit error from the cloud path).",
    ])


def plot(rows: Sequence[dict[str, Any]], slo_s: float, capacity: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    series = [
        ("fifo", "lat_p99", "FIFO, no offload (Ollama-like)", "tab:red", "o-"),
        ("ours", "lat_p99", "ours: all served requests", "tab:blue", "s-"),
        ("ours", "lat_local_p99", "ours: served locally", "tab:cyan", "^--"),
        ("ours", "lat_cloud_p99", "ours: served in the cloud", "tab:green", "v--"),
    ]
    for mode, key, label, color, style in series:
        pts = [(r["mult"], r[key]) for r in rows if r["mode"] == mode and not math.isnan(r[key])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
    for r in rows:
        if r["mode"] == "ours" and (r["cloud"] or r["rejected"]):
            ax.annotate(f"{100 * r['offload_share']:.0f}% cloud\n{r['rejected']} rej.",
                        (r["mult"], r["lat_p99"]), textcoords="offset points", xytext=(-18, 10),
                        fontsize=7, color="tab:blue")
    ax.axhline(slo_s, color="gray", linestyle=":", label=f"SLO {slo_s:.2f} s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    mults = sorted({r["mult"] for r in rows})
    ax.set_xlim(mults[0] / 1.3, mults[-1] * 1.3)
    ax.set_xticks(mults)
    ax.set_xticklabels([f"{m:g}x" for m in mults])
    ax.set_xlabel(f"offered load (x capacity = {capacity:.2f} req/s, Poisson arrivals)")
    ax.set_ylabel("p99 latency, s (log)")
    ax.set_title("p99 latency vs offered load (demo bundle, 2-core CPU, loopback)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
