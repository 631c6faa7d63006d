"""What runs in an engine replica's process: the configured model loaded into an ``EngineReplica``."""

from __future__ import annotations

from adapters.ray.replica import EngineFacts, EngineReplica
from entrypoints.bootstrap import load_engine
from entrypoints.logs import configure_logging
from entrypoints.settings import ServerSettings


def build_engine_replica(settings: ServerSettings) -> EngineReplica:
    """Load the model as the single server does (batching engine, prefix cache) and wrap it for Serve."""
    configure_logging(settings.log_level, log_format="json")
    engine = load_engine(settings)
    model = engine.generator.facts
    facts = EngineFacts(
        model_id=model.model_id,
        context_length=model.context_length,
        vocab_size=model.vocab_size,
        chat_template=model.chat_template,
        bos_token=model.bos_token,
        eos_token=model.eos_token,
        eos_token_ids=model.eos_token_ids,
    )
    prefixes = engine.generator.prefixes
    return EngineReplica(
        engine.generator,
        facts,
        tokenizer=model.tokenizer,
        cache_bytes=(lambda: prefixes.held_bytes) if prefixes is not None else (lambda: 0),
        close=engine.generator.close,
        draft_tokens=engine.generator.drafts.totals,
    )
