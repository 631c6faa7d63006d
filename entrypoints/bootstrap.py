"""The composition root: the one place that builds adapters from settings and hands them to the use cases."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from adapters.jinja_renderer import JinjaTemplateRenderer
from adapters.stop_sequences import StopSequences
from application.chat import ChatService
from application.completion import CompletionService
from application.generation import TextGeneration
from application.tokenization import TokenizationService
from domain.errors import UnknownModelError
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
    draft_tokens: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """Speculative decoding's draft tokens so far: (proposed, accepted)."""

    def check_model(self, name: str) -> None:
        """Raise ``UnknownModelError`` (a 404) unless ``name`` is one of the model's names."""
        if name in (self.model_id, *self.aliases):
            return
        msg = f"The model '{name}' does not exist."
        raise UnknownModelError(msg, param="model")


def build_services(
    settings: ServerSettings,
    generator: Generator,
    tokenizer: TokenizerTemplate | None = None,
    close: Callable[[], None] = lambda: None,
    constraints: ConstraintChecker | None = None,
    *,
    draft_tokens: Callable[[], tuple[int, int]] = lambda: (0, 0),
) -> Services:
    """Wire the use cases around ``generator``; the chat template follows the ``--chat-template`` priority.

    ``constraints`` checks ``response_format`` schemas and forced tool calls before generation starts;
    ``draft_tokens`` counts the speculative draft tokens the generator proposed and accepted.
    """
    tokenizer = tokenizer or TokenizerTemplate()
    override = settings.chat_template.read_text(encoding="utf-8") if settings.chat_template else None
    renderer = JinjaTemplateRenderer.choose(
        override=override,
        tokenizer_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
    )
    generation = TextGeneration(
        generator=generator,
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
        tokenization=TokenizationService(generator=generator, renderer=renderer),
        close=close,
        draft_tokens=draft_tokens,
    )


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
    engine = load_engine(settings)
    facts = engine.generator.facts
    template = TokenizerTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
    return build_services(
        settings,
        engine.generator,
        template,
        close=engine.generator.close,
        constraints=engine.plain.grammars,
        draft_tokens=engine.generator.drafts.totals,
    )
