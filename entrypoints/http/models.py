"""``/v1/models`` (every served model and adapter, loaded or not) and vLLM's LoRA load/unload endpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from litestar import Controller, Request, get, post
from litestar.response import Response

from entrypoints.http.controllers import read_body
from entrypoints.http.openai_bodies import ModelCard, ModelList
from entrypoints.http.openapi import body_operation
from entrypoints.registry import AdapterEntry, ModelEntry, ModelRegistry
from entrypoints.settings import LoraChoice


def model_card(found: ModelEntry | AdapterEntry, name: str | None = None) -> ModelCard:
    """What ``/v1/models`` says of a model or adapter: its name, whether it is loaded, an adapter's base."""
    entry = found.base if isinstance(found, AdapterEntry) else found
    status = entry.status
    if isinstance(found, AdapterEntry):
        return ModelCard(found.name, entry.created, status=status, loaded=status == "loaded", parent=entry.name)
    return ModelCard(name or entry.name, entry.created, status=status, loaded=status == "loaded")


class ModelsController(Controller):
    """``/v1/models``: https://platform.openai.com/docs/api-reference/models."""

    path = "/v1/models"
    tags = ["Models"]  # noqa: RUF012  Litestar reads it from the class

    @get(operation_id="listModels", summary="List the served models")
    async def list_models(self, registry: ModelRegistry) -> ModelList:
        """Every served model (loaded or not, first the default) and every LoRA adapter."""
        registry.scan()
        cards = [model_card(entry) for entry in registry.entries]
        return ModelList(cards + [model_card(adapter) for adapter in registry.adapters.values()])

    @get("/{model:path}", operation_id="retrieveModel", summary="Retrieve a served model")
    async def retrieve_model(self, model: str, registry: ModelRegistry) -> ModelCard:
        """The model or adapter named ``model`` (a name or ``--served-model-name`` alias); else a 404."""
        name = model.lstrip("/")
        return model_card(registry.named(name), name)


@attrs.frozen
class LoadLoraRequest:
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str


@attrs.frozen
class UnloadLoraRequest:
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str


class LoraController(Controller):
    """LoRA adapters loaded and unloaded at run time, as vLLM's ``/v1/load_lora_adapter`` does (behind the key)."""

    path = "/v1"
    tags = ["Models"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        "/load_lora_adapter",
        operation_id="loadLoraAdapter",
        summary="Serve a LoRA adapter",
        status_code=200,
        operation_class=body_operation(LoadLoraRequest),
    )
    async def load(self, request: Request[Any, Any, Any], registry: ModelRegistry) -> Response[str]:
        """Serve the PEFT adapter at ``lora_path`` as the model ``lora_name``, on top of its base model."""
        body = await read_body(request, LoadLoraRequest)
        adapter = await registry.add_adapter(LoraChoice(name=body.lora_name, path=Path(body.lora_path)))
        return Response(f"Success: LoRA adapter '{adapter.name}' added successfully.", media_type="text/plain")

    @post(
        "/unload_lora_adapter",
        operation_id="unloadLoraAdapter",
        summary="Stop serving a LoRA adapter",
        status_code=200,
        operation_class=body_operation(UnloadLoraRequest),
    )
    async def unload(self, request: Request[Any, Any, Any], registry: ModelRegistry) -> Response[str]:
        """Stop serving the adapter ``lora_name`` (refused while requests use it)."""
        body = await read_body(request, UnloadLoraRequest)
        await registry.remove_adapter(body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")
