"""The ``Generator`` port in the ingress: tokenization here, generation on an engine replica through a handle."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import attrs

from adapters.ray.prefix_routing import prefix_keys
from adapters.ray.replica import EngineFacts
from adapters.ray.wire import ReplicaUnavailableError, error_from_wire, logprob_from_wire, step_from_wire
from domain.generation import GeneratedTokens, GenerationParams, TokenLogprob


class ReplicaStream(Protocol):
    """A replica's answer to one generation, item by item; ``cancel`` stops it on the replica."""

    def __aiter__(self) -> AsyncIterator[Sequence[Mapping[str, Any]]]:
        """Batches of items (``wire`` steps), raising ``ReplicaUnavailableError`` when the replica is lost."""
        ...

    def cancel(self) -> None:
        """Stop the generation on the replica (the client went away)."""
        ...


class ReplicaClient(Protocol):
    """Calls to the engine replicas (a Serve ``DeploymentHandle`` in production)."""

    def generate(self, prompt_ids: list[int], params: GenerationParams, prefix: tuple[int, ...]) -> ReplicaStream:
        """Start a generation on a replica chosen for ``prefix`` (the prompt's block keys)."""
        ...

    async def score(self, token_ids: list[int], top: int) -> Mapping[str, Any]:
        """Score ``token_ids`` on some replica."""
        ...


class Tokenizing(Protocol):
    """A tokenizer's text side."""

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token."""
        ...


@attrs.define
class HandleGenerator:
    """The ``Generator`` port over engine replicas: it tokenizes locally and generates remotely.

    A replica lost mid-stream (or a stream that ends without a finish reason) is a ``ReplicaUnavailableError`` (503);
    closing the stream early cancels the generation on its replica.
    """

    replicas: ReplicaClient
    tokenizer: Tokenizing
    facts: EngineFacts

    @property
    def model_id(self) -> str:
        """The name clients use for the model."""
        return self.facts.model_id

    @property
    def context_length(self) -> int:
        """How many tokens fit in one sequence."""
        return self.facts.context_length

    @property
    def vocab_size(self) -> int:
        """How many token ids the model knows."""
        return self.facts.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``, tokenized here."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``, decoded here."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token."""
        return self.tokenizer.token_strings(token_ids)

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """Stream new tokens from the replica that most likely holds the prompt's prefix."""
        stream = self.replicas.generate(list(prompt_ids), params, prefix_keys(prompt_ids))
        finished = False
        try:
            async for batch in stream:
                for item in batch:
                    step = step_from_wire(item)
                    finished = step.finish_reason is not None
                    yield step
                    if finished:
                        return
            msg = "the engine replica ended the stream before the generation finished"
            raise ReplicaUnavailableError(msg)
        finally:
            if not finished:
                stream.cancel()

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        """Log-probabilities of ``token_ids[1:]``, computed on a replica."""
        answer = await self.replicas.score(list(token_ids), top)
        if "error" in answer:
            raise error_from_wire(answer["error"])
        return [logprob_from_wire(item) for item in answer["logprobs"]]
