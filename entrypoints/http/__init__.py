"""The HTTP server: ``python -m entrypoints.http --model X``."""
