"""``python -m entrypoints.cli``: a command-line client for the server, built on the official ``openai`` package."""
