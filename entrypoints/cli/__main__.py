"""``python -m entrypoints.cli``: parse the command line, run one command, report failures in one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from entrypoints.cli.commands import INTERRUPTED, run_chat_once, run_complete, run_health, run_models, with_model
from entrypoints.cli.errors import EXPECTED_ERRORS, describe_error
from entrypoints.cli.options import Command, Invocation, parse_invocation
from entrypoints.cli.repl import run_interactive

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` asks for; the exit status (0 on success)."""
    try:
        invocation = parse_invocation(argv, os.environ)
    except SystemExit as stop:  # argparse printed the help or the usage error already
        return stop.code if isinstance(stop.code, int) else USAGE_ERROR
    try:
        return run(invocation)
    except EXPECTED_ERRORS as error:
        settings = invocation.settings
        url = settings.health_url if invocation.command is Command.HEALTH else settings.url
        print(f"error: {describe_error(error, url)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED


def run(invocation: Invocation) -> int:
    """Dispatch to the command's function."""
    settings, text = invocation.settings, invocation.text
    match invocation.command:
        case Command.CHAT:
            settings = with_model(settings)
            return run_interactive(settings) if text is None else run_chat_once(settings, text)
        case Command.COMPLETE:
            return run_complete(with_model(settings), text or "")
        case Command.HEALTH:
            return run_health(settings)
        case Command.MODELS:
            return run_models(settings)


if __name__ == "__main__":
    sys.exit(main())
