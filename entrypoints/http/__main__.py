"""``python -m entrypoints.http``: parse the flags, configure logging, serve with uvicorn."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
import uvicorn

from adapters.huggingface.loading import ModelNotFoundError, resolve_model
from entrypoints.http.app import create_app
from entrypoints.http.lifecycle import Drain, DrainingServer
from entrypoints.http.security import warn_if_exposed
from entrypoints.logs import configure_logging
from entrypoints.settings import ServerSettings

DTYPE_CHOICES = ("fp32", "float32", "fp16", "half", "float16", "bf16", "bfloat16", "fp64", "double", "float64")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY_VARIABLE = "HF_OPENAI_SERVER_API_KEY"
SHUTDOWN_BACKSTOP = 5
"""Seconds uvicorn waits past ``--shutdown-timeout`` before it cancels what our drain did not end."""


def positive_number(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a finite number above zero: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_integer(text: str) -> int:
    """An argparse type: a count above zero."""
    value = int(text)
    if value <= 0:
        msg = f"must be above zero: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from the command line, and API keys also from ``HF_OPENAI_SERVER_API_KEY`` (comma-separated)."""
    parser = argparse.ArgumentParser(
        prog="python -m entrypoints.http", description="OpenAI-compatible server for a HuggingFace model."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub id in the local HF cache, local directory, or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--served-model-name",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="a name clients use for the model (repeatable; the first is the id responses report; "
        "default: the model's own name)",
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
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads on the CPU (default: the batching engine times cores - 1 against every core and keeps "
        "the faster; the plain path uses cores - 1)",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="memory for cached prompt prefixes, reused by prompts that begin alike; 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--no-pack-weights",
        action="store_true",
        help="on the CPU, multiply with torch's own linear layers instead of oneDNN-prepacked weights",
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
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize (repeatable; or ${API_KEY_VARIABLE})",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browsers from ORIGIN (repeatable)"
    )
    parser.add_argument(
        "--max-body-bytes", type=positive_integer, default=4 * 1024 * 1024, help="(default: %(default)s, 4 MiB)"
    )
    parser.add_argument(
        "--request-timeout", type=positive_number, default=None, metavar="SECONDS", help="(default: no limit)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=positive_number,
        default=30.0,
        metavar="SECONDS",
        help="how long requests may finish after SIGTERM/SIGINT (default: %(default)s)",
    )
    parser.add_argument(
        "--sse-keepalive",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="send an SSE ': ping' comment when a stream has been silent this long; 0: never (default: %(default)s)",
    )
    parser.add_argument(
        "--responses-store-size",
        type=int,
        default=1000,
        metavar="N",
        help="responses kept for previous_response_id and GET /v1/responses/{id}, least recently used evicted; "
        "0 keeps none (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue < 0:
        parser.error("--max-batch-size must be at least 1 and --max-queue at least 0")
    if any(not name.strip() for name in args.served_model_name):
        parser.error("--served-model-name must not be empty")
    if args.prefix_cache_mib < 0:
        parser.error("--prefix-cache-mib must be at least 0")
    if not (math.isfinite(args.sse_keepalive) and args.sse_keepalive >= 0):
        parser.error("--sse-keepalive must be a finite number of seconds, at least 0")
    if args.responses_store_size < 0:
        parser.error("--responses-store-size must be at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    environ = os.environ if environ is None else environ
    from_environment = [key.strip() for key in environ.get(API_KEY_VARIABLE, "").split(",") if key.strip()]
    if args.chat_template is not None and not args.chat_template.is_file():
        parser.error(f"--chat-template: no such file: {args.chat_template}")
    return ServerSettings(
        model=args.model,
        served_model_names=tuple(dict.fromkeys(args.served_model_name)),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        threads=args.threads,
        pack_weights=not args.no_pack_weights,
        prefix_cache_mib=args.prefix_cache_mib,
        chat_template=args.chat_template,
        stop_sequences=tuple(args.stop_sequences),
        log_level=args.log_level,
        log_format=args.log_format,
        log_content=not args.no_log_content,
        cache_dir=args.cache_dir,
        api_keys=tuple(dict.fromkeys([*args.api_key, *from_environment])),
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        sse_keepalive=args.sse_keepalive or None,
        responses_store_size=args.responses_store_size,
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

    drain = Drain(grace=settings.shutdown_timeout)
    app = create_app(settings, on_load_failure=stop, drain=drain)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + SHUTDOWN_BACKSTOP,
    )
    server = DrainingServer(config, drain)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    served = settings.served_model_names[0] if settings.served_model_names else source.model_id
    log.info("server.starting", url=f"http://{host}:{settings.port}/v1", model=served)
    warn_if_exposed(settings)
    server.run()
    if failures:
        print(f"error: {failures[0]}", file=sys.stderr)  # noqa: T201  the one line the user reads
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
