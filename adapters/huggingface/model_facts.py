"""What is known of a served model without running it: its name, limits, tokenizer and chat-template facts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SANE_MAX_LENGTH = 10_000_000
"""Tokenizers without a limit report a huge ``model_max_length``; anything above this is not a real limit."""


@attrs.frozen
class ModelFacts:
    """A transformers model with its tokenizer, as the generators (plain and batching) and the templates see it.

    One object, shared by both generators: they take their facts, tokenization and special tokens from here.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    """The name clients use for the model."""

    @property
    def context_length(self) -> int:
        """The model's position limit, else the tokenizer's when it states a real one."""
        config = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = self.tokenizer.model_max_length
        if isinstance(limit, int) and 0 < limit < SANE_MAX_LENGTH:
            return limit
        msg = f"cannot tell the context length of {self.model_id}"
        raise ValueError(msg)

    @property
    def vocab_size(self) -> int:
        """How many token ids the model scores."""
        value = getattr(self.model.config.get_text_config(), "vocab_size", None)
        return value if isinstance(value, int) else len(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's Jinja chat template, if it has one."""
        template = self.tokenizer.chat_template
        if isinstance(template, Mapping):
            template = template.get("default")
        return template if isinstance(template, str) else None

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token text, for chat templates."""
        token = self.tokenizer.bos_token
        return token if isinstance(token, str) else None

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token text, for chat templates."""
        token = self.tokenizer.eos_token
        return token if isinstance(token, str) else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends generation: the generation config's and the tokenizer's."""
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, list | tuple) else [configured]
        ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    @property
    def memory_bytes(self) -> int:
        """What the model's tensors take in memory: parameters, buffers and packed weights, each counted once."""
        seen: dict[tuple[int, str], int] = {}
        for module in self.model.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            tensors += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
            for tensor in tensors:
                if tensor.device.type == "meta":
                    continue
                where = id(tensor) if tensor.layout != torch.strided else tensor.data_ptr()  # oneDNN's have none
                seen[where, str(tensor.device)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return TokenizerText(self.tokenizer).encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        return TokenizerText(self.tokenizer).decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token (``convert_ids_to_tokens``)."""
        return TokenizerText(self.tokenizer).token_strings(token_ids)


@attrs.frozen
class TokenizerText:
    """A tokenizer's text side, without its model: what a process that only tokenizes (Ray's ingress) needs."""

    tokenizer: PreTrainedTokenizerBase

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return text if isinstance(text, str) else "".join(text)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token (``convert_ids_to_tokens``)."""
        return [str(token) for token in self.tokenizer.convert_ids_to_tokens(list(token_ids))]


class TellsModelFacts:
    """The ``Generator`` port's model facts and tokenization, answered from ``facts`` (a mixin for both generators)."""

    @property
    def facts(self) -> ModelFacts:
        """The model's name, limits and tokenizer facts (the generator's own)."""
        raise NotImplementedError

    @property
    def model_id(self) -> str:
        """The name clients use for the model."""
        return self.facts.model_id

    @property
    def context_length(self) -> int:
        """How many tokens (prompt and completion) fit in one sequence."""
        return self.facts.context_length

    @property
    def vocab_size(self) -> int:
        """How many token ids the model scores."""
        return self.facts.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return self.facts.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        return self.facts.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token."""
        return self.facts.token_strings(token_ids)


__all__ = ["ModelFacts", "TellsModelFacts", "TokenizerText"]
