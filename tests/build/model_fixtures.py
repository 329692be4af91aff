"""Tiny Qwen2 / Llama configs and a few seconds of training, shared by tests/build's conftest
and its tests. Tests import them from here, never from a conftest (tests/ has a conftest.py of
its own: two modules named `conftest` cannot both be imported by name).
"""

from __future__ import annotations

from typing import Any

try:
    import torch
except ImportError:  # the device leg has no [build] extra: the test modules skip themselves
    torch = None

ARCHS = ("qwen2", "llama")


def tiny_config(arch: str, vocab_size: int = 384, layers: int = 4) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    # Llama without tied embeddings and with an explicit head_dim: the other layout.
    return LlamaConfig(**common, tie_word_embeddings=False, head_dim=16)


def train_briefly(model: Any, ids: Any, steps: int = 60, seed: int = 0) -> None:
    """Plain next-token training, a few seconds on CPU."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g).tolist()
        batch = torch.stack([ids[s : s + 64] for s in starts])  # [B, S]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
