"""Our own kernels: built at run time where the CPU has AVX-512 VNNI; int8 exact to its integer arithmetic, float32 and
int4 to rounding, every row the same bits alone or in a batch; norms, attention and a layer's halves."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adapters.huggingface import native
from adapters.huggingface.cpu_features import cpu_flags
from adapters.huggingface.engine.decoder import AttentionInput, LayerOutput, signed_sines
from adapters.huggingface.loading import load_model
from adapters.huggingface.packing import OwnPackedLinear
from adapters.huggingface.quantization import (
    Int4Linear,
    Int8Linear,
    NativeInt4Linear,
    NativeInt8Linear,
    int4_layer,
    int8_layer,
)
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


def product_case(
    rows: int, features: int, outputs: int, *, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A weight, a bias (or none) and input rows of magnitudes from 1e-3 to 1e3, drawn from the case's own seed."""
    generator = torch.Generator().manual_seed(rows * features)
    weight = torch.randn(outputs, features, generator=generator) * 0.1
    bias = torch.randn(outputs, generator=generator) if with_bias else None
    inputs = torch.randn(rows, features, generator=generator) * torch.logspace(-3, 3, rows).unsqueeze(1)
    return weight, bias, inputs


@needs_kernel
@pytest.mark.parametrize(("rows", "features", "outputs"), [(1, 576, 960), (3, 70, 37), (5, 16, 16), (9, 33, 50)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_gives_its_integer_arithmetic_exactly(rows, features, outputs, with_bias):
    weight, bias, inputs = product_case(rows, features, outputs, with_bias=with_bias)
    actual = native.int8_linear(inputs, *packed(weight), bias, out_features=outputs)
    assert torch.equal(actual, expected_product(inputs, weight, bias))
    assert float((actual - nn.functional.linear(inputs, weight, bias)).abs().max()) < 0.05 * float(
        nn.functional.linear(inputs, weight, bias).abs().max()
    )


@needs_kernel
@pytest.mark.parametrize("build", [NativeInt8Linear, NativeInt4Linear])
def test_a_row_gets_the_same_bits_alone_in_any_batch_in_a_prompt_and_on_any_thread_count(build):
    generator = torch.Generator().manual_seed(0)
    layer = build(nn.Linear(192, 72))
    magnitudes = torch.tensor([1e3, 1, 1e-3, 5, 0.1, 2, 7, 30, 1, 1, 9])
    inputs = torch.randn(11, 192, generator=generator) * magnitudes[:, None]
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
        prompt = layer(inputs.unsqueeze(0))
    assert torch.equal(single_threaded, together)
    assert torch.equal(prompt[0], together)


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
@pytest.mark.parametrize(
    "build",
    [
        NativeInt8Linear,
        NativeInt4Linear,
        functools.partial(OwnPackedLinear, keep_weight=False),
        lambda linear: native.OwnRMSNorm(linear.bias, 1e-6),
        lambda _: native.OwnSiLU(),
    ],
)
def test_the_layers_compile_with_torchscript_and_give_the_same_bits(build):
    layer = build(nn.Linear(64, 64))
    compiled = script(layer)
    inputs = torch.randn(4, 64)
    assert compiled is not None
    with torch.no_grad():
        assert torch.equal(compiled(inputs), layer(inputs))


@needs_kernel
def test_int8_and_int4_layers_take_the_kernels_where_they_build():
    assert type(int8_layer(nn.Linear(32, 8))) is NativeInt8Linear
    assert type(int4_layer(nn.Linear(32, 8))) is NativeInt4Linear


def test_without_the_kernel_int8_layers_keep_fbgemm(monkeypatch):
    monkeypatch.setenv(native.DISABLE, "0")
    native.unavailable.cache_clear()
    try:
        assert native.unavailable() == f"{native.DISABLE}=0"
        assert type(int8_layer(nn.Linear(32, 16))) is Int8Linear
        assert type(int4_layer(nn.Linear(32, 16))) is Int4Linear
    finally:
        monkeypatch.undo()
        native.unavailable.cache_clear()


def test_a_cpu_without_vnni_or_a_failing_compiler_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.delenv(native.DISABLE, raising=False)  # the suite may run with our kernels turned off
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


LOADS = [("int8", True, True), ("none", True, True), ("none", False, False)]
"""``(quantize, pack_weights, whether the norms and attention are ours)``: quantized or packed float32 products are
ours, plain layers (``--no-pack-weights``) are transformers'."""


@needs_kernel
@pytest.mark.parametrize(("scheme", "pack", "own"), LOADS)
def test_a_model_on_our_products_loads_with_own_norms_and_plain_layers_keep_transformers(tmp_path, scheme, pack, own):
    """Quantized or packed float32 layers are ours, and so are the norms; ``--no-pack-weights`` keeps transformers'."""
    directory = build_tiny_model(tmp_path / "tiny")
    model = load_model(str(directory), device="cpu", quantize=scheme, pack_weights=pack).model
    assert isinstance(model.model.norm, native.OwnRMSNorm) is own
    assert isinstance(model.model.layers[0].input_layernorm, native.OwnRMSNorm) is own


def expected_int4_product(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the int4 kernel computes, in torch: q4_1-style weights, 8-bit inputs per group of 32, in float64."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, -1, 32)
    minimum = groups.amin(dim=-1).half().float()
    scale = ((groups.amax(dim=-1) - minimum) / 15).half().float()
    codes = torch.where(scale[..., None] > 0, torch.round((groups - minimum[..., None]) / scale[..., None]), 0)
    weights = (codes.clamp(0, 15) * scale[..., None] + minimum[..., None]).reshape(rows, columns)
    input_groups = inputs.reshape(*inputs.shape[:-1], -1, 32)
    largest = input_groups.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    quantized = (torch.round(input_groups * inverse) * (largest / 127)).reshape(inputs.shape)
    outputs = quantized.double() @ weights.double().T
    return (outputs if bias is None else outputs + bias.double()).float()


@needs_kernel
@pytest.mark.parametrize(("rows", "features", "outputs"), [(1, 576, 960), (3, 96, 37), (5, 32, 16), (9, 1536, 50)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_int4_kernel_gives_its_arithmetic_to_float_rounding(rows, features, outputs, with_bias):
    weight, bias, inputs = product_case(rows, features, outputs, with_bias=with_bias)
    actual = native.int4_linear(inputs, native.pack_int4_weight(weight), bias, out_features=outputs)
    expected = expected_int4_product(inputs, weight, bias)
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    reference = nn.functional.linear(inputs, weight, bias)
    assert float((actual - reference).abs().max()) < 0.2 * float(reference.abs().max())


@needs_kernel
def test_a_q4_1_block_comes_back_exactly():
    """Weights that are q4_1 blocks already (a float16 scale and minimum, codes 0 to 15 spanning each block), as the
    embedded GGUF file holds them, are packed without a further rounding: read back one input at a time, each
    weight is itself to float rounding (another code would be off by a whole step, 1e-3 of these weights or more)."""
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 64), generator=generator).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    scale = (torch.rand(16, 2, 1, generator=generator) * 0.01).half().float()
    minimum = (-torch.rand(16, 2, 1, generator=generator) * 0.05).half().float()
    weight = (codes.reshape(16, 2, 32) * scale + minimum).reshape(16, 64)
    inputs = torch.zeros(64, 64)
    inputs[torch.arange(64), torch.arange(64)] = 1.0  # each row reads one weight column back
    read = native.int4_linear(inputs, native.pack_int4_weight(weight), None, out_features=16)
    assert float((read.T - weight).abs().max()) <= 1e-6 * float(weight.abs().max())


@needs_kernel
def test_the_int4_op_refuses_what_pack_int4_weight_did_not_make():
    packed_weight = native.pack_int4_weight(torch.randn(20, 64))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.int4_linear(torch.randn(2, 40), packed_weight, None, out_features=20)
    with pytest.raises(RuntimeError, match="packed by pack_int4_weight"):
        native.int4_linear(torch.randn(2, 96), packed_weight, None, out_features=20)
    with pytest.raises(RuntimeError, match="more outputs"):
        native.int4_linear(torch.randn(2, 64), packed_weight, None, out_features=40)
    with pytest.raises(RuntimeError, match="bias"):
        native.int4_linear(torch.randn(2, 64), packed_weight, torch.zeros(3), out_features=20)


def attention_inputs(rows: int, columns: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SmolLM2's heads (9 query heads on 3 key heads of 64): keys and values as views of a larger cache buffer."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, 9, 1, 64, generator=generator)
    keys = torch.randn(rows, 3, columns + 40, 64, generator=generator)[:, :, :columns]
    values = torch.randn(rows, 3, columns + 40, 64, generator=generator)[:, :, :columns]
    return query, keys, values


@needs_kernel
@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (1, 100), (4, 37), (16, 150)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_gives_torchs_to_rounding(rows, columns, masked):
    query, keys, values = attention_inputs(rows, columns, seed=rows * columns)
    mask = None
    if masked:
        mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
        mask[0, ..., : columns // 3] = False  # a left-padded row
        mask[0, ..., -1] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    actual = native.one_query_attention(query, keys, values, mask, 0.125)
    assert actual.shape == (rows, 1, 9, 64)
    assert float((actual - expected).abs().max()) < 1e-5


@needs_kernel
def test_one_query_attention_gives_a_row_the_same_bits_alone_in_a_batch_and_on_any_thread_count():
    query, keys, values = attention_inputs(6, 90, seed=5)
    mask = torch.rand(6, 1, 1, 90, generator=torch.Generator().manual_seed(1)) > 0.3
    threads = torch.get_num_threads()
    together = native.one_query_attention(query, keys, values, mask, 0.125)
    try:
        torch.set_num_threads(1)
        single_threaded = native.one_query_attention(query, keys, values, mask, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single_threaded, together)
    for row in range(6):
        alone = native.one_query_attention(
            query[row : row + 1], keys[row : row + 1], values[row : row + 1], mask[row : row + 1], 0.125
        )
        assert torch.equal(alone, together[row : row + 1])


@needs_kernel
def test_one_query_attention_with_nothing_visible_gives_zeros_and_refuses_other_shapes():
    query, keys, values = attention_inputs(2, 10, seed=0)
    hidden = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    hidden[1] = True
    output = native.one_query_attention(query, keys, values, hidden, 0.125)
    assert torch.equal(output[0], torch.zeros(1, 9, 64))
    assert bool(output[1].abs().sum() > 0)
    assert not native.attends(query[..., :40], keys[..., :40], None)  # a head size the kernel does not take
    assert not native.attends(query, keys, torch.zeros(2, 9, 1, 10, dtype=torch.bool))  # a mask per head
    with pytest.raises(RuntimeError, match="boolean"):
        native.one_query_attention(query, keys, values, torch.zeros(2, 1, 1, 10), 0.125)
    with pytest.raises(RuntimeError, match="head size"):
        native.one_query_attention(query[..., :40], keys[..., :40], values[..., :40], None, 0.125)


@needs_kernel
@pytest.mark.parametrize(("scheme", "pack", "own"), LOADS)
def test_attention_blocks_take_the_own_kernel_where_the_products_are_ours(tmp_path, scheme, pack, own):
    directory = build_tiny_model(tmp_path / "tiny")
    model = load_model(str(directory), device="cpu", quantize=scheme, pack_weights=pack).model
    assert getattr(model.model.layers[0].self_attn, native.OWN_ATTENTION, False) is own


def own_layer(scheme: str, *, bias: bool) -> SimpleNamespace:
    """A Llama-style layer's parts on our kernels: two norms, a stacked q/k/v product (6 query heads on 2 key heads
    of 64), the output product, a stacked gate/up product and the down product (96 features, 160 wide)."""
    generator = torch.Generator().manual_seed(7)
    layers = {"int8": int8_layer, "int4": int4_layer, "float32": functools.partial(OwnPackedLinear, keep_weight=False)}
    layer = layers[scheme]

    def product(inputs: int, outputs: int) -> nn.Module:
        linear = nn.Linear(inputs, outputs, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(outputs, inputs, generator=generator) * 0.1)
            if bias:
                linear.bias.copy_(torch.randn(outputs, generator=generator))
        return layer(linear)

    def norm() -> native.OwnRMSNorm:
        return native.OwnRMSNorm(nn.Parameter(torch.rand(96, generator=generator) + 0.5), 1e-5)

    q_proj, k_proj = SimpleNamespace(out_features=6 * 64), SimpleNamespace(out_features=2 * 64)
    gate_proj = SimpleNamespace(out_features=160)
    return SimpleNamespace(
        input_layernorm=norm(),
        post_attention_layernorm=norm(),
        self_attn=SimpleNamespace(q_proj=q_proj, k_proj=k_proj, v_proj=k_proj, o_proj=product(384, 96), head_dim=64),
        mlp=SimpleNamespace(
            gate_proj=gate_proj, up_proj=gate_proj, down_proj=product(160, 96), act_fn=native.OwnSiLU()
        ),
        qkv=product(96, 384 + 2 * 128),
        gate_up=product(96, 2 * 160),
    )


@needs_kernel
@pytest.mark.parametrize("scheme", ["int8", "int4", "float32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("rows", "fed"), [(1, 1), (3, 1), (2, 5)])
def test_our_layer_halves_give_the_compiled_halves_bits(scheme, bias, rows, fed):
    """`own_halves` against the lean pass's TorchScript halves over the same parts: queries, keys, values and the
    layer's output bit for bit, one position or several, a row or a batch."""
    layer = own_layer(scheme, bias=bias)
    attention_block, mlp = layer.self_attn, layer.mlp
    halves = native.own_halves(layer, [layer.qkv], [layer.gate_up])
    assert halves is not None
    own_input, own_output = halves
    compiled_input = script(AttentionInput(layer.input_layernorm, [layer.qkv], attention_block))
    compiled_output = script(LayerOutput(attention_block.o_proj, layer.post_attention_layernorm, [layer.gate_up], mlp))
    assert compiled_input is not None
    assert compiled_output is not None
    generator = torch.Generator().manual_seed(rows * fed)
    hidden = torch.randn(rows, fed, 96, generator=generator) * 3
    angles = torch.rand(rows, fed, 64, generator=generator) * 6
    cos, sin = angles.cos().unsqueeze(2), signed_sines(angles.sin()).unsqueeze(2)
    attended = torch.randn(rows, fed, 6, 64, generator=generator)
    with torch.inference_mode():
        for mine, theirs in zip(own_input(hidden, cos, sin), compiled_input(hidden, cos, sin), strict=True):
            assert mine.shape == theirs.shape
            assert torch.equal(mine, theirs)
        assert torch.equal(own_output(hidden, attended), compiled_output(hidden, attended))


@needs_kernel
def test_layer_halves_are_ours_only_where_every_part_is():
    """A torch norm, a float product, or q/k/v not stacked: `own_halves` leaves the layer to the compiled halves."""
    layer = own_layer("int8", bias=False)
    assert native.own_halves(layer, [layer.qkv], [layer.gate_up]) is not None
    assert native.own_halves(layer, [layer.qkv, layer.qkv, layer.qkv], [layer.gate_up]) is None
    assert native.own_halves(layer, [layer.qkv], [nn.Linear(96, 320)]) is None
    layer.mlp.down_proj = nn.Linear(160, 96)
    assert native.own_halves(layer, [layer.qkv], [layer.gate_up]) is None
    layer = own_layer("int8", bias=False)
    layer.mlp.act_fn = nn.SiLU()  # torch's, which rounds otherwise than ours
    assert native.own_halves(layer, [layer.qkv], [layer.gate_up]) is None
    layer = own_layer("int8", bias=False)
    layer.input_layernorm = LlamaRMSNorm(96)
    assert native.own_halves(layer, [layer.qkv], [layer.gate_up]) is None
    assert native.product_parts(nn.Linear(4, 4)) is None


@needs_kernel
@pytest.mark.parametrize(("rows", "features", "outputs"), [(1, 576, 960), (3, 70, 37), (5, 16, 16), (9, 33, 50)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_float_kernel_gives_the_product_to_rounding(rows, features, outputs, with_bias):
    weight, bias, inputs = product_case(rows, features, outputs, with_bias=with_bias)
    expected = inputs.double() @ weight.double().T + (0 if bias is None else bias.double())
    actual = native.float_linear(inputs, native.pack_float_weight(weight), bias, out_features=outputs)
    assert actual.shape == (rows, outputs)
    scale = (inputs.double().abs() @ weight.double().abs().T).amax(dim=-1, keepdim=True) + 1
    assert float(((actual.double() - expected).abs() / scale).max()) < 1e-6


@needs_kernel
def test_the_float_kernel_gives_a_row_the_same_bits_alone_in_any_batch_and_on_any_thread_count():
    weight, bias, inputs = product_case(11, 1536, 100, with_bias=True)
    packed_weight = native.pack_float_weight(weight)
    together = native.float_linear(inputs, packed_weight, bias, out_features=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = native.float_linear(inputs, packed_weight, bias, out_features=100)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, together)
    for start, end in ((0, 1), (3, 4), (2, 7), (10, 11)):
        alone = native.float_linear(inputs[start:end], packed_weight, bias, out_features=100)
        assert torch.equal(alone, together[start:end])


@needs_kernel
def test_the_float_op_refuses_what_pack_float_weight_did_not_make():
    weight = torch.randn(40, 64)
    with pytest.raises(RuntimeError, match="pack_float_weight"):
        native.float_linear(torch.randn(2, 64), weight, None, out_features=40)
    with pytest.raises(RuntimeError, match="pack_float_weight"):
        native.float_linear(torch.randn(2, 48), native.pack_float_weight(weight), None, out_features=40)
    with pytest.raises(RuntimeError, match="more outputs"):
        native.float_linear(torch.randn(2, 64), native.pack_float_weight(weight), None, out_features=64)


@needs_kernel
@pytest.mark.parametrize("size", [1, 15, 16, 1536, 40000])
def test_own_silu_gives_torchs_to_rounding_and_each_element_the_same_bits_anywhere(size):
    inputs = torch.randn(size, generator=torch.Generator().manual_seed(size)) * 30
    inputs[0] = -200.0
    own = native.OwnSiLU()(inputs)
    expected = torch.nn.functional.silu(inputs.double())
    assert bool(((own.double() - expected).abs() <= 1e-6 * expected.abs() + 1e-30).all())
    assert torch.equal(own[1:], native.OwnSiLU()(inputs[1:]))  # every element at another lane
    assert torch.equal(own.view(1, -1), native.OwnSiLU()(inputs.view(1, -1)))


@needs_kernel
def test_own_activations_replace_silu_modules_only():
    model = nn.Sequential(nn.SiLU(), nn.GELU(), nn.Sequential(nn.SiLU()))
    assert native.use_own_activations(model) == 2
    assert [type(m) for m in model] == [native.OwnSiLU, nn.GELU, nn.Sequential]
    assert isinstance(model[2][0], native.OwnSiLU)


KERNEL_CASES = """
import torch
from adapters.huggingface import native

assert native.unavailable() is None, native.unavailable()  # builds and loads our kernels
generator = torch.Generator().manual_seed(4)
weight, bias = torch.randn(90, 576, generator=generator), torch.randn(90, generator=generator)
inputs = torch.randn(5, 576, generator=generator)
query = torch.randn(3, 9, 1, 64, generator=generator)
key, value = torch.randn(3, 3, 40, 64, generator=generator), torch.randn(3, 3, 40, 64, generator=generator)
mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
mask[1, ..., :7] = False
results = {
    "float": native.float_linear(inputs, native.pack_float_weight(weight), bias, out_features=90),
    "int8": native.int8_linear(inputs, *native.pack_int8_weight(weight), bias, out_features=90),
    "int4": native.int4_linear(inputs, native.pack_int4_weight(weight), bias, out_features=90),
    "norm": native.OwnRMSNorm(torch.nn.Parameter(weight[0]), 1e-5)(inputs),
    "silu": native.OwnSiLU()(inputs[:, :333] * 10),
    "attention": native.one_query_attention(query, key, value, mask, 0.125),
}
"""
"""Every kernel of ours on a few inputs (`results`): what the AVX2 and the AVX-512 builds must give alike."""

AVX2_RUN = """
import json, sys, torch
from adapters.huggingface import native
from adapters.huggingface.loading import load_model

exec(sys.argv[3])  # KERNEL_CASES: every kernel on the same inputs, saved for the parent to compare
torch.save(results, sys.argv[2])
scheme = sys.argv[4]
model = load_model(sys.argv[1], device="cpu", quantize=scheme).model
from adapters.huggingface.engine import attention
from adapters.huggingface.engine.decoder import LeanDecoder
from adapters.huggingface.engine.forward import Forward
attention.install()
forward = Forward(model)
decoder = LeanDecoder.for_model(model, forward.model_step, forward.model_pass)
ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
with torch.inference_mode():
    tokens = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
print(json.dumps({
    "isa": native.isa(),
    "lean": None if decoder is None else [decoder.compiled_layers(), decoder.own_layers(), decoder.one_op_steps()],
    "own_norms": isinstance(model.model.norm, native.OwnRMSNorm),
    "tokens": tokens.tolist(),
}))
"""


@pytest.mark.skipif(
    not (cpu_flags() or frozenset()) >= native.AVX2_FEATURES or shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="no AVX2, FMA and F16C, or no compiler",
)
@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_the_avx2_build_runs_every_kernel_and_gives_the_avx512_bits(tmp_path, scheme):
    """``HF_OPENAI_SERVER_NATIVE=avx2`` (what a CPU without AVX-512 VNNI takes): the whole lean path on our kernels
    (one op a step), the AVX-512 build's bits from every kernel, and its greedy tokens, where that build runs here."""
    directory = build_tiny_model(tmp_path / "tiny", hidden_size=256)
    saved = tmp_path / "results.pt"
    environment = {**os.environ, native.DISABLE: native.ONLY_AVX2}
    run = subprocess.run(
        [sys.executable, "-c", AVX2_RUN, str(directory), str(saved), KERNEL_CASES, scheme],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    layers = 2
    assert found["isa"] == "AVX2"
    assert found["lean"] == [layers, layers, True]
    assert found["own_norms"] is True
    if native.unavailable() is None:  # this process's build (AVX-512 VNNI where the CPU has it)
        cases: dict[str, Any] = {}
        exec(KERNEL_CASES, cases)  # the same source the subprocess ran
        theirs = torch.load(saved)
        assert {name: torch.equal(theirs[name], ours) for name, ours in cases["results"].items()} == dict.fromkeys(
            theirs, True
        )
        model = load_model(str(directory), device="cpu", quantize=scheme).model
        with torch.inference_mode():
            tokens = model.generate(
                torch.tensor([[1, 50, 60, 70, 80, 90]]), max_new_tokens=20, min_new_tokens=20, do_sample=False
            )
        assert found["tokens"] == tokens.tolist()
