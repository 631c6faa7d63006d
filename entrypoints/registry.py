"""The served models by name: loaded on first use, unloaded when idle or to stay within the memory budget.

Each model has its own services (engine, queue, prefix cache); a LoRA adapter is a further name on top of its base
model's services. Loading runs on a worker thread, so the event loop keeps serving the other models meanwhile; a
request for a model being loaded waits for it. Everything else here runs on the event loop, so that checking and
changing what is loaded happen without another task in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import structlog

from domain.errors import InvalidRequestError, ModelNotReadyError, UnknownModelError
from entrypoints.bootstrap import AdapterSource, Services, adapter_services
from entrypoints.models_dir import model_files, model_size
from entrypoints.settings import LoraChoice, ModelChoice, ServerSettings

log = structlog.get_logger(__name__)

GIB = 2**30


class ModelBusyError(InvalidRequestError):
    """What was asked cannot be done while requests use the model or adapter (HTTP 400)."""

    code = "model_busy"


@attrs.define(eq=False)
class ModelEntry:
    """One served model: how to load it and, while loaded, its services."""

    names: tuple[str, ...]
    """Its name first, then its aliases."""
    settings: ServerSettings
    pinned: bool = False
    """Preloaded: loaded at start and never unloaded for idleness."""
    services: Services | None = None
    loading: asyncio.Task[Services] | None = None
    failure: str | None = None
    last_used: float = attrs.field(factory=time.monotonic)
    memory_bytes: int = 0
    """Measured at its last load; before that, what its files take on disk."""
    created: int = attrs.field(factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        """The name responses report."""
        return self.names[0]

    @property
    def status(self) -> str:
        """``loaded``, ``loading``, ``failed`` or ``unloaded``."""
        if self.services is not None:
            return "loaded"
        if self.loading is not None:
            return "loading"
        return "failed" if self.failure else "unloaded"

    def idle_since(self) -> float:
        """When it was last used (``time.monotonic``)."""
        in_flight = None if self.services is None else self.services.in_flight
        return max(self.last_used, in_flight.last_active if in_flight is not None else 0.0)


@attrs.define(eq=False)
class AdapterEntry:
    """A LoRA adapter served as its own name on top of a base model."""

    name: str
    path: Path
    base: ModelEntry
    files: AdapterSource
    key: str
    """Unique per load, so a name loaded again never meets what was cached for the old adapter."""
    services: Services | None = None
    """Built over the base model's current services."""


@attrs.define
class ModelRegistry:
    """Every served model and adapter by name, what is loaded, and the budget that bounds it."""

    settings: ServerSettings
    loader: Callable[[ServerSettings], Services]
    read_adapter: Callable[[Path], AdapterSource]
    namer: Callable[[str | None], str]
    on_failure: Callable[[BaseException], None] | None = None
    on_loaded: Callable[[str, float], None] = lambda _name, _seconds: None
    on_unloaded: Callable[[str], None] = lambda _name: None
    models: dict[str, ModelEntry] = attrs.field(init=False, factory=dict)
    """By every name and alias."""
    adapters: dict[str, AdapterEntry] = attrs.field(init=False, factory=dict)
    _serial: Iterator[int] = attrs.field(init=False, factory=itertools.count)
    preloading: bool = attrs.field(init=False, default=True)
    """The server has started and the preloaded models are loading."""

    def __attrs_post_init__(self) -> None:
        preload = self.settings.preload
        for index, choice in enumerate(self.settings.served_models()):
            name = choice.name or self.namer(choice.source)
            aliases = self.settings.served_model_names if index == 0 else ()
            names = tuple(dict.fromkeys((*aliases, name))) if aliases else (name,)
            pinned = index == 0 if preload is None else bool(set(names) & set(preload))
            self.add_model(choice, names, pinned=pinned)
        self.scan()

    # --- names ------------------------------------------------------------------------------------------------

    def add_model(self, choice: ModelChoice, names: tuple[str, ...], *, pinned: bool = False) -> ModelEntry:
        """Serve ``choice`` as ``names`` (not loaded yet)."""
        entry = ModelEntry(names, self.settings.for_model(choice, names), pinned=pinned)
        entry.memory_bytes = model_size(choice.source)
        for name in names:
            self.models.setdefault(name, entry)
        return entry

    def scan(self) -> None:
        """Serve each model of ``--models-dir`` not served yet, and drop unloaded ones whose files went away."""
        directory = self.settings.models_dir
        if directory is None:
            return
        found = model_files(directory)
        for name, path in found.items():
            if name not in self.models:
                self.add_model(ModelChoice(name=name, source=str(path)), (name,))
        for name, entry in list(self.models.items()):
            source = entry.settings.model
            gone = source is not None and Path(source).parent == directory and not Path(source).exists()
            if gone and entry.status == "unloaded":
                del self.models[name]

    @property
    def entries(self) -> list[ModelEntry]:
        """Each served model once, in the order they were added."""
        return list(dict.fromkeys(self.models.values()))

    @property
    def served_names(self) -> list[str]:
        """Every model's name, then every adapter's."""
        return [entry.name for entry in self.entries] + list(self.adapters)

    @property
    def strict(self) -> bool:
        """Whether a request must name a served model: always, unless one model alone is served (the old promise)."""
        return len(self.entries) > 1 or bool(self.adapters) or self.settings.models_dir is not None

    def named(self, name: str) -> ModelEntry | AdapterEntry:
        """What is served as exactly ``name``; ``UnknownModelError`` (404) listing what is served otherwise."""
        if name not in self.models and name not in self.adapters:
            self.scan()
        found = self.adapters.get(name) or self.models.get(name)
        if found is None:
            msg = f"The model '{name}' does not exist. Served: {', '.join(self.served_names)}."
            raise UnknownModelError(msg, param="model")
        return found

    def find(self, name: str | None) -> ModelEntry | AdapterEntry:
        """What ``name`` names; ``UnknownModelError`` (404) listing what is served when nothing does."""
        if name is not None and name in self.adapters:
            return self.adapters[name]
        if name is not None and name not in self.models:
            self.scan()
        if name is not None and name in self.models:
            return self.models[name]
        if not self.strict or name is None:
            return self.entries[0]
        msg = f"The model '{name}' does not exist. Served: {', '.join(self.served_names)}."
        raise UnknownModelError(msg, param="model")

    # --- serving ------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, name: str | None) -> AsyncIterator[Services]:
        """The services for ``name``, loaded if need be, held in use (not unloaded) until the block ends."""
        found = self.find(name)
        entry = found.base if isinstance(found, AdapterEntry) else found
        while True:
            services = await self.ready(entry)
            if isinstance(found, AdapterEntry):
                if self.adapters.get(found.name) is not found:
                    msg = f"The model '{found.name}' does not exist. Served: {', '.join(self.served_names)}."
                    raise UnknownModelError(msg, param="model")
                if found.services is None or found.services.generator is None:
                    found.services = adapter_services(services, found.name, found.key)
                services = found.services
            if entry.services is not None:  # not unloaded while this task waited to resume
                break
        entry.last_used = time.monotonic()
        in_flight = services.in_flight
        with in_flight.hold() if in_flight is not None else contextlib.nullcontext():
            yield services

    async def ready(self, entry: ModelEntry) -> Services:
        """``entry``'s services, loading them first (once, however many requests wait for them)."""
        if entry.services is not None:
            return entry.services
        if entry.failure and entry.pinned:
            raise ModelNotReadyError(entry.failure)
        if entry.pinned and self.preloading:  # as the single-model server always did: 503 until it is ready
            msg = f"the model {entry.name} is still loading; retry shortly"
            raise ModelNotReadyError(msg)
        if entry.loading is None:
            entry.loading = asyncio.create_task(self.load(entry))
        return await asyncio.shield(entry.loading)

    async def load(self, entry: ModelEntry) -> Services:
        """Load ``entry`` on a worker thread, within the budget, with its adapters; use `ready` to share the load."""
        await self.make_room(entry)
        log.info("model.load.queued", model=entry.name, loaded=[e.name for e in self.loaded()])
        started = time.perf_counter()
        try:
            services = await asyncio.to_thread(self.loader, entry.settings)
        except Exception as error:
            entry.loading = None
            entry.failure = f"the model {entry.name} failed to load: {error}"
            log.exception("model.load.failed", model=entry.name)
            if entry.pinned and self.on_failure is not None:
                self.on_failure(error)
            raise ModelNotReadyError(entry.failure) from error
        try:  # before the services are published: a request for an adapter must never find it half attached
            await self._attach_adapters(entry, services)
        finally:
            entry.loading = None
            entry.failure, entry.services = None, services
        entry.memory_bytes = services.memory_bytes or entry.memory_bytes
        entry.last_used = time.monotonic()
        seconds = time.perf_counter() - started
        self.on_loaded(entry.name, seconds)
        log.info("model.ready", model=entry.name, seconds=round(seconds, 2), memory_mib=entry.memory_bytes // 2**20)
        await self.make_room(entry)
        return services

    def loaded(self) -> list[ModelEntry]:
        """The models in memory now."""
        return [entry for entry in self.entries if entry.services is not None]

    def over_budget(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` and the other loaded models go past ``--max-loaded-models`` or ``--max-model-memory``."""
        others = [e for e in self.entries if e is not entry and (e.services is not None or e.loading is not None)]
        return over_budget(self.settings, others, entry)

    async def make_room(self, entry: ModelEntry) -> None:
        """Unload the least recently used idle models until ``entry`` fits the budget (or none is idle)."""
        while self.over_budget(entry):
            idle = [e for e in self.loaded() if e is not entry and not self.busy(e)]
            if not idle:
                log.warning("models.over_budget", model=entry.name, busy=[e.name for e in self.loaded()])
                return
            await self.unload(min(idle, key=ModelEntry.idle_since), reason="budget")

    async def unload(self, entry: ModelEntry, *, reason: str) -> None:
        """Drop ``entry``'s services (its requests, if any, fail) and free its memory."""
        services, entry.services = entry.services, None
        if services is None:
            return
        for adapter in self.adapters.values():
            if adapter.base is entry:
                adapter.services = None
        started = time.perf_counter()
        await asyncio.to_thread(services.close)
        seconds = round(time.perf_counter() - started, 2)
        log.info("model.unloaded", model=entry.name, reason=reason, seconds=seconds)
        self.on_unloaded(entry.name)

    def busy(self, entry: ModelEntry) -> bool:
        """Whether a request uses ``entry`` or one of its adapters now."""
        adapters = [a.services for a in self.adapters.values() if a.base is entry and a.services is not None]
        return any(s.busy for s in [entry.services, *adapters] if s is not None)

    # --- adapters -----------------------------------------------------------------------------------------------

    async def add_adapter(self, choice: LoraChoice) -> AdapterEntry:
        """Serve the adapter at ``choice.path`` as ``choice.name``; attached at once when its base is loaded."""
        if not choice.name.strip():
            raise InvalidRequestError("`lora_name` must not be empty.", param="lora_name")
        if choice.name in self.models or choice.name in self.adapters:
            msg = f"The name '{choice.name}' is already served; unload it first or choose another."
            raise InvalidRequestError(msg, param="lora_name")
        files = await asyncio.to_thread(self.read_adapter, choice.path)
        base = self._base_of(choice, files)
        adapter = AdapterEntry(choice.name, choice.path, base, files, f"{choice.name}#{next(self._serial)}")
        if base.loading is not None:  # that load attaches only the adapters served when it began: wait, then attach
            with contextlib.suppress(ModelNotReadyError):
                await asyncio.shield(base.loading)
        if base.services is not None:
            await self._attach(base.services, adapter)
        if choice.name in self.adapters:  # loaded twice at once: the first one stays
            msg = f"The name '{choice.name}' is already served; unload it first or choose another."
            raise InvalidRequestError(msg, param="lora_name")
        self.adapters[choice.name] = adapter
        log.info("lora.added", adapter=choice.name, base=base.name, path=str(choice.path))
        return adapter

    async def remove_adapter(self, name: str) -> None:
        """Stop serving the adapter ``name``; refused while requests use it."""
        adapter = self.adapters.get(name)
        if adapter is None:
            msg = f"The LoRA adapter '{name}' is not loaded. Loaded: {', '.join(self.adapters) or 'none'}."
            raise UnknownModelError(msg, param="lora_name")
        if adapter.services is not None and adapter.services.busy:
            msg = f"The LoRA adapter '{name}' is serving requests; unload it once they end."
            raise ModelBusyError(msg, param="lora_name")
        del self.adapters[name]
        host = adapter.base.services.adapters if adapter.base.services is not None else None
        if host is not None:
            await asyncio.to_thread(host.detach, adapter.key)
        log.info("lora.removed", adapter=name)

    def _base_of(self, choice: LoraChoice, files: AdapterSource) -> ModelEntry:
        wanted = choice.base or files.base_model
        if wanted is not None:
            for entry in self.entries:
                source = entry.settings.model
                if wanted in entry.names or (source is not None and wanted in {source, Path(source).name}):
                    return entry
            if choice.base is not None:
                msg = f"The base model '{choice.base}' of the LoRA adapter '{choice.name}' is not served."
                raise InvalidRequestError(msg, param="lora_name")
        return self.entries[0]

    async def _attach(self, services: Services, adapter: AdapterEntry) -> None:
        if services.adapters is None:
            msg = f"The model {adapter.base.name} does not take LoRA adapters."
            raise InvalidRequestError(msg, param="lora_path")
        await asyncio.to_thread(services.adapters.attach, adapter.key, adapter.files)

    async def _attach_adapters(self, entry: ModelEntry, services: Services) -> None:
        for adapter in [a for a in self.adapters.values() if a.base is entry]:
            try:
                await self._attach(services, adapter)
            except InvalidRequestError as error:
                log.error("lora.dropped", adapter=adapter.name, error=error.message)  # noqa: TRY400  no traceback
                self.adapters.pop(adapter.name, None)


def over_budget(settings: ServerSettings, others: list[ModelEntry], entry: ModelEntry) -> bool:
    """Whether ``entry`` beside ``others`` (loaded or loading) goes past the number or memory budget."""
    limit = settings.max_loaded_models
    if limit is not None and len(others) + 1 > limit:
        return True
    memory = settings.max_model_memory_gib
    held = sum(e.memory_bytes for e in others) + entry.memory_bytes
    return memory is not None and held > memory * GIB


@attrs.define
class RegistryLife:
    """The registry over the server's life: preloading at start, idle unloading meanwhile, closing at the end."""

    registry: ModelRegistry

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:  # noqa: ANN401  the Litestar app
        """Preload, watch for idle models while the server runs, and unload everything at the end."""
        tasks = [asyncio.create_task(self._start())]
        if self.registry.settings.model_idle_timeout is not None:
            tasks.append(asyncio.create_task(self._sweep(self.registry.settings.model_idle_timeout)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for entry in self.registry.entries:
                if entry.loading is not None:
                    entry.loading.cancel()
                if entry.services is not None:
                    entry.services.close()
                entry.services = None

    async def _start(self) -> None:
        try:
            for choice in self.registry.settings.loras:
                await self.registry.add_adapter(choice)
        except Exception as error:
            log.exception("lora.load.failed")
            if self.registry.on_failure is not None:
                self.registry.on_failure(error)
            return
        pinned = [e for e in self.registry.entries if e.pinned and e.services is None]
        for entry in pinned:
            entry.loading = asyncio.create_task(self.registry.load(entry))
        for entry in pinned:
            if entry.loading is not None:
                with contextlib.suppress(ModelNotReadyError):
                    await asyncio.shield(entry.loading)
        self.registry.preloading = False

    async def _sweep(self, idle_seconds: float) -> None:
        while True:
            await asyncio.sleep(min(max(idle_seconds / 4, 0.05), 5.0))
            await self.unload_idle(time.monotonic())

    async def unload_idle(self, now: float) -> None:
        """Unload what has been idle past ``--model-idle-timeout`` (preloaded models stay)."""
        timeout = self.registry.settings.model_idle_timeout
        if timeout is None:
            return
        for entry in self.registry.loaded():
            if not entry.pinned and not self.registry.busy(entry) and now - entry.idle_since() > timeout:
                await self.registry.unload(entry, reason="idle")


__all__ = ["AdapterEntry", "ModelBusyError", "ModelEntry", "ModelRegistry", "RegistryLife", "over_budget"]
