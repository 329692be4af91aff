"""A small Qwen2 language model made on this machine: its byte-level BPE tokenizer and its
training. The demo (demo.py) and a recipe's locally made teacher (teacher.py) both use it.

Kept apart from demo.py, which also packages and serves the demo, so that the teacher stage's
code (code_hash.py: what its cache key covers) is this training and not the whole pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_build.corpus import Corpus
from edge_build.extras import LogProgress

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (GPT-4 style): contractions, letters, single digits, punctuation
# runs, newlines, spaces. Matching it keeps the demo tokenizer's behaviour like the real one's.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class DemoConfig:
    """Shape and training budget of the demo model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    context_length: int
    train_steps: int
    batch_size: int
    seq_len: int
    learning_rate: float = 3e-3
    corpus_chars: int = 3_000_000
    seed: int = 0
    block_size: int = 32
    """Quantization group size; small models have small matrices."""


def train_tokenizer(corpus: Corpus, vocab_size: int, out: Path) -> None:
    """Byte-level BPE with Qwen2's pre-tokenizer, saved in HF format with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edge_runtime.model.tokenizer import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.train, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(out)


def _token_stream(tokenizer_file: Path, texts: list[str]) -> Any:
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def train_model(cfg: DemoConfig, corpus: Corpus, out: Path, progress: bool = True) -> dict:
    """Make the Qwen2 model from `cfg` and train it on the corpus; save it in HF format."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(cfg.seed)
    tok_file = out / "tokenizer.json"
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.context_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|>: SPECIAL_TOKENS' order fixes the ids 0, 1, 2
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(hf_cfg)
    data = _token_stream(tok_file, corpus.train)
    held = _token_stream(tok_file, corpus.heldout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.train_steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.train_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.seq_len + 1
    model.train()
    started = time.time()
    loss_val = float("nan")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]demo train"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("train", total=cfg.train_steps, info="")
        logged = LogProgress("demo train", cfg.train_steps)
        for step in range(cfg.train_steps):
            starts = torch.randint(0, len(data) - n, (cfg.batch_size,), generator=gen)
            batch = torch.stack([data[s : s + n] for s in starts.tolist()])  # [B, S+1]
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_val = loss.item()
            tps = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - started)
            info = f"loss {loss_val:.3f}  {tps:,.0f} tok/s"
            bar.update(task, advance=1, info=info)
            logged.update(step + 1, info)
    model.eval()
    with torch.inference_mode():
        k = min(len(held) // n, 16)
        chunks = held[: k * n].view(k, n)
        held_loss = float(model(input_ids=chunks, labels=chunks).loss) if k else float("nan")
    model.save_pretrained(out)
    return {
        "train_loss": loss_val,
        "heldout_loss": held_loss,
        "heldout_perplexity": math.exp(held_loss) if k else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": cfg.train_steps * cfg.batch_size * cfg.seq_len,
    }


__all__ = ["DemoConfig", "train_model", "train_tokenizer"]
