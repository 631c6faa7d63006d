"""One function per command, and the answer printing the one-shot and interactive chats share."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import attrs
import httpx
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from entrypoints.cli.options import ClientSettings, extra_body

TIMEOUT = openai.Timeout(600.0, connect=10.0)
"""Answers may take minutes; a server that is not there should not."""
HEALTH_TIMEOUT = 10.0
INTERRUPTED = 130
"""The shell's exit status for a program stopped by Ctrl-C."""


def connect(settings: ClientSettings) -> openai.OpenAI:
    """An SDK client for the server; no retries, so failures show at once."""
    return openai.OpenAI(base_url=settings.url, api_key=settings.api_key, max_retries=0, timeout=TIMEOUT)


@attrs.frozen
class Answer:
    """What the model said (as far as it got when ``interrupted``), and the token counts if reported."""

    text: str
    usage: CompletionUsage | None = None
    interrupted: bool = False


@attrs.define
class AnswerPrinter:
    """Prints an answer as it arrives and remembers what was printed.

    Used as a context manager around the request, it ends the answer's line, and turns Ctrl-C into an
    ``interrupted`` answer: leaving the block closes the stream, so the server stops generating.
    """

    parts: list[str] = attrs.Factory(list)
    usage: CompletionUsage | None = None
    interrupted: bool = False

    def write(self, text: str) -> None:
        """Show ``text`` at once."""
        if text:
            self.parts.append(text)  # first: a Ctrl-C during the write must not lose text already on screen
            sys.stdout.write(text)
            sys.stdout.flush()

    @property
    def answer(self) -> Answer:
        """What was printed."""
        return Answer("".join(self.parts), self.usage, interrupted=self.interrupted)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        self.interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        if self.parts or self.interrupted:
            print()
        return self.interrupted


def request_options(settings: ClientSettings, *, stream: bool) -> dict[str, Any]:
    """The options chat and text completions share; unset ones are left out of the request."""
    options: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
    }
    if settings.stop:
        options["stop"] = list(settings.stop)
    if body := extra_body(settings.huggingface):
        options["extra_body"] = body
    if stream and settings.show_usage:
        options["stream_options"] = {"include_usage": True}
    return options


def chat_answer(
    client: openai.OpenAI, settings: ClientSettings, messages: Sequence[ChatCompletionMessageParam]
) -> Answer:
    """Ask for the assistant's next message and print it as it arrives; Ctrl-C stops it (see ``AnswerPrinter``)."""
    completions = client.chat.completions
    with AnswerPrinter() as printer:
        if settings.stream:
            options = request_options(settings, stream=True)
            with completions.create(messages=messages, stream=True, **options) as stream:
                for chunk in stream:
                    printer.usage = chunk.usage or printer.usage
                    printer.write("".join(choice.delta.content or "" for choice in chunk.choices))
        else:
            response = completions.create(messages=messages, stream=False, **request_options(settings, stream=False))
            printer.usage = response.usage
            printer.write(response.choices[0].message.content or "")
    return printer.answer


def completion_answer(client: openai.OpenAI, settings: ClientSettings, prompt: str) -> Answer:
    """Continue ``prompt`` (echoed first with ``--echo``) and print the text as it arrives; Ctrl-C stops it."""
    completions = client.completions
    with AnswerPrinter() as printer:
        if settings.stream:
            options = request_options(settings, stream=True)
            with completions.create(prompt=prompt, echo=settings.echo, stream=True, **options) as stream:
                for chunk in stream:
                    printer.usage = chunk.usage or printer.usage
                    printer.write("".join(choice.text for choice in chunk.choices))
        else:
            options = request_options(settings, stream=False)
            response = completions.create(prompt=prompt, echo=settings.echo, stream=False, **options)
            printer.usage = response.usage
            printer.write(response.choices[0].text)
    return printer.answer


def usage_line(usage: CompletionUsage | None) -> str:
    """The token counts, as ``--show-usage`` prints them (with the prefix cache's share when it had any)."""
    if usage is None:
        return "usage: not reported by the server"
    details = usage.prompt_tokens_details
    cached = f" cached_tokens={details.cached_tokens}" if details is not None and details.cached_tokens else ""
    return (
        f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
        f"total_tokens={usage.total_tokens}{cached}"
    )


def finish(answer: Answer, settings: ClientSettings) -> int:
    """Print the usage if asked for; the exit status of a one-shot command."""
    if answer.interrupted:
        return INTERRUPTED
    if settings.show_usage:
        print(usage_line(answer.usage))
    return 0


def run_chat_once(settings: ClientSettings, message: str) -> int:
    """``chat --message``: one turn, the system message first when set."""
    messages: list[ChatCompletionMessageParam] = []
    if settings.system:
        messages.append({"role": "system", "content": settings.system})
    messages.append({"role": "user", "content": message})
    with connect(settings) as client:
        return finish(chat_answer(client, settings, messages), settings)


def run_complete(settings: ClientSettings, prompt: str) -> int:
    """``complete PROMPT``: one text completion."""
    with connect(settings) as client:
        return finish(completion_answer(client, settings, prompt), settings)


def run_models(settings: ClientSettings) -> int:
    """``models``: the served model ids, one a line, each with whether it is loaded (and an adapter's base)."""
    with connect(settings) as client:
        for model in client.models.list():
            extra = model.model_extra or {}
            status = f"\t{extra['status']}" if isinstance(extra.get("status"), str) else ""
            parent = f"\tLoRA on {extra['parent']}" if isinstance(extra.get("parent"), str) else ""
            print(f"{model.id}{status}{parent}")
    return 0


def with_model(settings: ClientSettings) -> ClientSettings:
    """``settings`` naming a model: ``--model``, else the server's first (its default)."""
    if settings.model is not None:
        return settings
    with connect(settings) as client:
        first = next(iter(client.models.list()), None)
    return attrs.evolve(settings, model=first.id if first is not None else "default")


def run_health(settings: ClientSettings) -> int:
    """``health``: print the server's status JSON; 0 only when it answers 200 (the model is ready)."""
    response = httpx.get(settings.health_url, timeout=HEALTH_TIMEOUT)
    try:
        status = response.json()
    except ValueError:
        print(
            f"error: {settings.health_url} answered {response.status_code} {response.reason_phrase}, not JSON",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(status))
    return 0 if response.status_code == httpx.codes.OK else 1
