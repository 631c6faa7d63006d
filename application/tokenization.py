"""Tokenize and detokenize with the served model's tokenizer and chat template (vLLM's utility endpoints)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from application.chat import render_chat_prompt
from domain.errors import InvalidRequestError
from domain.messages import Conversation
from domain.ports import Generator, TemplateRenderer


@attrs.define
class TokenizationService:
    """What a prompt costs in tokens, exactly as the completion endpoints would count it."""

    generator: Generator
    renderer: TemplateRenderer

    def tokenize_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt."""
        return self.generator.encode(text, add_special_tokens=add_special_tokens)

    def tokenize_messages(self, conversation: Conversation, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a conversation rendered exactly as a chat completion renders it."""
        text = render_chat_prompt(self.renderer, conversation)
        return self.generator.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` (special tokens included), after checking they exist."""
        vocabulary = self.generator.vocab_size
        outside = [token for token in token_ids if not 0 <= token < vocabulary]
        if outside:
            msg = f"tokens holds ids outside the vocabulary [0, {vocabulary}): {outside[:10]}"
            raise InvalidRequestError(msg, param="tokens")
        return self.generator.decode(token_ids, skip_special_tokens=False)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own string in the tokenizer's vocabulary (vLLM's ``token_strs``)."""
        return self.generator.token_strings(token_ids)

    @property
    def max_model_len(self) -> int:
        """The context window, in tokens."""
        return self.generator.context_length
