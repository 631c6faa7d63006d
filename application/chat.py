"""The chat completion use case."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import structlog

from application.generation import TextGeneration, complete
from domain.errors import InvalidRequestError
from domain.generation import Completion, CompletionStream, GenerationParams
from domain.messages import ChatMessage
from domain.ports import TemplateRenderer

log = structlog.get_logger(__name__)


@attrs.define
class ChatService:
    """Renders a conversation with the chat template and generates the assistant's answer."""

    renderer: TemplateRenderer
    generation: TextGeneration

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams) -> CompletionStream:
        """Check and render the request now, then stream the answer: text deltas, then the ``Completion``.

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
        return self.generation.stream(prompt, params)

    async def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        """The whole answer at once."""
        return await complete(self.stream(messages, params))
