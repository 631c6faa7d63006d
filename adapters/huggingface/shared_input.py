"""Linear layers that read the same input, multiplied as one product.

A transformer layer asks for its query, key and value projections one after another, of the same hidden states,
and for the MLP's gate and up projections likewise: five products where two would do. On a CPU at decoding time
each product is small, so what it costs beyond reading its weight (dispatch, threads, the kernel's set-up) is a
large share of it: on a 2-core AMD EPYC (AVX2, torch 2.13, SmolLM2-135M shapes, one token) the three packed
float32 attention projections took 310 us and one product of their stacked weights 147 us; the gate and up
projections 297 us against 208 us; in int8, 458 against 183 us and 318 against 211 us.

Which layers share an input is not guessed from names: one probe forward pass records the input tensor each linear
layer receives, and the layers of one parent module that received the very same tensor are stacked into a
`SharedInput` product. Each keeps its place in the model as a `SharedInputSlice` (same name, ``in_features``,
``out_features``, a ``meta`` weight of its shape), so code that looks layers up by name, LoRA adapters included,
still finds them. The first slice asked for an input computes every slice's output; the others take theirs. The
probe is run again after stacking, and anything other than the same logits splits the layers back apart.

Stacking happens before packing or quantizing, which then handle the stacked layer like any other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import structlog
import torch
from torch import nn

from adapters.huggingface.packing import relative_difference

log = structlog.get_logger(__name__)

PROBE_TOLERANCE = 1e-4
"""Largest relative difference of the probe's logits after stacking before the stacking is undone."""


class SharedInput(nn.Module):
    """One product for several linear layers that read the same input; `SharedInputSlice` hands out the parts.

    The outputs of the last input are kept per thread (the engine's thread and the plain generator's may run the
    model at once) until each slice has taken its part, then released.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        first = linears[0]
        self.sizes = tuple(linear.out_features for linear in linears)
        has_bias = first.bias is not None
        self.product = nn.Linear(
            first.in_features, sum(self.sizes), bias=has_bias, device=first.weight.device, dtype=first.weight.dtype
        )
        with torch.no_grad():
            self.product.weight.copy_(torch.cat([linear.weight for linear in linears]))
            if has_bias:
                self.product.bias.copy_(torch.cat([linear.bias for linear in linears]))
        self._last = threading.local()

    def part(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """The output of the ``index``-th stacked layer for ``inputs``, from the last product when it was of them."""
        last = self._last
        waiting: set[int] | None = getattr(last, "waiting", None)
        if waiting is None or index not in waiting or last.inputs is not inputs:
            last.inputs, last.outputs = inputs, self.product(inputs).split(self.sizes, dim=-1)
            waiting = set(range(len(self.sizes)))
            last.waiting = waiting
        waiting.discard(index)
        output: torch.Tensor = last.outputs[index]
        if not waiting:
            last.inputs = last.outputs = last.waiting = None
        return output


class SharedInputSlice(nn.Module):
    """Where one of the layers stacked in a `SharedInput` stood: its part of the shared product."""

    def __init__(self, shared: SharedInput, index: int, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.index = index
        self.weight: torch.Tensor = torch.empty_like(linear.weight, device="meta")
        """Only the original weight's shape and dtype (on ``meta``), for code that asks a linear layer for them."""
        object.__setattr__(self, "shared", shared)  # not a child: the parent module holds the product once

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias`` of the original layer."""
        shared: SharedInput = self.__dict__["shared"]
        return shared.part(self.index, inputs)

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with where its product is."""
        return f"in_features={self.in_features}, out_features={self.out_features}, shared input"


def stacked_product(*linears: nn.Module) -> nn.Module | None:
    """The one product of ``linears`` when they are, in order, every slice of one `SharedInput`; else ``None``.

    For callers that want every slice's output at once (the engine's lean decoding pass): one call, no hand-out.
    """
    first = linears[0]
    if not isinstance(first, SharedInputSlice):
        return None
    shared: SharedInput = first.__dict__["shared"]
    if len(shared.sizes) != len(linears):
        return None
    for index, linear in enumerate(linears):
        if not isinstance(linear, SharedInputSlice) or linear.__dict__["shared"] is not shared or linear.index != index:
            return None
    return shared.product


def stack_shared_input_linears(model: nn.Module, probe_ids: torch.Tensor) -> int:
    """Stack the linear layers of ``model`` that read the same input; return how many layers were stacked.

    ``probe_ids``: a few token ids of the model's vocabulary for the probe forward passes. Nothing changes (0)
    when the probe fails, finds no shared input, or gives other logits once stacked.
    """
    try:
        expected, groups = _probe(model, probe_ids)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as error:
        log.info(
            "model.shared_input.unavailable", reason=str(error).splitlines()[0] if str(error) else type(error).__name__
        )
        return 0
    if not groups:
        return 0
    stacked = [_stack(parent, names, number) for number, (parent, names) in enumerate(groups)]
    with torch.inference_mode():
        actual = _logits(model, probe_ids)
    difference = relative_difference(actual, expected) if actual.shape == expected.shape else float("inf")
    if difference > PROBE_TOLERANCE:
        for number, (parent, names) in enumerate(groups):
            _unstack(parent, names, stacked[number], number)
        log.warning("model.shared_input.undone", difference=difference)
        return 0
    layers = sum(len(names) for _, names in groups)
    log.info("model.shared_input.done", products=len(groups), layers=layers)
    return layers


def _stack(parent: nn.Module, names: list[str], number: int) -> SharedInput:
    linears = [getattr(parent, name) for name in names]
    shared = SharedInput(linears)
    parent.add_module(f"shared_input_{number}", shared)
    for index, (name, linear) in enumerate(zip(names, linears, strict=True)):
        setattr(parent, name, SharedInputSlice(shared, index, linear))
    return shared


def _unstack(parent: nn.Module, names: list[str], shared: SharedInput, number: int) -> None:
    product, offset = shared.product, 0
    for name, size in zip(names, shared.sizes, strict=True):
        linear = nn.Linear(
            product.in_features,
            size,
            bias=product.bias is not None,
            device=product.weight.device,
            dtype=product.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(product.weight[offset : offset + size])
            if product.bias is not None:
                linear.bias.copy_(product.bias[offset : offset + size])
        setattr(parent, name, linear)
        offset += size
    delattr(parent, f"shared_input_{number}")


def _probe(model: nn.Module, probe_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Module, list[str]]]]:
    """The probe's logits, and per parent module the names of its linear layers that read one same tensor."""
    seen: dict[nn.Module, list[Any]] = {}
    handles = [
        linear.register_forward_hook(lambda module, inputs, _output: seen.setdefault(module, []).append(inputs[0]))
        for linear in _float_linears(model)
    ]
    try:
        with torch.inference_mode():
            logits = _logits(model, probe_ids)
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for parent in model.modules():
        by_input: dict[int, list[str]] = {}
        for name, child in parent.named_children():
            calls = seen.get(child, [])
            if len(calls) == 1:  # a layer run more than once per pass (shared weights) is left alone
                by_input.setdefault(id(calls[0]), []).append(name)
        groups += [(parent, names) for names in by_input.values() if len(names) > 1 and _stackable(parent, names)]
    return logits, groups


def _stackable(parent: nn.Module, names: list[str]) -> bool:
    linears = [getattr(parent, name) for name in names]
    first = linears[0]
    return all(
        linear.in_features == first.in_features
        and (linear.bias is None) == (first.bias is None)
        and linear.weight.dtype == first.weight.dtype
        and linear.weight.device == first.weight.device
        for linear in linears
    )


def _float_linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (module for module in model.modules() if type(module) is nn.Linear)


def _logits(model: nn.Module, probe_ids: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=probe_ids, use_cache=False).logits
    return logits.float()


__all__ = ["SharedInput", "SharedInputSlice", "stack_shared_input_linears", "stacked_product"]
