"""The composition root: the one place that builds adapters from settings and hands them to the use cases."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from adapters.jinja_renderer import JinjaTemplateRenderer
from adapters.stop_sequences import StopSequences
from application.chat import ChatService
from application.completion import CompletionService
from application.generation import TextGeneration
from application.in_flight import InFlight
from application.tokenization import TokenizationService
from domain.ports import ConstraintChecker, Generator
from entrypoints.settings import ServerSettings

if TYPE_CHECKING:
    from adapters.huggingface.engine import BatchingGenerator
    from adapters.huggingface.generator import HuggingFaceGenerator


@attrs.frozen
class TokenizerTemplate:
    """What a tokenizer brings for chat templating."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


class AdapterHost(Protocol):
    """Where a loaded model takes LoRA adapters (``LoraAdapters``): attached under a key, run by row."""

    def attach(self, key: str, adapter: Any) -> None:  # noqa: ANN401  the host's own adapter type
        """Apply ``adapter`` to the model under ``key``; ``InvalidRequestError`` when it does not fit."""
        ...

    def detach(self, key: str) -> None:
        """Remove the adapter ``key`` from the model."""
        ...


class AdapterSource(Protocol):
    """A LoRA adapter read from disk (``AdapterFiles``)."""

    @property
    def base_model(self) -> str | None:
        """The model it was trained on, as its config names it."""
        ...


@attrs.frozen
class Services:
    """The use cases, ready to serve, and the facts the HTTP layer reports about the model."""

    model_id: str
    created: int
    chat: ChatService
    completion: CompletionService
    tokenization: TokenizationService
    close: Callable[[], None] = lambda: None
    """Releases what the services hold (the generator's worker thread)."""
    aliases: tuple[str, ...] = ()
    """Every name the model answers to (``model_id`` first)."""
    in_flight: InFlight | None = None
    """The generator the use cases call, which counts the requests it serves (``None`` only in hand-made ones)."""
    generator: Generator | None = None
    """The generator itself, which adapters' services wrap."""
    template: TokenizerTemplate = attrs.field(factory=TokenizerTemplate)
    constraints: ConstraintChecker | None = None
    adapters: AdapterHost | None = None
    """Where LoRA adapters attach (``None``: the model takes none)."""
    memory_bytes: int = 0
    """What the model's weights take in memory (0: not known)."""
    settings: ServerSettings | None = None
    draft_tokens: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """Speculative decoding's draft tokens so far: (proposed, accepted)."""

    @property
    def busy(self) -> bool:
        """Whether a request uses the model now."""
        return self.in_flight is not None and self.in_flight.running > 0


def build_services(
    settings: ServerSettings,
    generator: Generator,
    tokenizer: TokenizerTemplate | None = None,
    close: Callable[[], None] = lambda: None,
    constraints: ConstraintChecker | None = None,
    *,
    adapters: AdapterHost | None = None,
    memory_bytes: int = 0,
    draft_tokens: Callable[[], tuple[int, int]] = lambda: (0, 0),
) -> Services:
    """Wire the use cases around ``generator``; the chat template follows the ``--chat-template`` priority.

    ``constraints`` checks ``response_format`` schemas and forced tool calls before generation starts. The use
    cases reach the generator through an ``InFlight`` count, which tells whether the model is in use.
    ``draft_tokens`` counts the speculative draft tokens the generator proposed and accepted.
    """
    tracked = InFlight(generator)
    tokenizer = tokenizer or TokenizerTemplate()
    override = settings.chat_template.read_text(encoding="utf-8") if settings.chat_template else None
    renderer = JinjaTemplateRenderer.choose(
        override=override,
        tokenizer_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )
    generation = TextGeneration(
        generator=tracked,
        stop_policy=StopSequences(settings.stop_sequences),
        log_content=settings.log_content,
        constraints=constraints,
    )
    names = settings.served_model_names or (generator.model_id,)
    return Services(
        model_id=names[0],
        aliases=names,
        created=int(time.time()),
        chat=ChatService(renderer=renderer, generation=generation),
        completion=CompletionService(generation=generation),
        tokenization=TokenizationService(generator=tracked, renderer=renderer),
        close=close,
        in_flight=tracked,
        generator=generator,
        template=tokenizer,
        constraints=constraints,
        adapters=adapters,
        memory_bytes=memory_bytes,
        settings=settings,
        draft_tokens=draft_tokens,
    )


def adapter_services(base: Services, name: str, key: str) -> Services:
    """The use cases for the LoRA adapter attached to ``base``'s model under ``key``, served as ``name``."""
    from adapters.huggingface.lora import AdapterGenerator  # noqa: PLC0415  torch loads only when serving

    if base.generator is None or base.settings is None:
        msg = "these services were not built by build_services"
        raise ValueError(msg)
    generator = AdapterGenerator(base.generator, key, name)  # type: ignore[arg-type]  # a HuggingFace generator
    settings = attrs.evolve(base.settings, served_model_names=(name,))
    return build_services(settings, generator, base.template, constraints=base.constraints)


def read_adapter(path: Path) -> AdapterSource:
    """Read a PEFT LoRA adapter directory (slow-ish: call it off the event loop); 400 when it is not one."""
    from adapters.huggingface.lora import AdapterFiles  # noqa: PLC0415  torch loads only when serving

    return AdapterFiles.read(path)


def model_name(source: str | None) -> str:
    """The name a model is served under by default: its own (the directory's, the hub id, the GGUF file's)."""
    from adapters.huggingface.loading import DEFAULT_MODEL_ID, ModelNotFoundError, resolve_model  # noqa: PLC0415

    try:
        return resolve_model(source).model_id
    except ModelNotFoundError:
        return DEFAULT_MODEL_ID if source is None else Path(source).name or source


@attrs.frozen
class LoadedEngine:
    """The configured model in its batching engine, and the plain generator beside it (grammars, facts)."""

    generator: BatchingGenerator
    plain: HuggingFaceGenerator


def load_engine(settings: ServerSettings) -> LoadedEngine:
    """Load the configured HuggingFace model into a continuously batched engine (slow: call it off the event loop).

    Requests decode together in the engine; those that cannot share a batch take the plain path.
    """
    from adapters.huggingface.engine import (  # noqa: PLC0415  torch loads only when serving
        BatchingGenerator,
        BatchLimits,
        Speculation,
    )
    from adapters.huggingface.generator import HuggingFaceGenerator  # noqa: PLC0415
    from adapters.huggingface.loading import load_model  # noqa: PLC0415
    from adapters.huggingface.prefix_cache import PrefixCache  # noqa: PLC0415
    from adapters.huggingface.threads import ThreadTuner, configure_threads  # noqa: PLC0415

    loaded = load_model(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        pack_weights=settings.pack_weights,
        quantize=settings.quantize,
    )
    threads = configure_threads(settings.threads, device=loaded.model.device)
    plain = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id, threads=threads)
    generator = BatchingGenerator(
        plain,
        BatchLimits(settings.max_batch_size, settings.max_queue),
        threads=None if threads is None else ThreadTuner.for_cpu(settings.threads),
        prefixes=PrefixCache(settings.prefix_cache_mib * 2**20) if settings.prefix_cache_mib else None,
        speculation=Speculation(settings.speculative_tokens),
    )
    return LoadedEngine(generator, plain)


def load_services(settings: ServerSettings) -> Services:
    """Load the configured model (slow: call it off the event loop) and build the services around it."""
    from adapters.huggingface.lora import LoraAdapters  # noqa: PLC0415  torch loads only when serving

    engine = load_engine(settings)
    facts = engine.generator.facts
    template = TokenizerTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
    return build_services(
        settings,
        engine.generator,
        template,
        close=engine.generator.close,
        constraints=engine.plain.grammars,
        adapters=LoraAdapters(engine.plain.model),
        memory_bytes=facts.memory_bytes,
        draft_tokens=engine.generator.drafts.totals,
    )
