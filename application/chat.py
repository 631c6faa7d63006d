"""The chat completion use case."""

from __future__ import annotations

import attrs
import structlog

from application.generation import ChoiceJob, Prompt, TextGeneration
from application.reasoning import opens_thinking, split_reasoning
from application.tools import check_tool_use, describe_tools, extract_tool_calls, tool_constraint
from domain.errors import InvalidRequestError
from domain.generation import CompletionStream, GenerationParams
from domain.messages import Conversation
from domain.ports import TemplateRenderer

log = structlog.get_logger(__name__)


def choice_params(params: GenerationParams, index: int) -> GenerationParams:
    """Parameters of choice ``index`` of ``n``: a seeded request gives each choice its own seed, so they differ.

    The seeds wrap around within signed 64 bits, so every choice's seed is as valid as the one the client sent.
    """
    if params.seed is None or index == 0:
        return params
    return attrs.evolve(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)


def render_chat_prompt(renderer: TemplateRenderer, conversation: Conversation) -> str:
    """The prompt of a conversation, as chat generates from it and ``/tokenize`` counts it.

    Tools go to a template that shows them, else into the system prompt (Hermes format). With
    ``continue_final_message`` the prompt ends inside the last message, which the model continues (vLLM's and
    transformers' option), instead of opening the assistant's turn. ``template_options`` reach the template as
    variables.
    """
    if not conversation.messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    check_tool_use(conversation.tools)
    opens_turn, options, tools = conversation.add_generation_prompt, conversation.template_options, conversation.tools
    if conversation.continue_final_message and opens_turn:
        msg = "continue_final_message and add_generation_prompt cannot both be true"
        raise InvalidRequestError(msg, param="continue_final_message")
    if renderer.supports_tools:
        shown = list(conversation.messages)
        text = renderer.render(
            shown, add_generation_prompt=opens_turn, tools=conversation.tools.offered, options=options
        )
    else:
        shown = describe_tools(conversation.messages, tools)
        text = renderer.render(shown, add_generation_prompt=opens_turn, options=options)
    return _up_to_final_message(text, shown[-1].content) if conversation.continue_final_message else text


def _up_to_final_message(text: str, final: str) -> str:
    """``text`` cut right after the final message's content (its end-of-turn markup dropped), as transformers does."""
    for content in (final, final.strip()):
        end = text.rfind(content) if content else -1
        if end >= 0:
            return text[: end + len(content)]
    msg = "continue_final_message needs a final message with content the chat template shows"
    raise InvalidRequestError(msg, param="continue_final_message")


@attrs.define
class ChatService:
    """Renders a conversation with the chat template and generates the assistant's answers."""

    renderer: TemplateRenderer
    generation: TextGeneration

    def stream(self, conversation: Conversation, params: GenerationParams, *, n: int = 1) -> CompletionStream:
        """Check and render the request now, then stream ``n`` answers: deltas, finished choices, the ``Completion``.

        With tools offered, their calls are taken out of the answers' text (and a forced choice constrains the
        output to calls; with a constrained answer, the output is calls or that answer). Thinking
        (``<think>...</think>``) is taken out of the text too, into ``reasoning``. ``template_options`` reach the
        chat template as variables (``enable_thinking``, ``reasoning_effort``). Errors in the request (template,
        context length, tool choice) are raised by this call, before anything is generated.
        """
        prompt = self.prompt(conversation)
        tools = conversation.tools
        params = attrs.evolve(params, constraint=tool_constraint(tools, params.constraint))
        params = self.generation.budget(prompt, params, default_max_tokens=None)
        events = self.generation.run([ChoiceJob(prompt, choice_params(params, i), i) for i in range(n)])
        events = split_reasoning(
            events, thinking=opens_thinking(prompt.text), count_tokens=self.generation.count_tokens
        )
        offered = tools.offered
        if not offered:
            return events
        return extract_tool_calls(events, [tool.name for tool in offered], forced=tools.forced)

    def prompt(self, conversation: Conversation) -> Prompt:
        """The rendered and tokenized prompt of a conversation (``count_tokens`` APIs ask for just this)."""
        for index, message in enumerate(conversation.messages):
            calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls]
            if self.generation.log_content:
                extra = {"tool_calls": calls} if calls else {}
                log.info("chat.message", index=index, role=str(message.role), content=message.content, **extra)
            else:
                log.info("chat.message", index=index, role=str(message.role))
        text = render_chat_prompt(self.renderer, conversation)
        return self.generation.tokenize(text, add_special_tokens=False)
