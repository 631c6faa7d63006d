"""LoRA adapters applied per row: one base model, any number of PEFT adapters, decoded in one batch.

A PEFT LoRA adapter adds ``(x @ A.T) @ B.T * scale`` to the output of some linear layers. Here each targeted layer
is wrapped once in a `LoraLinear` that holds every loaded adapter's ``A``, ``B`` and scale, and adds, row by row,
the delta of the adapter that row asked for (none for the base model). Which adapter each row of the batch uses is
set around a forward pass with `selecting`, per thread (the engine's and the plain generator's threads run the
same model at once). So requests for different adapters of one base, and for the base itself, share a batch, and
each row's output is that of its adapter alone.

The adapter files are read directly (``adapter_config.json`` and ``adapter_model.safetensors``, PEFT's format),
without wrapping the model in a ``PeftModel``: the wrapper works on top of whatever linear layer the model has,
``nn.Linear`` or the oneDNN-packed `PackedLinear`, so packing and LoRA go together. Adapters that change more than
linear layers (DoRA, embeddings, ``modules_to_save``) are refused with a message.

Adapters are keyed by a ``key`` chosen by the caller (unique per load), so that a name reloaded from another path
never meets keys and values cached for the old one (see `PrefixCache`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import torch
from torch import nn

from adapters.huggingface.packing import PackedLinear, packing_supported
from adapters.huggingface.threads import runs_on_own_thread
from domain.errors import InvalidRequestError
from domain.generation import GeneratedTokens, GenerationParams, TokenLogprob

log = structlog.get_logger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_UNSUPPORTED = ("use_dora", "modules_to_save", "layer_replication")


class AdapterError(InvalidRequestError):
    """An adapter that cannot be read, or does not fit its base model (HTTP 400, naming ``lora_path``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="lora_path")


@attrs.frozen
class LoraWeights:
    """One layer's low-rank update: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    packed: tuple[PackedLinear, PackedLinear] | None = None
    """``A`` and ``B`` prepacked for oneDNN (`packed_for`)."""

    def delta(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(inputs @ A.T) @ B.T * scale``, as PEFT computes it.

        Packed, a row's delta is the same bits alone as among other rows (see `PackedLinear`); MKL's products,
        ``nn.functional.linear``'s, round a row otherwise with as few as one to eight rows beside it.
        """
        if self.packed is not None:
            down, up = self.packed
            delta: torch.Tensor = up(down(inputs)) * self.scale
            return delta
        return nn.functional.linear(nn.functional.linear(inputs, self.a), self.b) * self.scale

    def packed_for(self, base: nn.Module) -> LoraWeights:
        """These weights, prepacked unless ``base`` (the layer they add to) is a plain ``nn.Linear``.

        A plain base is unpacked on purpose (``--no-pack-weights``) or off the CPU; a packed or quantized one is on
        the CPU, where packing the adapter too makes each row's delta independent of the rows beside it.
        """
        if isinstance(base, nn.Linear) or self.a.device.type != "cpu" or not _packable(self.a.dtype):
            return self
        down, up = (
            nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype) for w in (self.a, self.b)
        )
        with torch.no_grad():
            down.weight.copy_(self.a)
            up.weight.copy_(self.b)
        return attrs.evolve(self, packed=(PackedLinear(down, keep_weight=False), PackedLinear(up, keep_weight=False)))


@attrs.frozen
class AdapterFiles:
    """A PEFT LoRA adapter read from disk: each targeted module's weights, by module path in the base model."""

    path: Path
    layers: dict[str, LoraWeights]
    base_model: str | None
    """``base_model_name_or_path`` from its config: which model it was trained on, if it says."""

    @classmethod
    def read(cls, path: Path) -> AdapterFiles:
        """Read and check an adapter directory; ``AdapterError`` says what is wrong with it."""
        config = _read_config(path)
        tensors = _read_tensors(path)
        alphas: dict[str, float] = config.get("alpha_pattern") or {}
        alpha = float(config.get("lora_alpha") or config.get("r") or 8)
        layers: dict[str, LoraWeights] = {}
        for key, a in tensors.items():
            if not key.endswith(_A):
                continue
            module = key.removeprefix(_PREFIX).removesuffix(_A)
            b = tensors.get(key.removesuffix(_A) + _B)
            if b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:  # noqa: PLR2004  matrices
                msg = f"the LoRA adapter at {path} has no matching lora_B for {module}"
                raise AdapterError(msg)
            rank = a.shape[0]
            layer_alpha = next((float(v) for k, v in alphas.items() if module.endswith(k)), alpha)
            scale = layer_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            layers[module] = LoraWeights(a, b, scale)
        if not layers:
            msg = f"the LoRA adapter at {path} holds no lora_A/lora_B weights of linear layers"
            raise AdapterError(msg)
        others = sorted(key for key in tensors if not key.endswith((_A, _B)))
        if others:  # PEFT saves whole embedding layers beside lm_head's adapter; they are the base model's
            log.warning("lora.ignored_tensors", path=str(path), tensors=others[:5], count=len(others))
        base = config.get("base_model_name_or_path")
        return cls(path, layers, base if isinstance(base, str) else None)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        msg = f"no LoRA adapter at {path}: {CONFIG_FILE} is missing"
        raise AdapterError(msg)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        msg = f"cannot read {file}: {error}"
        raise AdapterError(msg) from error
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        msg = f"{file} is not a LoRA adapter's config (peft_type must be LORA)"
        raise AdapterError(msg)
    present = [name for name in _UNSUPPORTED if config.get(name)]
    if present:
        msg = f"the LoRA adapter at {path} uses {', '.join(present)}, which this server does not apply"
        raise AdapterError(msg)
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if file is None:
        msg = f"no LoRA weights at {path}: expected {' or '.join(WEIGHT_FILES)}"
        raise AdapterError(msg)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415  only when an adapter is read

            return dict(load_file(str(file)))
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"cannot read {file}: {error}"
        raise AdapterError(msg) from error
    return {str(key): value for key, value in dict(loaded).items()}


@attrs.frozen
class _Selection:
    """Which adapter each group of rows uses in the current forward pass (``rows`` ``None``: every row)."""

    groups: tuple[tuple[str, torch.Tensor | None], ...]


_packable = functools.cache(packing_supported)
"""Whether oneDNN packs weights of a dtype here (its probe, run once a dtype)."""

_current = threading.local()


def _selection() -> _Selection | None:
    return getattr(_current, "selection", None)


@contextlib.contextmanager
def selecting(adapters: str | Sequence[str | None] | None, device: torch.device | None = None) -> Iterator[None]:
    """Run forward passes on this thread with ``adapters``: one key for every row, or one per row (``None``: base)."""
    if adapters is None or isinstance(adapters, str):
        groups: tuple[tuple[str, torch.Tensor | None], ...] = () if adapters is None else ((adapters, None),)
    elif len(set(adapters)) == 1:
        only = adapters[0] if adapters else None
        groups = () if only is None else ((only, None),)
    else:
        rows: dict[str, list[int]] = {}
        for index, key in enumerate(adapters):
            if key is not None:
                rows.setdefault(key, []).append(index)
        groups = tuple((key, torch.tensor(found, dtype=torch.long, device=device)) for key, found in rows.items())
    previous = _selection()
    _current.selection = _Selection(groups) if groups else None
    try:
        yield
    finally:
        _current.selection = previous


class LoraLinear(nn.Module):
    """A linear layer (``nn.Linear`` or a packed one) plus the deltas of the adapters its rows select."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters: dict[str, LoraWeights] = {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The base layer's output, with each row's adapter delta added."""
        output: torch.Tensor = self.base(inputs)
        selection = _selection()
        if selection is None or not self.adapters:
            return output
        for key, rows in selection.groups:
            weights = self.adapters.get(key)
            if weights is None:
                continue
            if rows is None:
                output = output + weights.delta(inputs)
            else:
                output = output.index_add(0, rows, weights.delta(inputs.index_select(0, rows)))
        return output

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401  whatever the wrapped layer has
        """The wrapped layer's attributes (``weight``, ``in_features``...), for code that reads them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)


@attrs.define
class LoraAdapters:
    """The adapters attached to one loaded model; attach and detach are safe while other threads decode."""

    model: nn.Module
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    keys: set[str] = attrs.field(init=False, factory=set)

    @runs_on_own_thread("lora-attach")
    def attach(self, key: str, adapter: AdapterFiles) -> None:
        """Add ``adapter``'s weights under ``key`` to the layers it targets (wrapping them on first use).

        The weights are converted on a thread of its own (`on_own_thread`), so that no OpenMP team stays behind.
        """
        check_fits(adapter, self.model)
        with self._lock:
            parameter = next(self.model.parameters())
            for module, weights in adapter.layers.items():
                target = self.model.get_submodule(module)
                wrapped = target if isinstance(target, LoraLinear) else self._wrap(module, target)
                a = weights.a.to(device=parameter.device, dtype=parameter.dtype)
                b = weights.b.to(device=parameter.device, dtype=parameter.dtype)
                wrapped.adapters[key] = LoraWeights(a, b, weights.scale).packed_for(wrapped.base)
            self.keys.add(key)
        log.info("lora.attached", adapter=key, layers=len(adapter.layers), path=str(adapter.path))

    def detach(self, key: str) -> None:
        """Drop the adapter ``key`` from every layer (the wrappers stay, adding nothing)."""
        with self._lock:
            for module in self.model.modules():
                if isinstance(module, LoraLinear):
                    module.adapters.pop(key, None)
            self.keys.discard(key)
        log.info("lora.detached", adapter=key)

    def _wrap(self, module: str, target: nn.Module) -> LoraLinear:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        wrapped = LoraLinear(target)
        setattr(parent, child, wrapped)
        return wrapped


def check_fits(adapter: AdapterFiles, model: nn.Module) -> None:
    """Raise ``AdapterError`` unless each of ``adapter``'s layers exists in ``model`` with matching shapes."""
    for module, weights in adapter.layers.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            target = None
        size_in, size_out = getattr(target, "in_features", None), getattr(target, "out_features", None)
        if (size_in, size_out) != (weights.a.shape[1], weights.b.shape[0]):
            msg = (
                f"the LoRA adapter at {adapter.path} does not fit this model: {module} takes "
                f"[{weights.a.shape[1]} -> {weights.b.shape[0]}], the model's is [{size_in} -> {size_out}]"
            )
            raise AdapterError(msg)


class AdaptableGenerator(Protocol):
    """A generator whose generations and scoring can run with a LoRA adapter (the HuggingFace ones)."""

    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str: ...
    def token_strings(self, token_ids: Sequence[int]) -> list[str]: ...
    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]: ...
    async def score(self, token_ids: Sequence[int], *, top: int, adapter: str | None = None) -> list[TokenLogprob]: ...


@attrs.frozen
class AdapterGenerator:
    """The ``Generator`` port for one adapter: the base model's generator, every request run with ``adapter``."""

    base: AdaptableGenerator
    adapter: str
    """The key the adapter is attached under."""
    model_id: str
    """The name clients use for the adapter."""

    @property
    def context_length(self) -> int:
        """The base model's context window."""
        return self.base.context_length

    @property
    def vocab_size(self) -> int:
        """The base model's vocabulary size."""
        return self.base.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text`` (the base model's tokenizer)."""
        return self.base.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        return self.base.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token."""
        return self.base.token_strings(token_ids)

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[GeneratedTokens, None]:
        """The base generator's stream, with this adapter applied."""
        return self.base.generate(prompt_ids, attrs.evolve(params, adapter=self.adapter))

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        """Log-probabilities of ``token_ids[1:]`` under the adapted model."""
        return await self.base.score(token_ids, top=top, adapter=self.adapter)


__all__ = [
    "AdapterError",
    "AdapterFiles",
    "AdapterGenerator",
    "LoraAdapters",
    "LoraLinear",
    "check_fits",
    "selecting",
]
