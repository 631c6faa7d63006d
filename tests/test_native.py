"""Our own int8 kernel: built at run time where the CPU has AVX-512 VNNI, exact to its integer arithmetic, per row."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adapters.huggingface import native
from adapters.huggingface.loading import load_model
from adapters.huggingface.quantization import Int8Linear, NativeInt8Linear, int8_layer
from adapters.huggingface.torch_compat import script
from tests.tiny_model import build_tiny_model, tied_tiny_llama

needs_kernel = pytest.mark.skipif(
    native.unavailable() is not None, reason=f"no int8 kernel here: {native.unavailable()}"
)


def expected_product(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in torch: 8-bit rows times 8-bit weights, summed exactly, scaled back in float32."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.clamp(torch.round(weight / scales[:, None]), -127, 127)
    largest = inputs.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    row_codes = torch.round(inputs * inverse)  # to nearest, ties to even, as the kernel rounds
    sums = (row_codes.to(torch.int64) @ codes.to(torch.int64).T).float()
    outputs = sums * ((largest / 127) * scales)
    return outputs if bias is None else outputs + bias


def packed(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return native.pack_int8_weight(weight)


@needs_kernel
@pytest.mark.parametrize(("rows", "features", "outputs"), [(1, 576, 960), (3, 70, 37), (5, 16, 16), (9, 33, 50)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_gives_its_integer_arithmetic_exactly(rows, features, outputs, with_bias):
    generator = torch.Generator().manual_seed(rows * features)
    weight = torch.randn(outputs, features, generator=generator) * 0.1
    bias = torch.randn(outputs, generator=generator) if with_bias else None
    inputs = torch.randn(rows, features, generator=generator) * torch.logspace(-3, 3, rows).unsqueeze(1)
    actual = native.int8_linear(inputs, *packed(weight), bias, out_features=outputs)
    assert torch.equal(actual, expected_product(inputs, weight, bias))
    assert float((actual - nn.functional.linear(inputs, weight, bias)).abs().max()) < 0.05 * float(
        nn.functional.linear(inputs, weight, bias).abs().max()
    )


@needs_kernel
def test_a_row_gets_the_same_bits_alone_in_any_batch_and_on_any_thread_count():
    generator = torch.Generator().manual_seed(0)
    layer = NativeInt8Linear(nn.Linear(200, 72))
    magnitudes = torch.tensor([1e3, 1, 1e-3, 5, 0.1, 2, 7, 30, 1, 1, 9])
    inputs = torch.randn(11, 200, generator=generator) * magnitudes[:, None]
    threads = torch.get_num_threads()
    with torch.no_grad():
        together = layer(inputs)
        try:
            torch.set_num_threads(1)
            single_threaded = layer(inputs)
        finally:
            torch.set_num_threads(threads)
        for row in range(11):
            assert torch.equal(layer(inputs[row : row + 1]), together[row : row + 1])
            assert torch.equal(layer(inputs[row:]), together[row:])  # another blocking of the rows
    assert torch.equal(single_threaded, together)


@needs_kernel
def test_the_kernel_keeps_every_leading_dimension_and_takes_no_rows():
    layer = NativeInt8Linear(nn.Linear(40, 24))
    with torch.no_grad():
        prompt = layer(torch.randn(2, 7, 40))
        nothing = layer(torch.empty(0, 40))
        zeros = layer(torch.zeros(3, 40))
    assert prompt.shape == (2, 7, 24)
    assert nothing.shape == (0, 24)
    assert torch.equal(zeros, layer.bias.detach().expand(3, 24))


@needs_kernel
def test_the_layer_compiles_with_torchscript_and_gives_the_same_bits():
    layer = NativeInt8Linear(nn.Linear(64, 48))
    compiled = script(layer)
    inputs = torch.randn(4, 64)
    assert compiled is not None
    with torch.no_grad():
        assert torch.equal(compiled(inputs), layer(inputs))


@needs_kernel
def test_int8_layers_take_the_kernel_where_it_builds():
    assert type(int8_layer(nn.Linear(8, 8))) is NativeInt8Linear


def test_without_the_kernel_int8_layers_keep_fbgemm(monkeypatch):
    monkeypatch.setenv(native.DISABLE, "0")
    native.unavailable.cache_clear()
    try:
        assert native.unavailable() == f"{native.DISABLE}=0"
        assert type(int8_layer(nn.Linear(8, 8))) is Int8Linear
    finally:
        monkeypatch.undo()
        native.unavailable.cache_clear()


def test_a_cpu_without_vnni_or_a_failing_compiler_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    native.unavailable.cache_clear()
    try:
        assert "avx512_vnni" in (native.unavailable() or "")
        monkeypatch.setattr(native, "cpu_flags", lambda: native.FEATURES)
        monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
        native.unavailable.cache_clear()
        assert "CalledProcessError" in (native.unavailable() or "")
        assert not list(tmp_path.glob("*.so"))
    finally:
        monkeypatch.undo()
        native.unavailable.cache_clear()


@needs_kernel
def test_sums_at_the_top_of_every_range_stay_exact():
    """Every input and weight at the top of its range, of one sign, over many features: 32-bit sums cannot overflow."""
    weight = torch.ones(32, 8192)
    inputs = torch.ones(2, 8192)
    inputs[1] = -1.0
    actual = native.int8_linear(inputs, *packed(weight), None, out_features=32)
    assert torch.equal(actual, expected_product(inputs, weight, None))
    assert torch.equal(actual, nn.functional.linear(inputs, weight))


@needs_kernel
def test_the_op_refuses_what_pack_int8_weight_did_not_make():
    panels, sums, scales = packed(torch.randn(20, 12))
    with pytest.raises(RuntimeError, match="float32 inputs"):
        native.int8_linear(torch.randn(2, 12, dtype=torch.float64), panels, sums, scales, None, out_features=20)
    with pytest.raises(RuntimeError, match="features"):
        native.int8_linear(torch.randn(2, 40), panels, sums, scales, None, out_features=20)
    with pytest.raises(RuntimeError, match="sums and scales"):
        native.int8_linear(torch.randn(2, 12), panels, sums, scales, None, out_features=64)
    with pytest.raises(RuntimeError, match="bias"):
        native.int8_linear(torch.randn(2, 12), panels, sums, scales, torch.zeros(3), out_features=20)


class GemmaStyleNorm(nn.Module):
    """A norm that scales by ``1 + weight``, as Gemma's does: the probe must keep it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return normed * (1 + self.weight)


@needs_kernel
@pytest.mark.parametrize("size", [64, 576, 70])
def test_the_own_norm_gives_llamas_to_rounding_and_each_row_the_same_bits_anywhere(size):
    norm = LlamaRMSNorm(size, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size, generator=torch.Generator().manual_seed(size)))
    own = native.OwnRMSNorm(norm.weight, norm.variance_epsilon)
    inputs = torch.randn(2, 21, size, generator=torch.Generator().manual_seed(1)) * 30
    threads = torch.get_num_threads()
    with torch.no_grad():
        expected, together = norm(inputs), own(inputs)
        try:
            torch.set_num_threads(1)
            single_threaded = own(inputs)
        finally:
            torch.set_num_threads(threads)
        alone = own(inputs[1, 5:6])
    assert float((together - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert torch.equal(single_threaded, together)
    assert torch.equal(alone, together[1, 5:6])
    assert own.weight is norm.weight


@needs_kernel
def test_own_norms_replace_llama_style_norms_only(tmp_path):
    model = tied_tiny_llama(96)
    model.model.extra_norm = GemmaStyleNorm(model.config.hidden_size)
    llama_norms = sum(isinstance(m, LlamaRMSNorm) for m in model.modules())
    assert native.use_own_norms(model) == llama_norms > 0
    assert not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
    assert isinstance(model.model.extra_norm, GemmaStyleNorm)


@needs_kernel
@pytest.mark.parametrize(("scheme", "own"), [("int8", True), ("none", False)])
def test_a_quantized_model_loads_with_own_norms_and_a_float_one_keeps_transformers(tmp_path, scheme, own):
    model = load_model(str(build_tiny_model(tmp_path / "tiny")), device="cpu", quantize=scheme).model
    assert isinstance(model.model.norm, native.OwnRMSNorm) is own
    assert isinstance(model.model.layers[0].input_layernorm, native.OwnRMSNorm) is own
