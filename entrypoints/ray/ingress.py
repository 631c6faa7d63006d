"""The ingress deployment: the server's own Litestar app, with the engine behind a handle to the replicas."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from litestar import Litestar
from ray import serve
from ray.serve.handle import DeploymentHandle

from adapters.huggingface.constraints import GrammarCompiler
from adapters.huggingface.model_facts import TokenizerText
from adapters.ray.board import board_for
from adapters.ray.handle_generator import HandleGenerator
from adapters.ray.replica import EngineFacts
from adapters.ray.serve_client import ServeReplicaClient
from entrypoints.bootstrap import Services, TokenizerTemplate, build_services
from entrypoints.http.app import create_app
from entrypoints.http.lifecycle import Drain
from entrypoints.http.metrics import PREFIX, Metrics
from entrypoints.logs import configure_logging
from entrypoints.ray.metrics import ReplicaCollector
from entrypoints.settings import ServerSettings

DRAIN_POLL = 0.1
"""Seconds between looks at the requests still in flight while draining."""


def load_remote_services(handle: DeploymentHandle[Any], settings: ServerSettings) -> Services:
    """Wait for an engine replica (slow: it loads the model; call it off the event loop), then build the services.

    The replica sends its tokenizer, so the ingress tokenizes, templates and checks grammars without the model.
    """
    answer = handle.facts.remote().result()
    facts = EngineFacts.from_wire(answer["facts"])
    tokenizer = answer["tokenizer"]
    generator = HandleGenerator(ServeReplicaClient(handle), TokenizerText(tokenizer), facts)
    template = TokenizerTemplate(facts.chat_template, facts.bos_token, facts.eos_token)
    grammars = GrammarCompiler(tokenizer, facts.vocab_size, facts.eos_token_ids)
    return build_services(settings, generator, template, constraints=grammars)


@serve.ingress()
class Ingress:
    """Serves the API; generation, scoring and model facts go to the engine deployment through ``engine``."""

    def __init__(self, engine: DeploymentHandle[Any], settings: ServerSettings, engine_name: str) -> None:
        configure_logging(settings.log_level, log_format="json")
        self.engine = engine
        self.settings = settings
        self.board = board_for(engine_name)
        self.metrics = Metrics.create(draft_tokens=self.board.draft_tokens)
        self.metrics.registry.register(ReplicaCollector(self.board))
        self.drain_state = Drain(grace=settings.shutdown_timeout)

    def __serve_build_asgi_app__(self) -> Litestar:
        """The single server's app, built in the ingress replica (Ray's late-bound ASGI app hook)."""
        return create_app(
            self.settings,
            loader=functools.partial(load_remote_services, self.engine),
            drain=self.drain_state,
            metrics=self.metrics,
            ready=self.board.ready,
        )

    async def drain(self) -> int:
        """Refuse new work, give in-flight requests the grace period, end the rest with an error; how many were left.

        The entrypoint calls it on SIGTERM before it shuts Serve down, so requests end as they do on the single server.
        """
        self.drain_state.begin()
        deadline = time.monotonic() + self.drain_state.grace + 1
        while (left := self.in_flight()) and time.monotonic() < deadline:  # noqa: ASYNC110  gauges have no event
            await asyncio.sleep(DRAIN_POLL)
        return left

    def in_flight(self) -> int:
        """Generation requests accepted and not yet answered."""
        samples = (
            self.metrics.registry.get_sample_value(f"{PREFIX}_requests_{kind}") for kind in ("running", "waiting")
        )
        return int(sum(value or 0 for value in samples))
