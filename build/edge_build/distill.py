"""Stage `distill`: a teacher HF model directory → a shallower student trained to imitate it.

The student starts as a subset of the teacher's layers (every other one, or an explicit
list) with the embeddings, final norm and LM head copied; starting from the teacher's own
weights is what makes a few thousand steps enough (Sanh et al., DistilBERT; Minitron). It is
trained on the temperature-scaled KL between teacher and student next-token distributions,

    loss = T² · KL(softmax(teacher/T) ‖ softmax(student/T))   (T² keeps gradients ~T-free)

plus, optionally, `hidden_weight` · MSE between student layer j's output and the output of
the teacher layer it was copied from. Data: local txt/jsonl files (default: the stdlib
corpus), split train / held-out by a hash of each document.

Training checkpoints (student + optimizer + scheduler + RNG + step) are written atomically
every `checkpoint_every` steps beside the output, so a killed run resumes where it stopped and
ends with the same weights as an uninterrupted one. The stage reports, on fixed held-out
windows, the student's perplexity, top-1 agreement and KL against the teacher — before
training (the initialised student) and after — and the perplexity of a random-init student.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_build import lm_eval
from edge_build.distill_config import KDTraining
from edge_build.evaluate import eval_windows
from edge_build.stage import (
    QualityGateError,
    StageError,
    artifact_hash,
    params_hash,
    require_dir,
    stage_output,
    write_stage,
)
from edge_build.textdata import token_stream, train_heldout
from edge_runtime.atomic import fsync_dir

CHECKPOINT = "checkpoint.pt"


class DistillQualityError(QualityGateError):
    """The distilled student is outside the requested agreement / KL / perplexity bounds."""


@dataclass(frozen=True)
class DistillConfig(KDTraining):
    """The training (distill_config.KDTraining) and the stage's held-out measurement."""

    heldout_share: float = 0.1
    eval_windows: int = 16
    eval_tokens: int = 128


def student_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    if isinstance(spec, str):
        raise StageError(f"layers must be 'every_other' or a list of indices, not {spec!r}")
    layers = [int(i) for i in spec]
    if (
        not layers
        or any(not 0 <= i < num_layers for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise StageError(f"layers {layers} must be distinct indices in [0, {num_layers})")
    return layers


def init_student(teacher: Any, layers: Sequence[int]) -> Any:
    """A new model with the teacher's config cut to `layers`, and those layers' weights."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):  # Qwen2: per-layer full / sliding attention
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(cfg)
    src = teacher.state_dict()
    sd = {}
    for key in student.state_dict():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:  # model.layers.{j}.… ← model.layers.{layers[j]}.…
            parts[2] = str(layers[int(parts[2])])
        sd[key] = src[".".join(parts)].clone()
    student.load_state_dict(sd)
    return student.to(next(teacher.parameters()).device)


def kd_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """T² · mean over tokens of KL(teacher/T ‖ student/T); logits [B, S, V]."""
    import torch.nn.functional as F

    t = temperature
    s_lp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_lp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1)  # [B, S]
    return kl.mean() * t * t


def _lr_lambda(cfg: DistillConfig) -> Any:
    def lr_at(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return lr_at


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint intact
    fsync_dir(path.parent)


def train(
    teacher: Any,
    student: Any,
    data: Any,
    cfg: DistillConfig,
    checkpoint: Path | None = None,
    layers: Sequence[int] | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
    run_key: str = "",
) -> dict[str, Any]:
    """Distil `teacher` into `student` (in place) on the token stream `data` [T].

    `layers[j]` is the teacher layer student layer j maps to (hidden-state loss).
    `run_key` names the models' identity (artifact hashes): a checkpoint resumes only a run
    with the same key, config, layer map and data size.
    `max_steps` stops this call early (the checkpoint is kept) — a budgeted or preemptible run.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from edge_build.extras import LogProgress

    n = cfg.seq_len
    if len(data) <= n + 1:
        raise StageError(f"training data has {len(data)} tokens, fewer than one window of {n}")
    device = next(student.parameters()).device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, loss_val, tokens = 0, float("nan"), 0
    run_id = params_hash(
        {**asdict(cfg), "data_tokens": len(data), "layers": list(layers or []), "key": run_key}
    )
    if checkpoint is not None and checkpoint.is_file() and resume:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["run_id"] != run_id:
            raise StageError(
                f"checkpoint {checkpoint} is from a run with other parameters or data; "
                "delete it or pass resume=False"
            )
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        gen.set_state(state["rng_batches"])
        step, loss_val, tokens = state["step"], state["loss"], state["tokens"]

    def save() -> None:
        if checkpoint is None:
            return
        _save_checkpoint(checkpoint, {
            "run_id": run_id, "step": step, "loss": loss_val, "tokens": tokens,
            "model": student.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "rng_batches": gen.get_state(),
        })  # fmt: skip

    # Hidden pairs: (student hidden_states index, teacher index). hidden_states[i + 1] is
    # layer i's output, except the last entry, which is after the final norm: the last
    # student layer is left to the logit loss rather than matched against an un-normed layer.
    pairs = [(j + 1, t + 1) for j, t in enumerate(layers or [])][:-1]
    use_hidden = cfg.hidden_weight > 0 and bool(pairs)
    end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    teacher.eval()
    student.train()
    started, start_step = time.time(), step
    with Progress(
        TextColumn("[bold]distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress,
    ) as bar:  # fmt: skip
        task = bar.add_task("distill", total=cfg.steps, completed=step, info="")
        logged = LogProgress("distill", cfg.steps)
        while step < end:
            total = 0.0
            for _ in range(cfg.grad_accum):
                starts = torch.randint(0, len(data) - n, (cfg.batch_size,), generator=gen)
                batch = torch.stack([data[s : s + n] for s in starts.tolist()]).to(device)  # [B, S]
                with torch.no_grad():
                    t_out = teacher(input_ids=batch, output_hidden_states=use_hidden)
                s_out = student(input_ids=batch, output_hidden_states=use_hidden)
                loss = kd_loss(s_out.logits, t_out.logits, cfg.temperature)
                if use_hidden:
                    mse = sum(
                        torch.nn.functional.mse_loss(s_out.hidden_states[i], t_out.hidden_states[k])
                        for i, k in pairs
                    )
                    loss = loss + cfg.hidden_weight * mse / len(pairs)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_val = total
            tokens += cfg.batch_size * cfg.grad_accum * n
            tps = (
                (step - start_step) * cfg.batch_size * cfg.grad_accum * n / (time.time() - started)
            )
            info = f"loss {loss_val:.4f}  {tps:,.0f} tok/s"
            bar.update(task, completed=step, info=info)
            logged.update(step, info)
            if step % cfg.checkpoint_every == 0 or step == end:
                save()
    student.eval()
    return {"step": step, "final_loss": loss_val, "train_tokens": tokens,
            "tokens_per_second": round((step - start_step) * cfg.batch_size * cfg.grad_accum * n
                                       / max(1e-9, time.time() - started), 1)}  # fmt: skip


def run(
    teacher_dir: Path,
    out: Path,
    config: DistillConfig | None = None,
    data: Sequence[Path] | None = None,
    init_from: Path | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
    min_top1: float | None = None,
    max_kl: float | None = None,
) -> dict[str, Any] | None:
    """Distil the model at `teacher_dir` into a student written to `out` (HF format).

    `init_from` starts from another model directory (e.g. a pruned one, to heal it) instead
    of a layer subset. Returns the stage record, or None when `max_steps` stopped the run
    before the schedule's end (its checkpoint waits beside `out` for the next call).
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config or DistillConfig()
    started = time.time()
    teacher_dir, out = require_dir(Path(teacher_dir), "teacher"), Path(out)
    dev = lm_eval.pick_device(device)
    teacher = lm_eval.load_causal_lm(teacher_dir, dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if init_from is not None:
        if cfg.hidden_weight > 0:
            raise StageError(
                "hidden_weight needs a layer mapping; it cannot be used with init_from"
            )
        student, layers = lm_eval.load_causal_lm(require_dir(Path(init_from), "init_from"), dev), []
    else:
        layers = student_layers(cfg.layers, teacher.config.num_hidden_layers)
        student = init_student(teacher, layers)

    train_texts, held_texts = train_heldout(data, cfg.heldout_share)
    train_ids = token_stream(teacher_dir, train_texts)
    windows = lm_eval.windows_tensor(
        eval_windows(teacher_dir / "tokenizer.json", held_texts, cfg.eval_windows, cfg.eval_tokens)
    )
    with torch.random.fork_rng(devices=[]):  # the baseline must not shift training's RNG
        torch.manual_seed(cfg.seed)
        random_init = AutoModelForCausalLM.from_config(student.config).to(dev)
    before = lm_eval.compare_models(teacher, {"init": student, "random": random_init}, windows)
    before.pop("reference")  # the teacher's perplexity is reported once, from `after`
    del random_init

    ckpt = out.with_name(f".{out.name}.distill-ckpt") / CHECKPOINT
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    key = artifact_hash(teacher_dir) + (artifact_hash(Path(init_from)) if init_from else "")
    trained = train(
        teacher, student, train_ids, cfg, ckpt, layers, resume, max_steps, progress, key
    )
    if trained["step"] < cfg.steps:
        return None

    after = lm_eval.compare_models(teacher, {"student": student}, windows)
    metrics: dict[str, Any] = {
        **lm_eval.flat_metrics(after, {"reference": "teacher"}),
        **lm_eval.flat_metrics(before, {"init": "init_student", "random": "random_init"}),
        **trained,
        "student_layers": layers,
        "teacher_parameters": lm_eval.parameter_count(teacher),
        "student_parameters": lm_eval.parameter_count(student),
        "teacher_bytes": lm_eval.bytes_on_disk(teacher_dir),
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(windows.shape[1]),
        "device": dev.type,
    }
    lm_eval.check_gates(metrics, "student", DistillQualityError, min_top1, max_kl)
    params = {**asdict(cfg), "data": [str(p) for p in data or []] or "stdlib",
              "init_from": str(init_from) if init_from else None}  # fmt: skip
    with stage_output(out) as tmp:
        lm_eval.save_model(student, teacher_dir, tmp)
        metrics["student_bytes"] = lm_eval.bytes_on_disk(tmp)
        record = write_stage(tmp, "distill", params, teacher_dir, metrics, started)
    # The artifact exists now; the checkpoint only served to get here.
    ckpt.unlink(missing_ok=True)
    ckpt.parent.rmdir()
    return record
