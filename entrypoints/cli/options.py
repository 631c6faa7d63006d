"""What the client is asked to do, and with which settings, parsed once from the command line."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping, Sequence

import attrs

PROG = "python -m entrypoints.cli"
DEFAULT_URL = "http://localhost:8000/v1"
URL_VARIABLE = "HF_OPENAI_SERVER_URL"
API_KEY_VARIABLE = "OPENAI_API_KEY"
PLACEHOLDER_API_KEY = "not-needed"
"""The SDK insists on a key; the server checks none."""
EXAMPLES = f"""\
examples:
  {PROG} chat
  {PROG} chat --message "Capital of France?"
  {PROG} complete "Once upon a time" --stop . --max-tokens 40
  {PROG} --url http://gpu-box:8000/v1 health
"""


@attrs.frozen(kw_only=True)
class HuggingFaceParameters:
    """HuggingFace generation options OpenAI's API lacks; ``None`` means "not set" and is not sent."""

    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    top_k: int | None = None
    num_beams: int | None = None
    min_length: int | None = None
    seed: int | None = None


def extra_body(parameters: HuggingFaceParameters) -> dict[str, int | float]:
    """The options the user set, as the SDK's ``extra_body``."""
    return {name: value for name, value in attrs.asdict(parameters).items() if value is not None}


@attrs.frozen(kw_only=True)
class ClientSettings:
    """Where the server is and how to ask it; see ``python -m entrypoints.cli --help``."""

    url: str = DEFAULT_URL
    """The server's OpenAI base URL, ``/v1`` included."""
    api_key: str = PLACEHOLDER_API_KEY
    model: str | None = None
    """``None``: the server's first model (its default)."""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    system: str | None = None
    show_usage: bool = False
    stream: bool = True
    stop: tuple[str, ...] = ()
    echo: bool = False
    """Completions only: the prompt comes back in front of the continuation."""
    huggingface: HuggingFaceParameters = HuggingFaceParameters()

    @property
    def health_url(self) -> str:
        """``GET /health`` lives at the server's root, beside ``/v1``."""
        return self.url.rstrip("/").removesuffix("/v1") + "/health"


DEFAULTS = ClientSettings()


class Command(enum.StrEnum):
    """The client's subcommands."""

    CHAT = "chat"
    COMPLETE = "complete"
    HEALTH = "health"
    MODELS = "models"


@attrs.frozen
class Invocation:
    """One run of the client: the command, its text (the chat message or the prompt), and the settings.

    ``chat`` without text is the interactive session.
    """

    command: Command
    text: str | None
    settings: ClientSettings


def parse_invocation(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Invocation:
    """The invocation the command line asks for; argparse exits (status 2) on a usage error."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    legacy = _legacy_command(args)
    if args.command is not None and legacy is not None:
        parser.error("--message, --completion, --interactive, --health and --list-models replace a command")
    if args.command is None and legacy is None:
        parser.error("choose a command: chat, complete, health or models")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https://, not {args.url!r}")
    command, text = legacy or (Command(args.command), vars(args).get("message", vars(args).get("prompt")))
    return Invocation(command, text, _settings(args))


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser: subcommands, the legacy flags, and the options, accepted before or after the subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to the OpenAI-compatible server: chat, complete a prompt, check health, list models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(parser, environ, top_level=True)
    legacy = parser.add_argument_group("legacy flags (instead of a command)").add_mutually_exclusive_group()
    legacy.add_argument("--message", dest="legacy_message", metavar="TEXT", help="one chat turn: chat --message")
    legacy.add_argument("--completion", metavar="PROMPT", help="one completion: complete PROMPT")
    legacy.add_argument("--interactive", action="store_true", help="interactive chat: chat")
    legacy.add_argument("--health", action="store_true", help="server health: health")
    legacy.add_argument("--list-models", action="store_true", help="served models: models")

    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    chat = commands.add_parser(
        "chat", help="chat with the model: interactive, or one turn with --message", description="Chat with the model."
    )
    chat.add_argument("--message", metavar="TEXT", help="send this one message, print the answer and exit")
    complete = commands.add_parser(
        "complete", help="continue a prompt (the completions API)", description="Continue a prompt."
    )
    complete.add_argument("prompt", help="the text to continue")
    health = commands.add_parser(
        "health",
        help="print the server's /health status; exit 0 only when it is ready",
        description="Print the server's /health status; exit 0 only when it is ready.",
    )
    models = commands.add_parser("models", help="list the served models", description="List the served models.")
    for subparser in (chat, complete, health, models):
        _add_options(subparser, environ, top_level=False)
    return parser


def _add_options(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, top_level: bool) -> None:
    """The shared options; on a subcommand their defaults are suppressed so they do not undo the top level's."""

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    off = default(value=False)

    server = parser.add_argument_group("server")
    server.add_argument(
        "--url",
        default=default(environ.get(URL_VARIABLE, DEFAULT_URL)),
        help=f"the server's OpenAI base URL (default: ${URL_VARIABLE} or {DEFAULT_URL})",
    )
    server.add_argument(
        "--api-key",
        default=default(environ.get(API_KEY_VARIABLE, PLACEHOLDER_API_KEY)),
        metavar="KEY",
        help=f"(default: ${API_KEY_VARIABLE}, else a placeholder: the server checks none)",
    )
    server.add_argument(
        "--model",
        default=default(DEFAULTS.model),
        metavar="NAME",
        help="model name to send (default: the server's first model, as `models` lists them)",
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument(
        "--max-tokens",
        type=int,
        default=default(DEFAULTS.max_tokens),
        metavar="N",
        help=f"most tokens to generate (default: {DEFAULTS.max_tokens})",
    )
    generation.add_argument(
        "--temperature",
        type=float,
        default=default(DEFAULTS.temperature),
        metavar="T",
        help=f"0 to 2, 0 is greedy (default: {DEFAULTS.temperature})",
    )
    generation.add_argument(
        "--top-p",
        type=float,
        default=default(DEFAULTS.top_p),
        metavar="P",
        help=f"nucleus sampling (default: {DEFAULTS.top_p})",
    )
    generation.add_argument("--system", default=default(None), metavar="TEXT", help="system message for chat")
    generation.add_argument(
        "--stop", action="append", default=default(None), metavar="S", help="stop sequence (repeatable)"
    )
    generation.add_argument(
        "--echo", action="store_true", default=off, help="complete: print the prompt before its continuation"
    )
    generation.add_argument(
        "--no-stream", action="store_true", default=off, help="wait for the whole answer instead of streaming"
    )
    generation.add_argument(
        "--show-usage", action="store_true", default=off, help="print the token counts after each answer"
    )

    huggingface = parser.add_argument_group("HuggingFace generation options (sent in extra_body, only when given)")
    huggingface.add_argument("--repetition-penalty", type=float, default=default(None), metavar="X")
    huggingface.add_argument("--no-repeat-ngram-size", type=int, default=default(None), metavar="N")
    huggingface.add_argument("--top-k", type=int, default=default(None), metavar="K")
    huggingface.add_argument("--num-beams", type=int, default=default(None), metavar="N")
    huggingface.add_argument("--min-length", type=int, default=default(None), metavar="N")
    huggingface.add_argument("--seed", type=int, default=default(None), metavar="N")


def _legacy_command(args: argparse.Namespace) -> tuple[Command, str | None] | None:
    """The command a legacy flag stands for, if one was given."""
    if args.legacy_message is not None:
        return Command.CHAT, args.legacy_message
    if args.completion is not None:
        return Command.COMPLETE, args.completion
    if args.interactive:
        return Command.CHAT, None
    if args.health:
        return Command.HEALTH, None
    if args.list_models:
        return Command.MODELS, None
    return None


def _settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(
        url=args.url,
        api_key=args.api_key,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        system=args.system,
        show_usage=args.show_usage,
        stream=not args.no_stream,
        stop=tuple(args.stop or ()),
        echo=args.echo,
        huggingface=HuggingFaceParameters(
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            top_k=args.top_k,
            num_beams=args.num_beams,
            min_length=args.min_length,
            seed=args.seed,
        ),
    )
