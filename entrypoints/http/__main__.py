"""``python -m entrypoints.http``: parse the flags, configure logging, serve with uvicorn."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import structlog
import uvicorn

from adapters.huggingface.loading import ModelNotFoundError, resolve_model
from adapters.huggingface.quantization import QUANTIZE_CHOICES
from entrypoints.http.app import create_app
from entrypoints.http.lifecycle import Drain, DrainingServer
from entrypoints.http.security import warn_if_exposed
from entrypoints.logs import configure_logging
from entrypoints.models_config import ModelsConfig, ModelsConfigError, read_models_config
from entrypoints.models_dir import model_files
from entrypoints.settings import SPECULATIVE_TOKENS, LoraChoice, ModelChoice, ServerSettings

DEVICES = ("auto", "cuda", "cpu")
DTYPE_CHOICES = ("fp32", "float32", "fp16", "half", "float16", "bf16", "bfloat16", "fp64", "double", "float64")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
API_KEY_VARIABLE = "HF_OPENAI_SERVER_API_KEY"
SHUTDOWN_BACKSTOP = 5
"""Seconds uvicorn waits past ``--shutdown-timeout`` before it cancels what our drain did not end."""


DEFAULTS = ServerSettings()
"""Every flag's default is the setting's own: written once, in ``ServerSettings``."""


def positive_number(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a finite number above zero: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def seconds_or_zero(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 meaning never."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        msg = f"must be a finite number of seconds, at least 0: {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_integer(text: str) -> int:
    """An argparse type: a count above zero."""
    return at_least(1)(text)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            msg = f"must be at least {minimum}: {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def name(text: str) -> str:
    """An argparse type: a name that is not blank."""
    if not text.strip():
        msg = "must not be empty"
        raise argparse.ArgumentTypeError(msg)
    return text


def existing_directory(text: str) -> Path:
    """An argparse type: the path of a directory that exists."""
    path = Path(text)
    if not path.is_dir():
        msg = f"no such directory: {text}"
        raise argparse.ArgumentTypeError(msg)
    return path


def model_choice(text: str) -> ModelChoice:
    """An argparse type: ``MODEL`` or ``NAME=MODEL`` (a name has no ``/``; a hub id or path has no ``=``)."""
    label, equals, source = text.partition("=")
    if equals and label.strip() and "/" not in label and os.sep not in label:
        if not source.strip():
            msg = f"no model after {label}=: {text}"
            raise argparse.ArgumentTypeError(msg)
        return ModelChoice(name=label, source=source)
    return ModelChoice(source=text)


def lora_choice(text: str) -> LoraChoice:
    """An argparse type: ``NAME=PATH`` of a PEFT LoRA adapter directory."""
    label, equals, path = text.partition("=")
    if not (equals and label.strip() and path.strip()):
        msg = f"expected NAME=PATH: {text}"
        raise argparse.ArgumentTypeError(msg)
    if not (Path(path) / "adapter_config.json").is_file():
        msg = f"no PEFT adapter at {path} (adapter_config.json is missing)"
        raise argparse.ArgumentTypeError(msg)
    return LoraChoice(name=label, path=Path(path))


def existing_file(text: str) -> Path:
    """An argparse type: the path of a file that exists."""
    path = Path(text)
    if not path.is_file():
        msg = f"no such file: {text}"
        raise argparse.ArgumentTypeError(msg)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The server's command line, flag by flag, in groups."""
    parser = argparse.ArgumentParser(
        prog="python -m entrypoints.http", description="OpenAI-compatible server for a HuggingFace model."
    )
    _model_flags(parser)
    _budget_flags(parser)
    _engine_flags(parser)
    _logging_flags(parser)
    _operations_flags(parser)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        action="append",
        type=model_choice,
        default=[],
        metavar="[NAME=]MODEL",
        help="hub id in the local HF cache, local directory, or .gguf file, served as NAME (default: its own name); "
        "repeatable: the first is the default model (default: embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--models-dir",
        type=existing_directory,
        default=DEFAULTS.models_dir,
        metavar="DIR",
        help="serve every model directory (with config.json) and .gguf file in DIR under its own name; "
        "looked at again when a name is not found",
    )
    group.add_argument(
        "--lora",
        action="append",
        type=lora_choice,
        default=[],
        metavar="NAME=PATH",
        help="serve the PEFT LoRA adapter directory PATH as the model NAME, on the model its config names "
        "(else the first model); repeatable",
    )
    group.add_argument(
        "--models-config",
        type=existing_file,
        default=None,
        metavar="FILE",
        help="TOML file with per-model options ([models.NAME]: path, chat_template, stop_sequences, dtype, device) "
        "and adapters ([loras.NAME]: path, base)",
    )
    group.add_argument(
        "--served-model-name",
        action="extend",
        nargs="+",
        type=name,
        default=list(DEFAULTS.served_model_names),
        metavar="NAME",
        help="a name clients use for the model (repeatable; the first is the id responses report; "
        "default: the model's own name)",
    )
    group.add_argument("--device", choices=DEVICES, default=DEFAULTS.device, help="(default: %(default)s)")
    group.add_argument(
        "--dtype",
        type=str.lower,
        choices=DTYPE_CHOICES,
        default=DEFAULTS.dtype,
        help="weights dtype (default: bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU)",
    )
    group.add_argument(
        "--chat-template",
        type=existing_file,
        default=DEFAULTS.chat_template,
        help="Jinja chat template file (overrides the tokenizer's)",
    )
    group.add_argument(
        "--stop-sequences",
        nargs="+",
        default=list(DEFAULTS.stop_sequences),
        metavar="S",
        help="stop sequences applied to every request",
    )
    group.add_argument(
        "--cache-dir", type=Path, default=DEFAULTS.cache_dir, help="where converted GGUF snapshots are kept"
    )


def _budget_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models in memory")
    group.add_argument(
        "--max-loaded-models",
        type=at_least(1),
        default=DEFAULTS.max_loaded_models,
        metavar="N",
        help="models held in memory at once; loading another unloads the least recently used idle one "
        "(default: no limit)",
    )
    group.add_argument(
        "--max-model-memory",
        type=positive_number,
        default=DEFAULTS.max_model_memory_gib,
        dest="max_model_memory_gib",
        metavar="GIB",
        help="memory the loaded models' weights may take together (default: no limit)",
    )
    group.add_argument(
        "--model-idle-timeout",
        type=positive_number,
        default=DEFAULTS.model_idle_timeout,
        metavar="SECONDS",
        help="unload a model unused this long; preloaded ones stay (default: never)",
    )
    group.add_argument(
        "--preload",
        action="append",
        type=name,
        default=None,
        metavar="NAME",
        help="load NAME at start, and keep it loaded when idle (repeatable; default: the first model)",
    )


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--max-batch-size",
        type=at_least(1),
        default=DEFAULTS.max_batch_size,
        metavar="N",
        help="sequences decoded together (default: %(default)s)",
    )
    group.add_argument(
        "--max-queue",
        type=at_least(0),
        default=DEFAULTS.max_queue,
        metavar="N",
        help="requests waiting for a batch slot; past that: 429 (default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=at_least(1),
        default=DEFAULTS.threads,
        metavar="N",
        help="torch threads on the CPU (default: the batching engine times cores - 1 against every core and keeps "
        "the faster; the plain path uses cores - 1)",
    )
    group.add_argument(
        "--prefix-cache-mib",
        type=at_least(0),
        default=DEFAULTS.prefix_cache_mib,
        metavar="MIB",
        help="memory for cached prompt prefixes, reused by prompts that begin alike; 0: off (default: %(default)s)",
    )
    group.add_argument(
        "--speculative-tokens",
        type=at_least(0),
        default=DEFAULTS.speculative_tokens,
        metavar="K",
        help="tokens each request guesses ahead from its own prompt and output (prompt lookup), checked in the "
        f"decoding step; the output is unchanged; 0: off (default: {SPECULATIVE_TOKENS})",
    )
    group.add_argument(
        "--no-pack-weights",
        action="store_false",
        dest="pack_weights",
        default=DEFAULTS.pack_weights,
        help="on the CPU, multiply float weights with torch's own linear layers (and keep transformers' norms and "
        "attention) instead of prepacked weights (our kernels where they build, else oneDNN's)",
    )
    group.add_argument(
        "--quantize",
        type=str.lower,
        choices=QUANTIZE_CHOICES,
        default=DEFAULTS.quantize,
        help="linear layers in int8 (8-bit dynamic inputs) or int4 (4-bit weights, its output projection in int8), "
        "CPU only; default: a quantized GGUF file on the CPU as int4 if it holds 4-bit blocks and our kernels build "
        "here, else as int8, unless --dtype is given; else none",
    )


def _logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=DEFAULTS.log_level
    )
    group.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default=DEFAULTS.log_format,
        help="(default: JSON when not a TTY)",
    )
    group.add_argument(
        "--no-log-content",
        action="store_false",
        dest="log_content",
        default=DEFAULTS.log_content,
        help="keep prompts, token ids and texts out of the logs",
    )


def _operations_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operations")
    group.add_argument("--host", default=DEFAULTS.host, help="address to bind (default: %(default)s)")
    group.add_argument("--port", type=int, default=DEFAULTS.port, help="port to bind (default: %(default)s)")
    group.add_argument(
        "--api-key",
        action="append",
        default=list(DEFAULTS.api_keys),
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize (repeatable; or ${API_KEY_VARIABLE})",
    )
    group.add_argument(
        "--cors-origin",
        action="append",
        default=list(DEFAULTS.cors_origins),
        metavar="ORIGIN",
        help="allow browsers from ORIGIN (repeatable)",
    )
    group.add_argument(
        "--max-body-bytes", type=positive_integer, default=DEFAULTS.max_body_bytes, help="(default: %(default)s)"
    )
    group.add_argument(
        "--request-timeout",
        type=positive_number,
        default=DEFAULTS.request_timeout,
        metavar="SECONDS",
        help="(default: no limit)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=positive_number,
        default=DEFAULTS.shutdown_timeout,
        metavar="SECONDS",
        help="how long requests may finish after SIGTERM/SIGINT (default: %(default)s)",
    )
    group.add_argument(
        "--sse-keepalive",
        type=seconds_or_zero,
        default=DEFAULTS.sse_keepalive or 0,
        metavar="SECONDS",
        help="send an SSE ': ping' comment when a stream has been silent this long; 0: never (default: %(default)s)",
    )
    group.add_argument(
        "--responses-store-size",
        type=at_least(0),
        default=DEFAULTS.responses_store_size,
        metavar="N",
        help="responses kept for previous_response_id and GET /v1/responses/{id}, least recently used evicted; "
        "0 keeps none (default: %(default)s)",
    )


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from the command line, and API keys also from ``HF_OPENAI_SERVER_API_KEY`` (comma-separated)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    environ = os.environ if environ is None else environ
    from_environment = [key.strip() for key in environ.get(API_KEY_VARIABLE, "").split(",") if key.strip()]
    config = ModelsConfig()
    if args["models_config"] is not None:
        try:
            config = read_models_config(args["models_config"])
        except ModelsConfigError as error:
            parser.error(str(error))
    bad = [o for o in config.options if o.dtype not in (None, *DTYPE_CHOICES) or o.device not in (None, *DEVICES)]
    if bad:
        parser.error(f"--models-config [models.{bad[0].name}]: dtype must be one of {DTYPE_CHOICES}, device {DEVICES}")
    models = (*args["model"], *(m for m in config.served if m.name not in {c.name for c in args["model"]}))
    return ServerSettings(
        **{key: value for key, value in args.items() if key not in RENAMED},
        model=models[0].source if models else None,
        models=models,
        model_options=config.options,
        loras=(*args["lora"], *config.loras),
        preload=None if args["preload"] is None else tuple(args["preload"]),
        served_model_names=tuple(dict.fromkeys(args["served_model_name"])),
        stop_sequences=tuple(args["stop_sequences"]),
        api_keys=tuple(dict.fromkeys([*args["api_key"], *from_environment])),
        cors_origins=tuple(args["cors_origin"]),
        sse_keepalive=args["sse_keepalive"] or None,
    )


RENAMED = frozenset(
    {
        "served_model_name",
        "stop_sequences",
        "api_key",
        "cors_origin",
        "sse_keepalive",
        "model",
        "lora",
        "models_config",
        "preload",
    }
)
"""Flags whose value the settings take in another name or shape (a tuple, ``None`` for 0)."""


def named_models(settings: ServerSettings) -> ServerSettings:
    """``settings`` with every model found and named (``ModelNotFoundError``), or ``ValueError`` saying what clashes.

    With ``--models-dir`` and no ``--model``, the directory's models are served, the first in name order first.
    """
    choices = list(settings.models)
    if not choices and settings.models_dir is not None:
        choices = [
            ModelChoice(name=label, source=str(path)) for label, path in model_files(settings.models_dir).items()
        ]
        if not choices:
            msg = f"no models in {settings.models_dir}: put model directories (with config.json) or .gguf files there"
            raise ValueError(msg)
    choices = choices or [ModelChoice()]
    named = [attrs.evolve(c, name=c.name or resolve_model(c.source).model_id) for c in choices]
    for choice in named[1:]:
        resolve_model(choice.source)
    named[0] = attrs.evolve(named[0], name=(*settings.served_model_names, named[0].name)[0])
    names = [n.name for n in named] + [lora.name for lora in settings.loras]
    clashes = sorted({n for n in names if names.count(n) > 1 and n is not None})
    if clashes:
        msg = f"these names are given to more than one model or adapter: {', '.join(clashes)}"
        raise ValueError(msg)
    unknown = sorted(set(settings.preload or ()) - set(names) - set(settings.served_model_names))
    if unknown:
        msg = f"--preload names no served model: {', '.join(unknown)}"
        raise ValueError(msg)
    return attrs.evolve(settings, models=tuple(named), model=named[0].source)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; exit non-zero when the model cannot be found or loaded."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, log_format=settings.log_format)
    log = structlog.get_logger("entrypoints.http")
    try:
        settings = named_models(settings)
    except (ModelNotFoundError, ValueError) as error:
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
    served = [choice.name for choice in settings.models]
    log.info("server.starting", url=f"http://{host}:{settings.port}/v1", models=served)
    warn_if_exposed(settings)
    server.run()
    if failures:
        print(f"error: {failures[0]}", file=sys.stderr)  # noqa: T201  the one line the user reads
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
