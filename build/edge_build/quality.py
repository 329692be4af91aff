"""One quality measure for every stage of a recipe, and the gates a recipe puts on it.

Each stage's output — an HF model directory or an ONNX decoder directory — is measured on the
same held-out token windows against the teacher and against the stage's own input:
perplexity, its relative increase over the reference, top-1 agreement, mean per-token
KL(reference ‖ stage) and the largest |Δlogit|; plus parameter count and bytes on disk.
A stage meant to be exact (fuse) is compared with its input with fp32 activations on both
sides (`exact_vs_input`), so int8 activation rounding does not hide or fake a difference;
its numbers against the teacher stay those of the graph as served.
Logits are streamed a few windows at a time, so a 150k-vocabulary teacher's logits for all
windows are never in memory at once, and the same code reads PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.evaluate import compare_logits
from edge_build.evaluate import perplexity as ppl_of
from edge_build.recipe import Gate, StageGates
from edge_build.stage import QualityGateError, StageError

LogitFn = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]
"""Windows → one [S, V] float32 array of logits per window."""
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".data", ".bin", ".pt")
CHUNK = 4
QUANT_FILE = "quant.safetensors"


class StageQualityError(QualityGateError):
    """A recipe stage is outside the recipe's thresholds; the message quotes the numbers."""


def is_onnx(artifact: Path) -> bool:
    return (Path(artifact) / "model.onnx").is_file()


def logit_source(artifact: Path, fp32_activations_in: Path | None = None) -> LogitFn:
    """A function giving the artifact's logits: ONNX Runtime for an ONNX directory, PyTorch
    (fp32, CPU or CUDA) for an HF directory. With `fp32_activations_in` (a scratch
    directory), the ONNX graph runs with fp32 activations (evaluate.with_fp32_activations)
    from a copy written there."""
    artifact = Path(artifact)
    if is_onnx(artifact):
        import onnx

        from edge_build.evaluate import onnx_logits, save_fp32_activations
        from edge_build.export import kv_spec, read_config
        from edge_build.package import graph_kv_dtype

        graph = artifact / "model.onnx"
        # The cache in the graph's own type: a GPU's float16 graph (stage fp16) takes float16.
        kv = graph_kv_dtype(onnx.load(str(graph), load_external_data=False),
                            kv_spec(read_config(artifact)))
        if fp32_activations_in is not None:
            scratch = Path(tempfile.mkdtemp(dir=fp32_activations_in))
            graph = save_fp32_activations(graph, scratch / "model.onnx")
        return lambda windows: onnx_logits(graph, kv, windows)

    import torch

    from edge_build import lm_eval

    model = lm_eval.load_causal_lm(artifact, lm_eval.pick_device())
    dev = next(model.parameters()).device

    def run(windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        with torch.inference_mode():
            ids = torch.tensor([list(w) for w in windows], dtype=torch.long, device=dev)
            return list(model(input_ids=ids).logits.float().cpu().numpy())  # [B, S, V]

    return run


def _chunks(windows: Sequence[Sequence[int]]) -> Iterator[Sequence[Sequence[int]]]:
    for s in range(0, len(windows), CHUNK):
        yield windows[s : s + CHUNK]


def compare(
    candidate: LogitFn, references: dict[str, LogitFn], windows: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The candidate's perplexity, and against each reference: its perplexity, the relative
    increase, top-1 agreement, mean KL, max |Δlogit| — accumulated chunk by chunk."""
    if not windows:
        raise StageError("no held-out evaluation window: the held-out text is too short")
    tokens = 0
    nll = {name: 0.0 for name in ["candidate", *references]}
    sums = {name: {"top1_agreement": 0.0, "mean_kl": 0.0} for name in references}
    max_abs = dict.fromkeys(references, 0.0)
    preds = 0
    for chunk in _chunks(windows):
        got = candidate(chunk)
        n_tok = sum(len(w) for w in chunk)
        n_pred = sum(len(w) - 1 for w in chunk)
        nll["candidate"] += math.log(ppl_of(got, chunk)) * n_pred
        for name, fn in references.items():
            ref = fn(chunk)
            nll[name] += math.log(ppl_of(ref, chunk)) * n_pred
            cmp = compare_logits(ref, got)
            for k in sums[name]:
                sums[name][k] += cmp[k] * n_tok
            max_abs[name] = max(max_abs[name], cmp["max_abs_logit_diff"])
        tokens += n_tok
        preds += n_pred
    ppl = math.exp(nll["candidate"] / preds)
    out: dict[str, Any] = {"perplexity": round(ppl, 6)}
    for name in references:
        ref_ppl = math.exp(nll[name] / preds)
        out[name] = {
            "perplexity": round(ref_ppl, 6),
            "ppl_increase": round(ppl / ref_ppl - 1.0, 6),
            "top1_agreement": round(sums[name]["top1_agreement"] / tokens, 6),
            "mean_kl": round(sums[name]["mean_kl"] / tokens, 6),
            # Significant digits, not decimals: an exact stage's 3e-7 must not read 0.
            "max_abs_logit_diff": float(f"{max_abs[name]:.4g}"),
        }
    return out


def parameter_count(artifact: Path) -> int | None:
    """Parameters stored in an HF directory's safetensors files (tied tensors stored once)."""
    # quant.safetensors holds the int4 codes of weights already counted in the model file.
    files = [f for f in sorted(Path(artifact).glob("*.safetensors")) if f.name != QUANT_FILE]
    if not files or is_onnx(artifact):
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total


def bytes_on_disk(artifact: Path) -> int:
    """Bytes of the weight files (not the tokenizer or configs)."""
    return sum(
        p.stat().st_size
        for p in Path(artifact).iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def measure(
    artifact: Path,
    windows: Sequence[Sequence[int]],
    teacher: Path | None,
    input_dir: Path | None,
    parameters: int | None = None,
    exact_vs_input: bool = False,
) -> dict[str, Any]:
    """The quality record of one stage's output (see the module docstring)."""
    refs: dict[str, LogitFn] = {}
    if teacher is not None:
        refs["vs_teacher"] = logit_source(teacher)
    if input_dir is not None and input_dir != teacher and not exact_vs_input:
        refs["vs_input"] = logit_source(input_dir)
    record = compare(logit_source(artifact), refs, windows)
    if input_dir is not None and input_dir == teacher:
        record["vs_input"] = record["vs_teacher"]
    elif input_dir is not None and exact_vs_input:
        with tempfile.TemporaryDirectory(dir=Path(artifact).parent) as scratch:
            exact = compare(
                logit_source(artifact, Path(scratch)),
                {"vs_input": logit_source(input_dir, Path(scratch))},
                windows,
            )
        record["vs_input"] = {**exact["vs_input"], "activations": "fp32"}
    record["parameters"] = parameter_count(artifact) or parameters
    record["bytes"] = bytes_on_disk(artifact)
    if (Path(artifact) / QUANT_FILE).is_file():  # what the 4-bit weights alone weigh
        record["int4_bytes"] = (Path(artifact) / QUANT_FILE).stat().st_size
    record["windows"] = len(windows)
    record["window_tokens"] = len(windows[0])
    return record


def violations(side: str, got: dict[str, Any] | None, gate: Gate) -> list[str]:
    if got is None:
        return []
    out = []
    if gate.max_ppl_increase is not None and got["ppl_increase"] > gate.max_ppl_increase:
        out.append(
            f"perplexity +{got['ppl_increase']:.2%} {side} (reference "
            f"{got['perplexity']:.3f}) > max_ppl_increase {gate.max_ppl_increase:.2%}"
        )
    if gate.min_top1 is not None and got["top1_agreement"] < gate.min_top1:
        out.append(f"top-1 agreement {side} {got['top1_agreement']:.4f} < min_top1 {gate.min_top1}")
    if gate.max_kl is not None and got["mean_kl"] > gate.max_kl:
        out.append(f"mean KL {side} {got['mean_kl']:.4f} > max_kl {gate.max_kl}")
    diff = gate.max_abs_logit_diff
    if diff is not None and got["max_abs_logit_diff"] > diff:
        how = " (fp32 activations)" if got.get("activations") == "fp32" else ""
        out.append(
            f"max |Δlogit| {side}{how} {got['max_abs_logit_diff']:.3g} > max_abs_logit_diff {diff}"
        )
    return out


def check(stage: str, quality: dict[str, Any], gates: StageGates, source: str = "") -> None:
    """Raise StageQualityError quoting every violated bound and the stage's numbers."""
    failed = violations("vs teacher", quality.get("vs_teacher"), gates.vs_teacher)
    failed += violations("vs input", quality.get("vs_input"), gates.vs_input)
    if failed:
        where = f" ({source})" if source else ""
        raise StageQualityError(
            f"stage {stage} fails the recipe's thresholds{where}: "
            + "; ".join(failed)
            + f" [held-out perplexity {quality['perplexity']:.3f} on {quality['windows']}"
            f"×{quality['window_tokens']} tokens]"
        )


def summary(quality: dict[str, Any]) -> str:
    """One line for the console."""
    parts = [f"ppl {quality['perplexity']:.3f}"]
    for side in ("vs_teacher", "vs_input"):
        q = quality.get(side)
        if q:
            parts.append(
                f"{side.replace('_', ' ')}: top1 {q['top1_agreement']:.3f} "
                f"KL {q['mean_kl']:.4f} ppl {q['ppl_increase']:+.1%}"
            )
    if quality.get("parameters"):
        parts.append(f"{quality['parameters'] / 1e6:.2f}M params")
    parts.append(f"{quality['bytes'] / 2**20:.1f} MiB")
    return " | ".join(parts)


def read_quality(artifact: Path) -> dict[str, Any] | None:
    p = Path(artifact) / "stage.json"
    return json.loads(p.read_text()).get("quality") if p.is_file() else None
