"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes: count a prompt's tokens before sending it."""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v
from litestar import Controller, Request, post

from domain.messages import Conversation
from domain.tools import ToolUse
from entrypoints.bootstrap import Services
from entrypoints.http.controllers import read_body
from entrypoints.http.openai_requests import Message
from entrypoints.http.openapi import body_operation
from entrypoints.http.wire_tools import ToolDefinition, tool_choice


@attrs.frozen(kw_only=True)
class TokenizeRequest:
    """Body of ``POST /tokenize``: a completion ``prompt`` or chat ``messages``, not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = attrs.field(default=None, validator=v.optional(v.min_len(1)))
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ToolDefinition] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables for the chat template, as chat completions take them (vLLM's)."""
    return_token_strs: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            msg = "'prompt' or 'messages' must be given, and not both"
            raise ValueError(msg)


@attrs.frozen
class TokenizeResponse:
    """Body of a ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


@attrs.frozen(kw_only=True)
class DetokenizeRequest:
    """Body of ``POST /detokenize``."""

    tokens: list[int]
    model: str | None = None


@attrs.frozen
class DetokenizeResponse:
    """Body of a ``/detokenize`` answer."""

    prompt: str


class TokenizationController(Controller):
    """vLLM's tokenizer utilities: https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html."""

    tags = ["Tokenizer"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        "/tokenize",
        operation_id="tokenize",
        summary="Tokenize a prompt or conversation",
        status_code=200,
        operation_class=body_operation(TokenizeRequest),
    )
    async def tokenize(self, request: Request[Any, Any, Any], services: Services) -> TokenizeResponse:
        """Token ids of a prompt (as completions count it) or of messages (and tools) as chat renders them."""
        body = await read_body(request, TokenizeRequest)
        tokenizer = services.tokenization
        if body.messages is not None:
            messages = [message.to_domain(index) for index, message in enumerate(body.messages)]
            tools = tuple(tool.to_domain(index) for index, tool in enumerate(body.tools or ()))
            conversation = Conversation(
                messages=tuple(messages),
                tools=ToolUse(tools, tool_choice(None, has_tools=bool(tools))),
                template_options=body.chat_template_kwargs or {},
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
            )
            tokens = tokenizer.tokenize_messages(conversation, add_special_tokens=bool(body.add_special_tokens))
        else:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = tokenizer.tokenize_text(body.prompt or "", add_special_tokens=special)
        strings = tokenizer.token_strings(tokens) if body.return_token_strs else None
        return TokenizeResponse(len(tokens), tokenizer.max_model_len, tokens, strings)

    @post(
        "/detokenize",
        operation_id="detokenize",
        summary="Turn token ids back into text",
        status_code=200,
        operation_class=body_operation(DetokenizeRequest),
    )
    async def detokenize(self, request: Request[Any, Any, Any], services: Services) -> DetokenizeResponse:
        """The text of a list of token ids."""
        body = await read_body(request, DetokenizeRequest)
        return DetokenizeResponse(services.tokenization.detokenize(body.tokens))
