"""Quantized linear layers for CPU inference, and the one place that decides how each linear layer multiplies.

A decoding step of a small model reads every weight once, so on a CPU its time follows the bytes of the weights.
``int8`` stores each linear layer's weight as int8 with one scale per output row (a quarter of float32's bytes) and
multiplies with FBGEMM's dynamically quantized product: each call quantizes its inputs to 8 bits (7 without AVX-512
VNNI, see `int8_reduce_range`) and multiplies in integers, as llama.cpp's q8_0 does. FBGEMM gives the inputs one
scale per call; each token's row is brought to magnitude 1 first (and bounded by 1 and -1, see `Int8Linear.forward`)
and the product scaled back, so every token gets its own scale, the same in any batch. Without that, one token with
huge activations (the first of a text usually has them) crushed every other token's inputs to a few levels: on the
embedded SmolLM2 the log-likelihood of a 166-token text fell from -408.0 (float32) to -610.3 with one scale per
call; it is -433.9 with one per token. ``int4`` stores 4-bit codes with a scale and zero point per 32 weights and
multiplies with torch's int4 weight-only CPU kernel, in bfloat16.

Chosen by measurement (2-core AMD EPYC, AVX2 without AVX-512, torch 2.13, one thread, SmolLM2-135M shapes): the
49152-row output projection took 12 ms at batch 1 and 34 ms at batch 16 with FBGEMM's int8 product against 73 and
101 ms prepacked in float32; torch's weight-only int8 product (``_weight_int8pack_mm``) took 204 and 1812 ms, its
int4 product (float32 inputs) 287 and 1886 ms, and ``torch._int_mm`` far more. So ``int8`` is the one that pays on a
batch; ``int4`` saves memory, and time with few streams. Torch's int4 kernel is vectorised for bfloat16 inputs only
(with AVX2 or AVX-512; no native bfloat16 needed): on a 2-core Xeon with AVX-512, every product of a SmolLM2 step (2
threads) took 124 ms at batch 1 with float32 inputs against 4.8 ms with bfloat16 ones (1723 against 27 ms at batch
16), and 111 against 7.7 ms with torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``); int8 took 3.2 ms. Rounding the
inputs to bfloat16 moves int4's products by 0.3% relative, against the 8% int4's weights already cost. Every linear
layer is quantized, the output projection included; a tied input embedding keeps its float weight for the lookup, so
only the output projection's product is quantized.

Both are CPU kernels: on CUDA `resolve_quantization` refuses ``int8`` and ``int4`` at start-up rather than run a CPU
op on the GPU path. Where the CPU has AVX-512 VNNI or AVX2 and a compiler is at hand, kernels of this project's
stand in for FBGEMM's and torch's (`NativeInt8Linear`, `NativeInt4Linear`; see ``adapters.huggingface.native``), and
``int4``'s output projection takes 8 bits.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import attrs
import structlog
import torch
from torch import nn

from adapters.huggingface import native
from adapters.huggingface.cpu_features import cpu_flags
from adapters.huggingface.packing import pack_linear_layers, probe_linear, relative_difference
from adapters.huggingface.shared_input import stack_shared_input_linears
from adapters.huggingface.torch_compat import (
    INT4_GROUP_SIZE,
    linear_int4,
    linear_int8_dynamic,
    pack_int4_weight,
    pack_int8_dynamic_weight,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

log = structlog.get_logger(__name__)

QUANTIZE_CHOICES = ("none", "int8", "int4")
"""What ``--quantize`` accepts."""

FLOAT_GGUF_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
"""GGUF tensor types that hold float weights; every other type is a quantized block format."""

FOUR_BIT_GGUF_PREFIXES = ("Q4_", "Q3_", "Q2_", "IQ4", "IQ3", "IQ2", "IQ1", "TQ")
"""GGUF block formats of 4 bits a weight or fewer: a file holding any is served as ``int4`` where our kernel is."""

INT8_FULL_RANGE_WITH = "avx512_vnni"
"""The CPU flag with which FBGEMM's int8 product sums in 32 bits (``vpdpbusd``), so its inputs may take all 8 bits."""

INT4_SLOW_ON = frozenset({"DEFAULT", "NO AVX"})
"""torch CPU capabilities without a vectorised int4 kernel (it has AVX2 and AVX-512 ones)."""


class QuantizationError(ValueError):
    """A ``--quantize`` choice this device or dtype cannot serve; the message says what to do instead."""


@attrs.frozen
class Quantization:
    """How the linear layers multiply: ``scheme`` ("none", "int8", "int4") and why that was chosen."""

    scheme: str
    reason: str


FLOAT_WEIGHTS = Quantization("none", "float weights")
"""No quantization: the model's own float weights."""


def resolve_quantization(
    requested: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    dtype_requested: bool,
    gguf_weight_types: Iterable[str] = (),
) -> Quantization:
    """Decide the scheme from ``--quantize``, ``--dtype`` and the GGUF file's tensor types (empty: not a GGUF).

    An explicit ``--quantize`` wins. Without it, a quantized GGUF file is served on a CPU in float32 at the closest
    width that multiplies a batch fast: ``int4`` for a file holding 4-bit blocks or narrower (q4_1, q4_K, ...; the
    embedded one, whose output embedding alone is q8_0) where our own int4 kernel builds (`native`), else ``int8``
    (torch's int4 CPU kernel is slower than FBGEMM's int8 one at 16 rows). ``--dtype``, or a device other than the
    CPU, serves it in float; so does ``--quantize none``. Every other model keeps its float weights.

    Raises:
        QuantizationError: ``int8``/``int4`` on CUDA, or with a dtype other than float32.

    """
    if requested is not None and requested not in QUANTIZE_CHOICES:
        msg = f"unknown quantization {requested!r}; choose one of: {', '.join(QUANTIZE_CHOICES)}"
        raise QuantizationError(msg)
    if requested == "none":
        return Quantization("none", "--quantize none")
    if requested is not None:
        _check_servable(requested, device, dtype)
        return Quantization(requested, f"--quantize {requested}")
    if not kernel_works("int8"):
        return Quantization("none", "this torch has no int8 CPU kernel")
    quantized_types = sorted(set(gguf_weight_types) - FLOAT_GGUF_TYPES)
    return _file_default(quantized_types, device, dtype, dtype_requested=dtype_requested)


def _file_default(
    quantized_types: list[str], device: torch.device, dtype: torch.dtype, *, dtype_requested: bool
) -> Quantization:
    if not quantized_types:
        return FLOAT_WEIGHTS
    if dtype_requested:
        return Quantization("none", "--dtype asks for a float model")
    if device.type != "cpu":
        return Quantization("none", f"the int8 kernel is CPU-only; the GGUF file is expanded on {device.type}")
    if dtype != torch.float32:
        return Quantization("none", "the int8 kernel multiplies float32 activations")
    kinds = ", ".join(quantized_types)
    if any(kind.startswith(FOUR_BIT_GGUF_PREFIXES) for kind in quantized_types) and native.unavailable() is None:
        return Quantization(
            "int4", f"GGUF file quantized as {kinds}, served at 4 bits by our kernel (--quantize none expands to float)"
        )
    return Quantization("int8", f"GGUF file quantized as {kinds}, served at 8 bits (--quantize none expands to float)")


def _check_servable(scheme: str, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        msg = (
            f"--quantize {scheme} uses CPU kernels (FBGEMM int8, torch's int4 CPU op) and is not available on "
            f"{device.type}: leave --quantize out (or --quantize none), or serve with --device cpu"
        )
        raise QuantizationError(msg)
    if dtype != torch.float32:
        msg = (
            f"--quantize {scheme} multiplies float32 activations; --dtype {str(dtype).removeprefix('torch.')} "
            "cannot be combined with it: leave --dtype out or use --dtype fp32"
        )
        raise QuantizationError(msg)
    if not kernel_works(scheme):
        msg = f"--quantize {scheme}: this torch build has no working {scheme} CPU kernel here; use --quantize none"
        raise QuantizationError(msg)


KERNEL_PROBE_BOUND = 0.25
"""How far `kernel_works`'s probe may be from float32, relative to its largest output: a working int4 kernel gave
0.03-0.12 over 300 random probes (0.094 on the probe it uses), a broken one gives garbage."""


def kernel_works(scheme: str) -> bool:
    """Whether the ``scheme``'s kernel runs here and agrees with ``nn.Linear`` on a probe (loosely: it rounds).

    The probe's weights come from a generator of its own (`probe_linear`). Drawn from torch's global one, as
    ``nn.Linear``'s own initialisation draws them, one int4 probe in 300 differed by more than the bound it had
    then (0.1; the kernel rounds each weight to one of 16 levels), so a server could refuse ``--quantize int4`` at
    random, and the probe moved the global random state of whoever called it.
    """
    generator = torch.Generator().manual_seed(0)
    probe = probe_linear(64, 32, generator)
    inputs = torch.randn(3, 64, generator=generator)
    build = {"int8": int8_layer, "int4": int4_layer}[scheme]
    try:
        with torch.no_grad():
            actual, expected = build(probe)(inputs), probe(inputs)
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        log.info("model.quantize.probe_failed", scheme=scheme, reason=str(error).splitlines()[0] if str(error) else "")
        return False
    return relative_difference(actual, expected) <= KERNEL_PROBE_BOUND


def int8_reduce_range(flags: frozenset[str] | None) -> bool:
    """Whether int8 products give their inputs 7 bits rather than 8: unless the CPU has `INT8_FULL_RANGE_WITH`.

    Without VNNI, FBGEMM sums pairs of 8-bit products in 16 bits, which 8-bit inputs can saturate. With it, the
    8th bit cut int8's log-likelihood loss on the embedded SmolLM2 by 3.4x (`bench/quality.py`, a 2-core Xeon with
    AVX-512 VNNI, one run: float32 -407.98, int8 -437.15 with 7-bit inputs, -416.53 with 8-bit ones).
    """
    return flags is None or INT8_FULL_RANGE_WITH not in flags


class Int8Linear(nn.Module):
    """``nn.Linear`` over an int8 weight (one scale per output row), multiplied with 8-bit inputs, one scale a token.

    ``reduce_range``: the inputs take 7 bits, as they must where the CPU's product could saturate with 8
    (`int8_reduce_range`).
    """

    def __init__(self, linear: nn.Linear, *, reduce_range: bool = True) -> None:
        super().__init__()
        self.reduce_range = reduce_range
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        self.packed = pack_int8_dynamic_weight(torch.cat([weight, weight.new_zeros(weight.shape[0], 2)], dim=1), None)
        """The weight with two zero columns, which meet the inputs' two bounds (see `forward`)."""
        self.bounds = torch.tensor([1.0, -1.0])
        self.tiny = torch.finfo(torch.float32).tiny
        """The least magnitude a row is divided by (an all-zero row stays zero)."""
        self.weight: torch.Tensor = torch.empty_like(linear.weight, device="meta")
        """Only the float weight's shape and dtype (on ``meta``), for code that asks a linear layer for them."""
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``, approximately: each row scaled to magnitude 1, multiplied, scaled back.

        FBGEMM quantizes a call's inputs with the range of the whole tensor. Each row is brought to magnitude 1 and
        given two more values, 1 and -1 (multiplied by zero weights), so that range is [-1, 1] whatever the other
        rows hold: a token's product is the same alone, in a batch, in a prompt or in a decoding step.
        """
        inputs = inputs.float()
        magnitudes = inputs.abs().amax(dim=-1, keepdim=True).clamp(min=self.tiny)
        bounds = self.bounds.expand(list(inputs.shape[:-1]) + [2])  # noqa: RUF005  no starred list in TorchScript
        bounded = torch.cat([inputs / magnitudes, bounds], dim=-1)
        outputs = linear_int8_dynamic(bounded, self.packed, reduce_range=self.reduce_range) * magnitudes
        bias = self.bias
        return outputs if bias is None else outputs + bias

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with the scheme."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class NativeInt8Linear(nn.Module):
    """``nn.Linear`` over an int8 weight (one scale per output row), multiplied by our own kernel (`native`).

    The kernel quantizes each input row to 8 bits with a scale of its own, so it needs none of `Int8Linear`'s
    bounds; the weight is quantized as `Int8Linear`'s is. Used instead of it where the kernel builds (`int8_layer`).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.panels, self.sums, self.scales = native.pack_int8_weight(linear.weight)
        self.weight: torch.Tensor = torch.empty_like(linear.weight, device="meta")
        """Only the float weight's shape and dtype (on ``meta``), for code that asks a linear layer for them."""
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``, approximately: each row quantized with its own scale."""
        bias = self.bias
        return native.int8_linear(
            inputs.float(), self.panels, self.sums, self.scales, bias, out_features=self.out_features
        )

    def native_parts(self) -> list[torch.Tensor | None]:
        """Its weights as our kernels' layer ops take a product (`native.product_parts`)."""
        return [self.panels, self.sums, self.scales, self.bias]

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with the scheme."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (own kernel)"


INT8_LAYERS = (Int8Linear, NativeInt8Linear)
"""The classes an int8 layer is (`int8_layer` picks one)."""


def int8_layer(linear: nn.Linear) -> nn.Module:
    """``linear`` in int8: with our own kernel where it builds (`native`), else with FBGEMM's (`Int8Linear`)."""
    if native.unavailable() is None:
        return NativeInt8Linear(linear)
    return Int8Linear(linear, reduce_range=int8_reduce_range(cpu_flags()))


class Int4Linear(nn.Module):
    """``nn.Linear`` over 4-bit weights in groups of 32 (a scale and zero point each), multiplied in bfloat16.

    Torch's int4 CPU kernel is vectorised for bfloat16 inputs only: with float32 ones it ran 14-26x slower.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed, scales_and_zeros = pack_int4_weight(linear.weight.detach())
        self.weight: torch.Tensor = torch.empty_like(linear.weight, device="meta")
        """Only the float weight's shape and dtype (on ``meta``), for code that asks a linear layer for them."""
        self.packed: torch.Tensor = packed
        self.scales_and_zeros: torch.Tensor = scales_and_zeros.to(torch.bfloat16)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``, approximately."""
        outputs = linear_int4(inputs.to(torch.bfloat16).contiguous(), self.packed, self.scales_and_zeros).float()
        bias = self.bias
        return outputs if bias is None else outputs + bias

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with the scheme."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"


class NativeInt4Linear(nn.Module):
    """``nn.Linear`` over 4-bit weights in groups of 32, multiplied by our own kernel (`native`).

    Each group has a float16 scale and minimum, as GGUF's q4_1 blocks do; the inputs are quantized to 8 bits with a
    scale for each group of 32 of each row. Used instead of `Int4Linear` where the kernel builds (`int4_layer`).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = native.pack_int4_weight(linear.weight)
        self.weight: torch.Tensor = torch.empty_like(linear.weight, device="meta")
        """Only the float weight's shape and dtype (on ``meta``), for code that asks a linear layer for them."""
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight.T + bias``, approximately: each row's groups quantized with their own scales."""
        return native.int4_linear(inputs.float(), self.packed, self.bias, out_features=self.out_features)

    def native_parts(self) -> list[torch.Tensor | None]:
        """Its weights as our kernels' layer ops take a product (`native.product_parts`)."""
        return [self.packed, None, None, self.bias]

    def extra_repr(self) -> str:
        """As ``nn.Linear`` shows itself, with the scheme."""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (own kernel)"


INT4_LAYERS = (Int4Linear, NativeInt4Linear)
"""The classes an int4 layer is (`int4_layer` picks one)."""


def int4_layer(linear: nn.Linear) -> nn.Module:
    """``linear`` in int4: with our own kernel where it builds (`native`), else with torch's (`Int4Linear`)."""
    return NativeInt4Linear(linear) if native.unavailable() is None else Int4Linear(linear)


def int4_fits(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes this layer's shape (inputs a multiple of 32, outputs of 16)."""
    return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0


def prepare_linear_layers(model: nn.Module, quantization: Quantization, *, pack: bool) -> int:
    """Quantize the linear layers (``int8``/``int4``) or prepack them for oneDNN (``none`` and ``pack``).

    The one place that decides how each linear layer multiplies; returns how many layers it replaced. On the CPU,
    layers that read the same input are first stacked into one product (`stack_shared_input_linears`), which is
    then quantized or packed like any layer. A layer the int4 kernel cannot take (an odd shape) keeps float32 and
    is prepacked when ``pack``. With neither (``none``, not ``pack``) the layers stay as the model built them.
    """
    if quantization.scheme == "none" and not pack:
        return 0
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cpu":
        stack_shared_input_linears(model, probe_ids(model))
    if quantization.scheme == "none":
        return pack_linear_layers(model)
    capability = torch.backends.cpu.get_cpu_capability()
    if quantization.scheme == "int4" and capability in INT4_SLOW_ON:
        log.warning(
            "model.quantize.slow_on_cpu",
            scheme="int4",
            cpu_capability=capability,
            advice="torch's int4 CPU kernel is not vectorised without AVX2: prefer --quantize int8",
        )
    count = quantize_linear_layers(model, quantization.scheme)
    if pack:
        count += pack_linear_layers(model)
    return count


def probe_ids(model: nn.Module) -> torch.Tensor:
    """A few token ids every vocabulary has, for a probe forward pass of ``model``."""
    vocabulary = int(getattr(model.config, "vocab_size", 0) or 0) if hasattr(model, "config") else 0
    return torch.arange(max(1, min(8, vocabulary))).unsqueeze(0)


def quantize_linear_layers(model: nn.Module, scheme: str) -> int:
    """Replace each float ``nn.Linear`` of a CPU model with an int8 or int4 layer (`int8_layer`, `int4_layer`).

    Returns how many. Under ``int4`` the output projection takes 8 bits, as GGUF's 4-bit files keep theirs (the
    embedded SmolLM2's is q8_0): in 4 bits it cost the embedded model its answers ("What is the capital of
    France?" got "L'Étoile, the capital of France."; "... Paris." with it in 8 bits).

    The float weights are released, except one another module shares (a tied input embedding), which stays for
    that module's own use.
    """
    build: Callable[[nn.Linear], nn.Module] = int4_layer
    own = native.unavailable() is None
    torch_kernel = "FBGEMM" if scheme == "int8" else "torch's"
    details: dict[str, int | str] = {"kernel": f"own ({native.isa()})" if own else torch_kernel}
    head = getattr(model, "get_output_embeddings", lambda: None)()  # a transformers model's output projection
    if scheme == "int8":
        build = int8_layer
        details["int8_input_bits"] = 8 if own or not int8_reduce_range(cpu_flags()) else 7
    elif head is not None:
        details["output_projection"] = "int8"
    linears = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and (scheme != "int4" or child is head or int4_fits(child))
    ]
    with torch.no_grad():
        for parent, name, child in linears:
            setattr(parent, name, int8_layer(child) if child is head and scheme == "int4" else build(child))
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()  # off the checkpoint's mapped file, which would otherwise stay resident
    gc.collect()
    log.info("model.quantize.done", scheme=scheme, layers=len(linears), **details)
    return len(linears)


__all__ = [
    "FLOAT_WEIGHTS",
    "INT4_LAYERS",
    "INT8_LAYERS",
    "QUANTIZE_CHOICES",
    "Int4Linear",
    "Int8Linear",
    "NativeInt4Linear",
    "NativeInt8Linear",
    "Quantization",
    "QuantizationError",
    "int4_layer",
    "int8_layer",
    "int8_reduce_range",
    "prepare_linear_layers",
    "quantize_linear_layers",
    "resolve_quantization",
]
