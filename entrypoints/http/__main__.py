"""``python -m entrypoints.http``: parse the flags, configure logging, serve with uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import uvicorn

from adapters.huggingface.loading import ModelNotFoundError, resolve_model
from entrypoints.http.app import create_app
from entrypoints.logs import configure_logging
from entrypoints.settings import ServerSettings

DTYPE_CHOICES = ("fp32", "float32", "fp16", "half", "float16", "bf16", "bfloat16", "fp64", "double", "float64")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m entrypoints.http", description="OpenAI-compatible server for a HuggingFace model."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub id in the local HF cache, local directory, or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="(default: %(default)s)")
    parser.add_argument(
        "--dtype",
        type=str.lower,
        choices=DTYPE_CHOICES,
        default=None,
        help="weights dtype (default: bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=8, metavar="N", help="sequences decoded together (default: %(default)s)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a batch slot; past that: 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="torch threads on the CPU (default: cores - 1, min 1)"
    )
    parser.add_argument(
        "--chat-template", type=Path, default=None, help="Jinja chat template file (overrides the tokenizer's)"
    )
    parser.add_argument(
        "--stop-sequences", nargs="+", default=[], metavar="S", help="stop sequences applied to every request"
    )
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    parser.add_argument(
        "--log-format", choices=("auto", "console", "json"), default="auto", help="(default: JSON when not a TTY)"
    )
    parser.add_argument(
        "--no-log-content", action="store_true", help="keep prompts, token ids and texts out of the logs"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where converted GGUF snapshots are kept")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue < 0:
        parser.error("--max-batch-size must be at least 1 and --max-queue at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.chat_template is not None and not args.chat_template.is_file():
        parser.error(f"--chat-template: no such file: {args.chat_template}")
    return ServerSettings(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        threads=args.threads,
        chat_template=args.chat_template,
        stop_sequences=tuple(args.stop_sequences),
        log_level=args.log_level,
        log_format=args.log_format,
        log_content=not args.no_log_content,
        cache_dir=args.cache_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; exit non-zero when the model cannot be found or loaded."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, log_format=settings.log_format)
    log = structlog.get_logger("entrypoints.http")
    try:
        source = resolve_model(settings.model)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201  the one line the user reads
        return 2
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, lifespan="on"))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("server.starting", url=f"http://{host}:{settings.port}/v1", model=source.model_id)
    server.run()
    if failures:
        print(f"error: {failures[0]}", file=sys.stderr)  # noqa: T201  the one line the user reads
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
