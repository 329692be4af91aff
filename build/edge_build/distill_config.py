"""How a knowledge-distillation run trains: one dataclass shared by the distill stage
(distill.py, which adds its own held-out measurement) and the recipe's `[distill]` table
(recipe.py, which adds `enabled`; healing after pruning reuses it). Torch-free, so recipes
load where torch is not installed (the device leg of the test suite)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KDTraining:
    """What the student is and how it is trained; every field changes the result."""

    layers: str | tuple[int, ...] = "every_other"
    """Teacher layers the student starts from: "every_other" (0, 2, 4, …) or indices."""
    steps: int = 500
    """Optimizer steps (the schedule's length)."""
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    """Micro-batches per optimizer step: effective batch = batch_size × grad_accum."""
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """Cosine decay ends at learning_rate × min_lr_ratio."""
    grad_clip: float = 1.0
    temperature: float = 2.0
    """Softmax temperature of the KD loss T²·KL(teacher/T ‖ student/T)."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE on mapped layers (0 = logits only)."""
    checkpoint_every: int = 50
    seed: int = 0


__all__ = ["KDTraining"]
