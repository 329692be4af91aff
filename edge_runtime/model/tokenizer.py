"""Tokenizer and chat template, without transformers.

The bundle carries a Hugging Face `tokenizer.json` (read by the Rust `tokenizers` library) and
the chat template from `tokenizer_config.json`, rendered with a sandboxed Jinja2 environment the
way transformers renders it. `IncrementalDecoder` turns a growing list of token ids into text
deltas for streaming without ever emitting half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edge_runtime.errors import BundleError, GenerationError

# Used when a bundle has no template of its own: ChatML, what Qwen2 models are trained on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TextTokenizer:
    """Encode prompts, render chats, decode ids."""

    def __init__(
        self,
        tokenizer_file: Path,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise BundleError(f"cannot read tokenizer {tokenizer_file}: {e}") from e
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_files(cls, tokenizer_file: Path, config_file: Path | None) -> TextTokenizer:
        """From `tokenizer.json` and (optionally) HF's `tokenizer_config.json`."""
        cfg: dict[str, Any] = {}
        if config_file is not None and config_file.is_file():
            cfg = json.loads(config_file.read_text())

        def token(v: Any) -> str | None:  # HF stores tokens as str or {"content": str}
            return v.get("content") if isinstance(v, Mapping) else v

        return cls(
            tokenizer_file,
            chat_template=cfg.get("chat_template"),
            bos_token=token(cfg.get("bos_token")),
            eos_token=token(cfg.get("eos_token")),
        )

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # Special tokens in the text (from the chat template) must map to their ids.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    @cached_property
    def _template(self) -> Any:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins."""
        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    add_generation_prompt=True,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
            )
        except TemplateError as e:
            raise GenerationError(f"chat template rejected the messages: {e}", "messages") from e


class IncrementalDecoder:
    """Text deltas from a growing token list (the scheme vLLM and TGI use).

    Decoding token by token breaks byte-level BPE: one character may span tokens, and a
    token's text can depend on its left neighbour. We decode a short window that starts a
    few tokens back and emit only what is new, holding back a trailing U+FFFD (an incomplete
    UTF-8 sequence) until the next token completes it.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids already turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read])
        full_text = self._tok.decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read])
        full_text = self._tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]
