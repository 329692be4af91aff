"""PyTorch-side quality measures shared by the model-space stages (distill, prune).

evaluate.py measures ONNX artifacts; the stages that change a model's *shape* work on
Hugging Face models, so they measure here, on fixed held-out token windows:

- held-out perplexity of each model,
- top-1 agreement and mean KL(reference ‖ candidate) per token against a reference model
  (the teacher, or the stage's own input model),
- parameter count and bytes on disk.

The reference's logits are computed once per batch and compared with every candidate in the
same pass, so a 150k-vocabulary teacher is never held in memory for all windows at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_build.stage import StageError

if TYPE_CHECKING:
    import torch

SUPPORTED = ("qwen2", "llama")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present, CPU otherwise (or what the caller names)."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(model_dir: Path, device: torch.device | None = None) -> Any:
    """A supported HF causal LM from a local directory, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise StageError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise StageError(
            f"model_type {model_type!r} in {model_dir} is not supported "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    # fp32 on purpose: the metrics compare small differences between models, and bf16/fp16
    # rounding would be of the same order on a tiny model.
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device or torch.device("cpu")).eval()


def parameter_count(model: Any) -> int:
    # Tied embeddings share one tensor; count it once (what the file stores).
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def bytes_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def windows_tensor(windows: Sequence[Sequence[int]]) -> torch.Tensor:
    import torch

    if not windows:
        raise StageError("no evaluation window: the held-out text is shorter than one window")
    return torch.tensor([list(w) for w in windows], dtype=torch.long)  # [N, S]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev)).logits.float().cpu()  # [B, S, V]


def compare_models(
    reference: Any,
    candidates: Mapping[str, Any],
    windows: Sequence[Sequence[int]] | torch.Tensor,
    batch_size: int = 4,
) -> dict[str, dict[str, float]]:
    """Perplexity of the reference and of each candidate, plus each candidate's top-1
    agreement and mean per-token KL(reference ‖ candidate), on the same windows.

    Returns {"reference": {...}, name: {...}} with keys perplexity (and top1_agreement,
    mean_kl for candidates).
    """
    import torch
    import torch.nn.functional as F

    ids = windows if isinstance(windows, torch.Tensor) else windows_tensor(windows)  # [N, S]
    names = ["reference", *candidates]
    models = {"reference": reference, **candidates}
    nll = dict.fromkeys(names, 0.0)
    agree = dict.fromkeys(candidates, 0)
    kl = dict.fromkeys(candidates, 0.0)
    tokens = 0
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]  # [B, S]
            targets = batch[:, 1:].reshape(-1)  # [B*(S-1)]
            ref_lp = F.log_softmax(_logits(reference, batch), dim=-1)  # [B, S, V]
            for name, model in models.items():
                lp = ref_lp if name == "reference" else F.log_softmax(_logits(model, batch), -1)
                nll[name] -= float(
                    lp[:, :-1].reshape(-1, lp.shape[-1]).gather(1, targets[:, None]).sum()
                )
                if name != "reference":
                    agree[name] += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
                    kl[name] += float((ref_lp.exp() * (ref_lp - lp)).sum())
            tokens += batch.numel()
    n_pred = ids.shape[0] * (ids.shape[1] - 1)
    out: dict[str, dict[str, float]] = {
        "reference": {"perplexity": math.exp(nll["reference"] / n_pred)}
    }
    for name in candidates:
        out[name] = {
            "perplexity": math.exp(nll[name] / n_pred),
            "top1_agreement": agree[name] / tokens,
            "mean_kl": kl[name] / tokens,
        }
    return out


def flat_metrics(
    compared: Mapping[str, Mapping[str, float]], prefixes: Mapping[str, str]
) -> dict[str, float]:
    """{"student": {"perplexity": 3.1}} → {"student_perplexity": 3.1}, renamed by `prefixes`."""
    return {
        f"{prefixes.get(name, name)}_{key}": round(value, 6)
        for name, values in compared.items()
        for key, value in values.items()
    }


def check_gates(
    metrics: Mapping[str, Any],
    prefix: str,
    error: type[StageError],
    min_top1: float | None = None,
    max_kl: float | None = None,
    max_perplexity: float | None = None,
) -> None:
    """Raise `error` quoting the numbers when `prefix`'s metrics are outside the gates."""
    top1, kl, ppl = (metrics[f"{prefix}_{k}"] for k in ("top1_agreement", "mean_kl", "perplexity"))
    if min_top1 is not None and top1 < min_top1:
        raise error(f"{prefix} top-1 agreement {top1:.4f} < {min_top1} (mean KL {kl:.4f})")
    if max_kl is not None and kl > max_kl:
        raise error(f"{prefix} mean KL {kl:.4f} > {max_kl} (top-1 agreement {top1:.4f})")
    if max_perplexity is not None and ppl > max_perplexity:
        raise error(f"{prefix} held-out perplexity {ppl:.3f} > {max_perplexity}")


def save_model(model: Any, source_dir: Path, out: Path) -> None:
    """`model` in HF format at `out`, with the source's tokenizer and generation files."""
    import shutil

    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out) / name)
