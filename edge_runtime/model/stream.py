"""What a generation yields: chunks of a stream, the finished completion, its statistics,
and the stop-string matcher both decoders share.

    Generator.stream / BatchDecoder ─▶ Chunk(text, token_ids, finish_reason, stats) … ─▶ end

Kept apart from generator.py so that batching.py can use them without importing the
generator (which imports batching.py to build its batch).
"""

from __future__ import annotations

import collections.abc
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed completion. The last chunk has `finish_reason` set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop' (EOS or a stop string) or 'length' (max_tokens or the context is full)."""
    stats: GenerationStats | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    ttft_s: float = 0.0
    """Request start to first sampled token (prefill + first sampling)."""
    decode_s: float = 0.0
    """First token to last token."""
    draft_tokens: int = 0
    """Tokens the draft model proposed (speculative decoding; 0 when it never ran)."""
    accepted_tokens: int = 0
    """Of those, how many the target model accepted."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not prefilled)."""

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.completion_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


ChunkStream = collections.abc.Generator["Chunk", None, None]
"""What `Generator.stream` returns; `close()` on it stops generation between tokens."""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(repr=False)


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        # Hold back the longest suffix that is a prefix of some stop string.
        hold = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
