"""The quality and latency probe of a bundle: written at build time, re-measured on the device.

    build (edge_build/package.py)                   device (health check of a deploy)
    ─────────────────────────────                   ─────────────────────────────────
    held-out text ─▶ prompts + windows (token ids)   probe/reference.json (signed, hashed)
    make_reference(generator, …) ─▶ reference.json ─▶ measure(generator, reference)
                                                      ─▶ check(result, thresholds)

Both sides run the same code on the bundle's own graph through `Generator`, so a difference
is the device's engine or the bundle, never two implementations of the measurement.

    greedy_match      share of the build's greedy tokens the device reproduces (per prompt,
                      the matching prefix; a divergence ends the credit for that prompt)
    perplexity        on fixed held-out token windows, teacher-forced one token per step
                      (the serving graph returns only the last position's logits)
    quality_drop      max(1 - greedy_match, perplexity / build perplexity - 1), floored at 0:
                      one number a rollout can gate on (`quality_drop > 0.05`)
    ttft_ms           median over the prompts of prefill + first token
    tokens_per_s      decode tokens per second over the prompts

Greedy decoding is deterministic for one engine, but a GPU engine (TensorRT FP16) or another
batch size can flip a near-tie: hence a match *share* with a threshold, not exact equality.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.errors import BundleError, HealthCheckError
from edge_runtime.model.sampling import SamplingParams

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge_runtime.bundle.manifest import Bundle
    from edge_runtime.model.generator import Generator

REFERENCE_FILE = "probe/reference.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ProbeThresholds:
    """What a deployed bundle must reach on the device to stay active."""

    min_greedy_match: float = 0.75
    """Share of the build's greedy reference tokens reproduced (1.0 on the build's engine)."""
    max_perplexity_increase: float = 0.05
    """Largest relative perplexity increase over the build's number (0.05 = +5 %)."""
    max_ttft_ms: float = 5000.0
    """Median time to first token of the probe prompts, on this device, under its load."""
    min_tokens_per_s: float = 1.0
    """Decode speed of the probe prompts."""
    require_reference: bool = True
    """Refuse a bundle that carries no reference (it cannot prove its quality)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_greedy_match <= 1.0:
            raise ValueError(f"min_greedy_match must be in [0, 1], got {self.min_greedy_match}")
        if self.max_perplexity_increase < 0 or self.max_ttft_ms <= 0 or self.min_tokens_per_s < 0:
            raise ValueError("perplexity increase and tokens/s must be >= 0, ttft > 0")


@dataclass(frozen=True)
class ProbeResult:
    """The numbers a health check measured (acked and sent in telemetry)."""

    quality_drop: float | None
    """None when the bundle carries no reference."""
    greedy_match: float | None
    perplexity: float | None
    reference_perplexity: float | None
    ttft_ms: float
    tokens_per_s: float
    seconds: float
    """Wall time of the whole probe."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# -- build side -------------------------------------------------------------------------


def make_reference(
    gen: Generator,
    prompts: Sequence[Sequence[int]],
    windows: Sequence[Sequence[int]],
    max_tokens: int = 16,
) -> dict[str, Any]:
    """The reference document: each prompt's greedy tokens and the windows' perplexity."""
    if not prompts or not windows:
        raise BundleError("a probe reference needs at least one prompt and one window")
    rows = []
    for ids in prompts:
        out = gen.generate(list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0))
        rows.append({"prompt_ids": list(map(int, ids)), "max_tokens": max_tokens,
                     "token_ids": out.token_ids, "text": out.text})
    return {
        "v": SCHEMA_VERSION,
        "prompts": rows,
        "windows": [list(map(int, w)) for w in windows],
        "perplexity": perplexity(gen, windows),
        "engine": gen.engine.name,
    }


def reference_inputs(
    encode: Callable[[str], list[int]], texts: Sequence[str], prompts: int = 4,
    prompt_tokens: int = 24, windows: int = 2, window_tokens: int = 64,
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and perplexity windows cut from held-out texts with `encode` (text → ids).

    Taken from distinct places of the text: prompts from the start of successive documents,
    windows from what follows, so a model cannot pass the perplexity by echoing a prompt.
    """
    ids: list[int] = []
    for t in texts:
        ids.extend(encode(t))
        if len(ids) >= prompts * prompt_tokens + windows * window_tokens:
            break
    need = prompts * prompt_tokens + windows * window_tokens
    if len(ids) < need:
        raise BundleError(f"held-out text gives {len(ids)} tokens; the probe needs {need}")
    p = [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(prompts)]
    base = prompts * prompt_tokens
    w = [ids[base + i * window_tokens: base + (i + 1) * window_tokens] for i in range(windows)]
    return p, w


# -- both sides -------------------------------------------------------------------------


def perplexity(gen: Generator, windows: Sequence[Sequence[int]]) -> float:
    """exp(mean NLL) of each window's tokens 1..n given the ones before, step by step."""
    nll, count = 0.0, 0
    for w in windows:
        past = gen.empty_cache(1)
        for pos in range(len(w) - 1):
            ids = np.asarray([[w[pos]]], dtype=np.int64)  # [1, 1]
            mask = gen.ones[:, : pos + 1]
            logits, past = gen.forward(ids, mask, gen.positions[:, pos:pos + 1], past)
            row = np.asarray(logits[0, -1], dtype=np.float64)  # [V]
            m = row.max()
            logz = m + math.log(float(np.exp(row - m).sum()))
            nll += logz - row[w[pos + 1]]
            count += 1
    return math.exp(nll / count) if count else float("nan")


# -- device side ------------------------------------------------------------------------


def load_reference(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's reference (verified with the bundle), or None if it has none."""
    if REFERENCE_FILE not in bundle.manifest.files:
        return None
    try:
        ref = json.loads(bundle.path(REFERENCE_FILE).read_text())
        if ref.get("v") != SCHEMA_VERSION:
            raise BundleError(f"{REFERENCE_FILE}: schema v={ref.get('v')!r} is not supported")
        for row in ref["prompts"]:
            row["prompt_ids"], row["token_ids"] = list(row["prompt_ids"]), list(row["token_ids"])
        float(ref["perplexity"])
        list(ref["windows"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{REFERENCE_FILE} is malformed: {e}") from e
    return dict(ref)


def measure(gen: Generator, reference: Mapping[str, Any] | None,
            latency_prompt: Sequence[int] = (0,), latency_tokens: int = 16) -> ProbeResult:
    """Run the probe on a loaded, warmed-up generator (the caller's thread owns it)."""
    started = time.perf_counter()
    ttfts: list[float] = []
    decode_tokens, decode_s = 0, 0.0
    matched = expected = 0
    rows = list(reference["prompts"]) if reference is not None else []
    if not rows:  # no reference: time a plain generation so latency is still measured
        rows = [{"prompt_ids": list(latency_prompt), "max_tokens": latency_tokens}]
    for row in rows:
        out = gen.generate(row["prompt_ids"], SamplingParams(max_tokens=int(row["max_tokens"]),
                                                            temperature=0.0))
        ttfts.append(out.stats.ttft_s)
        decode_tokens += max(0, out.stats.completion_tokens - 1)
        decode_s += out.stats.decode_s
        if "token_ids" in row:
            want = row["token_ids"]
            n = 0
            while n < min(len(want), len(out.token_ids)) and want[n] == out.token_ids[n]:
                n += 1
            matched += n
            expected += len(want)
    ppl = ref_ppl = match = drop = None
    if reference is not None:
        match = matched / expected if expected else 1.0
        ref_ppl = float(reference["perplexity"])
        ppl = perplexity(gen, reference["windows"])
        drop = max(0.0, 1.0 - match, ppl / ref_ppl - 1.0)
    return ProbeResult(
        quality_drop=drop, greedy_match=match, perplexity=ppl, reference_perplexity=ref_ppl,
        ttft_ms=1000.0 * statistics.median(ttfts),
        tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
        seconds=time.perf_counter() - started,
    )


def check(result: ProbeResult, limits: ProbeThresholds) -> ProbeResult:
    """`result` if it is within `limits`, else HealthCheckError quoting every miss."""
    misses = []
    if result.greedy_match is None or result.perplexity is None:
        if limits.require_reference:
            misses.append(f"the bundle has no {REFERENCE_FILE} to probe its quality against")
    else:
        if result.greedy_match < limits.min_greedy_match:
            misses.append(f"greedy match {result.greedy_match:.3f} < {limits.min_greedy_match}")
        ref = result.reference_perplexity or float("nan")
        if not result.perplexity <= ref * (1 + limits.max_perplexity_increase):
            misses.append(f"perplexity {result.perplexity:.3f} > build's {ref:.3f} "
                          f"+{100 * limits.max_perplexity_increase:.1f}%")
    if result.ttft_ms > limits.max_ttft_ms:
        misses.append(f"TTFT {result.ttft_ms:.1f} ms > {limits.max_ttft_ms} ms")
    if result.tokens_per_s < limits.min_tokens_per_s:
        misses.append(f"decode {result.tokens_per_s:.1f} tokens/s < {limits.min_tokens_per_s}")
    if misses:
        raise HealthCheckError("probe failed: " + "; ".join(misses))
    return result


def probe_bundle(bundle: Bundle, limits: ProbeThresholds, backend: str = "auto",
                 threads: int | None = None) -> ProbeResult:
    """Load a verified bundle on its own generator and probe it (a standalone health check)."""
    from edge_runtime.model.generator import Generator

    reference = load_reference(bundle)
    gen = Generator.from_bundle(bundle, backend=backend, threads=threads)
    try:
        gen.warmup()
        return check(measure(gen, reference), limits)
    finally:
        gen.engine.close()


def health_check(
    trusted: list[Ed25519PublicKey], limits: ProbeThresholds | None = None
) -> Callable[[Path], ProbeResult]:
    """A DeviceAgent health check for an agent beside (not inside) the daemon: verify, load,
    probe. The daemon's own agent probes the generator it is about to serve instead
    (fleet/daemon.py), so nothing is loaded twice."""
    from edge_runtime.bundle.manifest import verify_bundle

    def run(path: Path) -> ProbeResult:
        return probe_bundle(verify_bundle(path, trusted), limits or ProbeThresholds())

    return run
