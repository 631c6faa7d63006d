"""The interactive chat: a conversation kept across turns, slash commands, and readline line editing."""

from __future__ import annotations

import contextlib
import importlib
import sys

import attrs
import openai
from openai.types.chat import ChatCompletionMessageParam

from entrypoints.cli.commands import chat_answer, connect, usage_line
from entrypoints.cli.errors import EXPECTED_ERRORS, describe_error
from entrypoints.cli.options import ClientSettings

PROMPT = "you> "
QUIT_WORDS = frozenset({"quit", "exit", "q"})
HELP = """\
/system TEXT   set or replace the system message (it survives /clear); /system alone shows it
/clear         forget the conversation, keep the system message
/help          show this help
quit, exit, q  leave (Ctrl-D too)
Ctrl-C         stop the answer being written; the part already shown stays in the conversation"""


def enable_line_editing() -> None:
    """Arrow keys and history for ``input()``, where the platform has ``readline``."""
    with contextlib.suppress(ImportError):
        importlib.import_module("readline")


@attrs.define
class Conversation:
    """The messages so far; the system message, when set, always comes first."""

    system: str | None = None
    turns: list[ChatCompletionMessageParam] = attrs.Factory(list)

    def messages(self, question: str | None = None) -> list[ChatCompletionMessageParam]:
        """The messages to send, ending with ``question`` when given."""
        messages: list[ChatCompletionMessageParam] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.extend(self.turns)
        if question is not None:
            messages.append({"role": "user", "content": question})
        return messages

    def record(self, question: str, answer: str) -> None:
        """Remember one exchange."""
        self.turns.append({"role": "user", "content": question})
        self.turns.append({"role": "assistant", "content": answer})

    def clear(self) -> None:
        """Forget the exchanges, keep the system message."""
        self.turns.clear()


@attrs.define
class ChatSession:
    """Reads lines, runs the slash commands, and streams each answer into the conversation."""

    client: openai.OpenAI
    settings: ClientSettings
    conversation: Conversation

    def run(self) -> int:
        """Chat until ``quit`` or Ctrl-D; the exit status."""
        enable_line_editing()
        print(banner(self.settings))
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:  # at the prompt, Ctrl-C drops the line, as in a shell
                print()
                continue
            if line.lower() in QUIT_WORDS:
                return 0
            if line.startswith("/"):
                self.command(line)
            elif line:
                self.turn(line)

    def turn(self, question: str) -> None:
        """Ask ``question``, print the answer; a failed turn leaves the conversation as it was."""
        try:
            answer = chat_answer(self.client, self.settings, self.conversation.messages(question))
        except EXPECTED_ERRORS as error:
            print(f"error: {describe_error(error, self.settings.url)}", file=sys.stderr)
            return
        self.conversation.record(question, answer.text)
        if answer.interrupted:
            print("[stopped]")
        elif self.settings.show_usage:
            print(usage_line(answer.usage))

    def command(self, line: str) -> None:
        """Run one slash command."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name == "/clear":
            self.conversation.clear()
            print("(conversation cleared)")
        elif name == "/system" and argument:
            self.conversation.system = argument
            print("(system message set)")
        elif name == "/system":
            print(
                f"(system message: {self.conversation.system})" if self.conversation.system else "(no system message)"
            )
        elif name == "/help":
            print(HELP)
        else:
            print(f"unknown command {name}; /help lists them")


def banner(settings: ClientSettings) -> str:
    """What the session says first: where it is connected, and how to use it."""
    return (
        f"Chatting with {settings.model} at {settings.url}\n"
        "Commands: /system TEXT, /clear, /help; quit, exit, q or Ctrl-D to leave; Ctrl-C stops an answer."
    )


def run_interactive(settings: ClientSettings) -> int:
    """``chat`` without ``--message``: the interactive session, starting with ``--system`` when given."""
    with connect(settings) as client:
        return ChatSession(client, settings, Conversation(system=settings.system)).run()
