"""Prepacked linear layers for CPU inference: the same products, through a weight layout made for the kernel.

Where our own kernels build (`native`: AVX-512 VNNI or AVX2, and a C++ compiler), float32 layers are packed for ours
(`OwnPackedLinear`), which read the weights nearly twice as fast at one row; elsewhere, and for bfloat16, oneDNN's
(`PackedLinear`), as follows.

``nn.Linear`` on a CPU multiplies with MKL against the weight as stored, row-major. oneDNN can reorder a weight
once into the blocked layout its kernels read best, and that is what ``torch.compile`` does when it freezes a model
for the CPU (oneDNN's pointwise linear op, wrapped in `torch_compat`). Done at load time without compiling, it
makes the decoding step of a 135M-parameter model 1.2x (one sequence) to 1.6x (sixteen together) faster in
float32, and the output projection of a large vocabulary over 2x; `bench/throughput.py` shows what it does to a
served model.

The results are those of a different summation order (relative differences around 1e-6), not of another model.
The reordered weight replaces the original, so memory does not grow, except where the weight is shared with another
module (tied input and output embeddings): that one is kept, and the packed copy comes on top.

oneDNN is first used, and weights are reordered, with one torch thread. Reordered with two, then multiplied with two
on another thread (the batching engine's), a decoding step of SmolLM2 took 54-62 ms at batch 1 and 76 ms at batch
16, against 40 and 58 ms when reordered with one (2-core AMD EPYC, torch 2.13); one thread multiplies as fast either
way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import structlog
import torch
from torch import nn

from adapters.huggingface import native
from adapters.huggingface.torch_compat import linear_pointwise, reorder_linear_weight

log = structlog.get_logger(__name__)

PACKABLE_DTYPES = frozenset({torch.float32, torch.bfloat16})
"""What oneDNN multiplies on every x86 CPU torch supports (float16 needs AVX512-FP16)."""

SELF_CHECK_TOLERANCE = 1e-3
"""Largest relative difference from ``nn.Linear`` the packed kernel may show on a probe before it is trusted."""


class PackedLinear(nn.Module):
    """``nn.Linear`` over a weight reordered once for oneDNN; inference only (no gradients)."""

    def __init__(self, linear: nn.Linear, *, keep_weight: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = reorder_linear_weight(weight)
        self.bias = linear.bias
        self.weight: torch.Tensor = linear.weight if keep_weight else torch.empty_like(weight, device="meta")
        """The original weight when another module shares it; else only its shape and dtype (on ``meta``)."""
        self.one_row_as_two = one_row_rounds_otherwise(self.in_features, self.out_features, weight.dtype)
        """Whether a single row is multiplied as the first of two, so that it rounds as it does among others."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``; a row's product is the same alone as among other rows."""
        bias: torch.Tensor | None = self.bias
        if bias is not None:
            bias = bias.detach()
        if self.one_row_as_two and inputs.numel() == self.in_features:
            row = inputs.reshape(1, self.in_features)
            outputs = linear_pointwise(torch.cat((row, row)), self.packed, bias)[:1]
            return outputs.reshape(list(inputs.shape[:-1]) + [self.out_features])  # noqa: RUF005  no starred list in TorchScript
        return linear_pointwise(inputs, self.packed, bias)

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class OwnPackedLinear(nn.Module):
    """``nn.Linear`` in float32 over a weight packed for our own kernel (`native.float_linear`); inference only.

    Where our kernels build, float32 layers take it instead of oneDNN's (`pack_linear_layers`): SmolLM2-135M's
    products at one row took 19.2 against 35.2 ms on a 2-core AMD EPYC (Zen 4), at 16 rows 31.7 against 39.9 (README,
    "Kernels of our own"). A row is summed in the same order alone and among others, so it gets the same bits.
    """

    def __init__(self, linear: nn.Linear, *, keep_weight: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = native.pack_float_weight(weight)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.weight: torch.Tensor = linear.weight if keep_weight else torch.empty_like(weight, device="meta")
        """The original weight when another module shares it; else only its shape and dtype (on ``meta``)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``; a row's product is the same alone as among other rows."""
        return native.float_linear(inputs, self.packed, self.bias, out_features=self.out_features)

    def native_parts(self) -> list[torch.Tensor | None]:
        """Its weights as our kernels' layer ops take a product (`native.product_parts`)."""
        return [self.packed, None, None, self.bias]

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with the kernel."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, own"


PACKED_LAYERS = (PackedLinear, OwnPackedLinear)
"""The classes a packed float layer is (`pack_linear_layers` picks one)."""


def own_packing(dtype: torch.dtype) -> bool:
    """Whether float layers of ``dtype`` take our own kernel (`OwnPackedLinear`).

    float32, where our kernels build (`native.unavailable`).
    """
    return dtype == torch.float32 and native.unavailable() is None


@functools.cache
def one_row_rounds_otherwise(in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies a single row of inputs otherwise than the same row among others (a probe).

    It takes another kernel path for one row: on a Xeon with AVX-512, one with more than 1024 inputs (SmolLM2's
    ``down_proj``, 1536) came out different in the last bits, while two or more rows agreed with each other. A
    decoding step at batch 1 multiplies one row; the verifying pass of speculative decoding and a batched step
    multiply several, and must give a row the same logits. The kernel follows the shape, not the values: probed
    once a shape, on random weights (a model's 30 layers of a shape share one probe).
    """
    generator = torch.Generator().manual_seed(0)
    packed = reorder_linear_weight(torch.randn(out_features, in_features, generator=generator).to(dtype))
    rows = torch.randn(2, in_features, generator=generator).to(dtype)
    with torch.no_grad():
        return not torch.equal(linear_pointwise(rows[:1], packed, None), linear_pointwise(rows, packed, None)[:1])


def probe_linear(
    in_features: int, out_features: int, generator: torch.Generator, *, dtype: torch.dtype = torch.float32
) -> nn.Linear:
    """A linear layer for a kernel probe, its weights drawn from ``generator``, not from torch's global generator.

    A probe then answers the same in any process, whatever was drawn before it, and leaves the caller's random
    state as it was.
    """
    probe = nn.Linear(in_features, out_features, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        probe.weight.copy_(torch.randn(out_features, in_features, generator=generator) / 8)
        probe.bias.copy_(torch.randn(out_features, generator=generator) / 8)
    return probe.to(dtype)


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run prepacked linear layers of ``dtype`` here, and agrees with ``nn.Linear`` on a probe."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    generator = torch.Generator().manual_seed(0)
    probe = probe_linear(64, 48, generator, dtype=dtype)
    inputs = torch.randn(3, 5, 64, generator=generator).to(dtype)
    try:
        with torch.no_grad():
            packed = PackedLinear(probe, keep_weight=True)(inputs).float()
            expected = probe(inputs).float()
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        log.info("model.pack.probe_failed", reason=str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    tolerance = SELF_CHECK_TOLERANCE if dtype == torch.float32 else 5e-2
    return packed.shape == expected.shape and relative_difference(packed, expected) <= tolerance


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference between ``actual`` and ``expected``, relative to ``expected``'s largest magnitude."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-6))


def pack_linear_layers(
    model: nn.Module,
    *,
    supported: Callable[[torch.dtype], bool] = packing_supported,
    own: Callable[[torch.dtype], bool] = own_packing,
) -> int:
    """Replace each ``nn.Linear`` of a CPU model with a packed layer; return how many were replaced.

    `OwnPackedLinear` where ``own`` says our kernel takes the dtype (float32, where our kernels build), else
    `PackedLinear`. Nothing changes (0) on another device, in another dtype, where oneDNN is missing or disagrees on
    a probe (``supported``, which tests replace to take the fallback on any CPU); that fallback is logged as
    ``model.pack.unavailable``. Call it after loading and before serving: the model is for inference from then on.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oneDNN's first use and every reorder on one thread: see the module's docstring
    try:
        return _pack(model, supported, own)
    finally:
        torch.set_num_threads(threads)


def _pack(model: nn.Module, supported: Callable[[torch.dtype], bool], own: Callable[[torch.dtype], bool]) -> int:
    linears = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and type(child) is nn.Linear and child.weight.device.type == "cpu"
    ]
    dtypes = {child.weight.dtype for _, _, child in linears}
    if not linears or len(dtypes) != 1:
        return 0
    dtype = dtypes.pop()
    layer = OwnPackedLinear if own(dtype) else PackedLinear
    if layer is PackedLinear and not supported(dtype):
        log.info("model.pack.unavailable", dtype=str(dtype).removeprefix("torch."), using="nn.Linear")
        return 0
    counts: dict[int, int] = {}
    for parameter in _all_parameters(model):
        counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    with torch.no_grad():
        for parent, name, child in linears:
            setattr(parent, name, layer(child, keep_weight=counts.get(id(child.weight), 0) > 1))
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()  # off the checkpoint's mapped file, which would otherwise stay resident
    log.info("model.pack.done", layers=len(linears), kernel="own" if layer is OwnPackedLinear else "oneDNN")
    return len(linears)


def _all_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter reference in the model, one per module that holds it (shared ones appear more than once)."""
    return [p for module in model.modules() for p in module.parameters(recurse=False)]


__all__ = [
    "PACKED_LAYERS",
    "OwnPackedLinear",
    "PackedLinear",
    "one_row_rounds_otherwise",
    "own_packing",
    "pack_linear_layers",
    "packing_supported",
    "relative_difference",
]
