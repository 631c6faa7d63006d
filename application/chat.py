"""The chat completion use case."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import structlog

from application.generation import ChoiceJob, TextGeneration, complete
from domain.errors import InvalidRequestError
from domain.generation import Completion, CompletionStream, GenerationParams
from domain.messages import ChatMessage
from domain.ports import TemplateRenderer

log = structlog.get_logger(__name__)


def choice_params(params: GenerationParams, index: int) -> GenerationParams:
    """Parameters of choice ``index`` of ``n``: a seeded request gives each choice its own seed, so they differ."""
    return params if params.seed is None or index == 0 else attrs.evolve(params, seed=params.seed + index)


@attrs.define
class ChatService:
    """Renders a conversation with the chat template and generates the assistant's answers."""

    renderer: TemplateRenderer
    generation: TextGeneration

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams, *, n: int = 1) -> CompletionStream:
        """Check and render the request now, then stream ``n`` answers: deltas, finished choices, the ``Completion``.

        Errors in the request (template, context length) are raised by this call, before anything is generated.
        """
        if not messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        for index, message in enumerate(messages):
            if self.generation.log_content:
                log.info("chat.message", index=index, role=str(message.role), content=message.content)
            else:
                log.info("chat.message", index=index, role=str(message.role))
        text = self.renderer.render(messages, add_generation_prompt=True)
        prompt = self.generation.tokenize(text, add_special_tokens=False)
        params = self.generation.budget(prompt, params, default_max_tokens=None)
        return self.generation.run([ChoiceJob(prompt, choice_params(params, i), i) for i in range(n)])

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams, *, n: int = 1) -> Completion:
        """All answers at once."""
        return await complete(self.stream(messages, params, n=n))
