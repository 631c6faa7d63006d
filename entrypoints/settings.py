"""Server settings, parsed once from the command line and handed to the composition root."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Everything the server is configured with; see ``python -m entrypoints.http --help``."""

    model: str | None = None
    """Hub id in the local cache, local directory, or ``.gguf`` file; ``None`` serves the embedded SmolLM2."""
    served_model_names: tuple[str, ...] = ()
    """Names clients may use for the model (``--served-model-name``); the first is the id responses report."""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str | None = None
    max_batch_size: int = 8
    """Sequences decoded together, one token each per step (continuous batching)."""
    max_queue: int = 64
    """Requests waiting for a batch slot; past that a request is refused with 429."""
    threads: int | None = None
    """Torch intra-op threads on the CPU; ``None``: tuned by the batching engine (cores - 1 on the plain path)."""
    prefix_cache_mib: int = 256
    """Memory for the keys and values of prompt blocks reused by later prompts (0 turns prefix caching off)."""
    speculative_tokens: int = 4
    """Prompt-lookup draft tokens a row guesses ahead per decoding step, verified in the same pass (0: off)."""
    pack_weights: bool = True
    """On the CPU, reorder linear weights once for oneDNN's kernels (see ``adapters.huggingface.packing``)."""
    chat_template: Path | None = None
    stop_sequences: tuple[str, ...] = ()
    log_level: str = "INFO"
    log_format: str = "auto"
    log_content: bool = True
    cache_dir: Path | None = None
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    """Bearer keys that open ``/v1``, ``/tokenize`` and ``/detokenize``; none leaves them open."""
    cors_origins: tuple[str, ...] = ()
    """Origins browsers may call from; none turns CORS off."""
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float | None = None
    """Seconds a request may run before its generation is stopped; ``None`` for no limit."""
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT."""
    sse_keepalive: float | None = 10.0
    """Seconds a stream may stay silent (a long prefill) before it sends an SSE comment; ``None``: never."""
    responses_store_size: int = 1000
    """Responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}``; the least recently used go first."""
