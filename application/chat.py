"""The chat completion use case."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import structlog

from application.generation import ChoiceJob, Prompt, TextGeneration, complete
from application.reasoning import opens_thinking, split_reasoning
from application.tools import check_tool_use, describe_tools, extract_tool_calls, tool_constraint
from domain.errors import InvalidRequestError
from domain.generation import Completion, CompletionStream, GenerationParams
from domain.messages import ChatMessage
from domain.ports import TemplateRenderer
from domain.tools import NO_TOOLS, ToolUse

log = structlog.get_logger(__name__)


def choice_params(params: GenerationParams, index: int) -> GenerationParams:
    """Parameters of choice ``index`` of ``n``: a seeded request gives each choice its own seed, so they differ."""
    return params if params.seed is None or index == 0 else attrs.evolve(params, seed=params.seed + index)


@attrs.define
class ChatService:
    """Renders a conversation with the chat template and generates the assistant's answers."""

    renderer: TemplateRenderer
    generation: TextGeneration

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        n: int = 1,
        tools: ToolUse = NO_TOOLS,
        template_options: Mapping[str, object] | None = None,
    ) -> CompletionStream:
        """Check and render the request now, then stream ``n`` answers: deltas, finished choices, the ``Completion``.

        With tools offered, their calls are taken out of the answers' text (and a forced choice constrains the
        output to calls). Thinking (``<think>...</think>``) is taken out of the text too, into ``reasoning``.
        ``template_options`` reach the chat template as variables (``enable_thinking``, ``reasoning_effort``).
        Errors in the request (template, context length, tool choice) are raised by this call, before anything is
        generated.
        """
        prompt = self.prompt(messages, tools=tools, template_options=template_options)
        constraint = tool_constraint(tools)
        if constraint is not None:
            params = attrs.evolve(params, constraint=constraint)
        params = self.generation.budget(prompt, params, default_max_tokens=None)
        events = self.generation.run([ChoiceJob(prompt, choice_params(params, i), i) for i in range(n)])
        events = split_reasoning(
            events, thinking=opens_thinking(prompt.text), count_tokens=self.generation.count_tokens
        )
        offered = tools.offered
        return extract_tool_calls(events, [tool.name for tool in offered]) if offered else events

    def prompt(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: ToolUse = NO_TOOLS,
        template_options: Mapping[str, object] | None = None,
    ) -> Prompt:
        """The rendered and tokenized prompt of a conversation (``count_tokens`` APIs ask for just this)."""
        if not messages:
            raise InvalidRequestError("messages must contain at least one message", param="messages")
        check_tool_use(tools)
        for index, message in enumerate(messages):
            calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls]
            if self.generation.log_content:
                extra = {"tool_calls": calls} if calls else {}
                log.info("chat.message", index=index, role=str(message.role), content=message.content, **extra)
            else:
                log.info("chat.message", index=index, role=str(message.role))
        text = self._render(messages, tools, template_options)
        return self.generation.tokenize(text, add_special_tokens=False)

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        *,
        n: int = 1,
        tools: ToolUse = NO_TOOLS,
        template_options: Mapping[str, object] | None = None,
    ) -> Completion:
        """All answers at once."""
        return await complete(self.stream(messages, params, n=n, tools=tools, template_options=template_options))

    def _render(self, messages: Sequence[ChatMessage], tools: ToolUse, options: Mapping[str, object] | None) -> str:
        """The prompt: tools go to a template that shows them, else into the system prompt (Hermes format)."""
        if self.renderer.supports_tools:
            return self.renderer.render(messages, add_generation_prompt=True, tools=tools.offered, options=options)
        return self.renderer.render(describe_tools(messages, tools), add_generation_prompt=True, options=options)
