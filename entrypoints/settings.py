"""Server settings, parsed once from the command line and handed to the composition root."""

from __future__ import annotations

from pathlib import Path

import attrs

SPECULATIVE_TOKENS = 4
"""Draft tokens per row when ``--speculative-tokens`` is not given."""


@attrs.frozen(kw_only=True)
class ModelChoice:
    """One model to serve (``--model [NAME=]PATH``, ``--models-dir``, ``--models-config``) and what differs for it.

    ``None`` options take the server's; ``name`` ``None`` is the model's own name.
    """

    name: str | None = None
    source: str | None = None
    """Hub id in the local cache, local directory, or ``.gguf`` file; ``None``: the embedded SmolLM2."""
    chat_template: Path | None = None
    stop_sequences: tuple[str, ...] | None = None
    dtype: str | None = None
    device: str | None = None


@attrs.frozen(kw_only=True)
class LoraChoice:
    """A PEFT LoRA adapter served as ``name`` on ``base`` (``None``: the model its config names, else the first)."""

    name: str
    path: Path
    base: str | None = None


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Everything the server is configured with; see ``python -m entrypoints.http --help``."""

    model: str | None = None
    """Hub id in the local cache, local directory, or ``.gguf`` file; ``None`` serves the embedded SmolLM2.

    The model one set of settings loads: the server's first model, or (`for_model`) the model at hand.
    """
    models: tuple[ModelChoice, ...] = ()
    """Every model served, first one first; none: ``model`` alone."""
    model_options: tuple[ModelChoice, ...] = ()
    """Per-model options (``--models-config``) for models named elsewhere (``--models-dir``), by name."""
    models_dir: Path | None = None
    """Every model directory or ``.gguf`` file in it is served under its own name (scanned again on lookups)."""
    loras: tuple[LoraChoice, ...] = ()
    max_loaded_models: int | None = None
    """Models held in memory at once; loading another unloads the least recently used idle one."""
    max_model_memory_gib: float | None = None
    """Memory the loaded models' weights may take together, in GiB; the least recently used idle ones go first."""
    model_idle_timeout: float | None = None
    """Seconds a model may stay unused before it is unloaded (preloaded ones stay); ``None``: never."""
    preload: tuple[str, ...] | None = None
    """Models loaded at start (and never unloaded for idleness); ``None``: the first model."""
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
    speculative_tokens: int = SPECULATIVE_TOKENS
    """Prompt-lookup draft tokens a row guesses ahead per decoding step, verified in the same pass (0: off).

    A verifying pass computes each position as a one-token step would, bit for bit, with float, int8 and int4
    weights alike (`adapters.huggingface.engine.attention`), so the output is the one without speculation.
    """
    pack_weights: bool = True
    """On the CPU, reorder float linear weights once for our kernels where they build, else oneDNN's (see
    ``adapters.huggingface.packing``); off keeps torch's layers and transformers' norms and attention."""
    quantize: str | None = None
    """``none``, ``int8`` or ``int4`` linear layers; ``None``: a quantized GGUF on the CPU at its width (int4 or int8,
    `resolve_quantization`), else none."""
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

    def served_models(self) -> tuple[ModelChoice, ...]:
        """The models named on the command line or in the config file, first one first (the default: one)."""
        return self.models or (ModelChoice(source=self.model),)

    def for_model(self, choice: ModelChoice, names: tuple[str, ...]) -> ServerSettings:
        """The settings that load ``choice`` and serve it as ``names``, its own options over the server's."""
        options = next((o for o in self.model_options if o.name == names[0]), ModelChoice())
        return attrs.evolve(
            self,
            model=choice.source,
            served_model_names=names,
            chat_template=choice.chat_template or options.chat_template or self.chat_template,
            stop_sequences=_first(choice.stop_sequences, options.stop_sequences, self.stop_sequences),
            dtype=choice.dtype or options.dtype or self.dtype,
            device=choice.device or options.device or self.device,
        )


def _first(*candidates: tuple[str, ...] | None) -> tuple[str, ...]:
    return next((c for c in candidates if c is not None), ())
