"""Quantized linear layers: close to float, through both generators, chosen from flags and the GGUF file's types."""

from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from adapters.huggingface import native
from adapters.huggingface.cpu_features import cpu_flags
from adapters.huggingface.engine import BatchingGenerator, BatchLimits
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.loading import gguf_weight_types, load_model
from adapters.huggingface.packing import PACKED_LAYERS, packing_supported
from adapters.huggingface.quantization import (
    INT4_LAYERS,
    INT8_LAYERS,
    Int8Linear,
    NativeInt8Linear,
    Quantization,
    QuantizationError,
    int8_reduce_range,
    kernel_works,
    prepare_linear_layers,
    quantize_linear_layers,
    resolve_quantization,
)
from domain.generation import GenerationParams
from entrypoints.bootstrap import load_engine
from entrypoints.http.__main__ import parse_settings
from tests.test_huggingface_generator import collect, tokens_of
from tests.tiny_model import build_tiny_model, tied_tiny_llama

CPU = torch.device("cpu")
needs_int8 = pytest.mark.skipif(not kernel_works("int8"), reason="no int8 CPU kernel in this torch")
needs_int4 = pytest.mark.skipif(not kernel_works("int4"), reason="no int4 CPU kernel in this torch")
INT8_KINDS = [Int8Linear] + ([NativeInt8Linear] if native.unavailable() is None else [])
"""FBGEMM's int8 layer, and ours where it builds here (`tests/test_native.py` tests the kernel itself)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-quantization"))


def load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 400, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(ids).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@needs_int8
def test_int8_replaces_every_linear_layer_and_the_logits_stay_close(model_dir):
    plain, quantized = load(model_dir), load(model_dir)
    count = quantize_linear_layers(quantized, "int8")
    assert count == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert isinstance(quantized.lm_head, INT8_LAYERS)
    assert relative_error(logits(quantized), logits(plain)) < 0.05


@needs_int8
@pytest.mark.parametrize("kind", INT8_KINDS)
def test_int8_gives_each_token_its_own_input_scale(kind):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    inputs = torch.randn(4, 64)
    inputs[0] *= 1000  # one token with huge activations, as a text's first token often has
    with torch.no_grad():
        actual, expected = kind(linear)(inputs), linear(inputs)
    for row in range(4):
        assert relative_error(actual[row], expected[row]) < 0.05


@needs_int8
@pytest.mark.parametrize("kind", INT8_KINDS)
def test_an_int8_token_gets_the_same_product_alone_and_in_any_batch(kind):
    torch.manual_seed(0)
    layer = kind(nn.Linear(64, 48))
    token = torch.randn(1, 64) * 0.1
    others = torch.randn(5, 64) * torch.tensor([30.0, -7.0, 0.01, 2.0, 500.0]).unsqueeze(1)
    with torch.no_grad():
        alone = layer(token)
        batched = layer(torch.cat([others[:2], token, others[2:]]))[2:3]
        prompt = layer(torch.cat([others, token]).unsqueeze(0))[0, -1:]
    assert torch.equal(batched, alone)
    assert torch.equal(prompt, alone)


@needs_int8
@pytest.mark.parametrize("kind", INT8_KINDS)
def test_int8_keeps_a_zero_row_zero_plus_bias(kind):
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        outputs = kind(linear)(torch.zeros(2, 16))
    assert torch.allclose(outputs, linear.bias.detach().expand(2, 8))


@needs_int4
def test_int4_replaces_every_linear_layer_and_the_logits_stay_close(model_dir):
    plain, quantized = load(model_dir), load(model_dir)
    quantize_linear_layers(quantized, "int4")
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert isinstance(quantized.model.layers[0].mlp.down_proj, INT4_LAYERS)
    assert isinstance(quantized.lm_head, INT8_LAYERS)  # 8 bits, as GGUF's 4-bit files keep their output
    assert relative_error(logits(quantized), logits(plain)) < 0.2


@needs_int8
def test_a_tied_embedding_keeps_its_float_weight_and_only_the_output_product_is_quantized():
    model = tied_tiny_llama(96)
    embedding = model.model.embed_tokens.weight.detach().clone()
    expected = logits_of(model)
    quantize_linear_layers(model, "int8")
    assert isinstance(model.lm_head, INT8_LAYERS)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert relative_error(logits_of(model), expected) < 0.05


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([[1, 5, 9, 40, 2]])).logits


@needs_int8
def test_quantized_layers_are_never_packed_and_float_ones_are(model_dir):
    quantized, packed = load(model_dir), load(model_dir)
    prepare_linear_layers(quantized, Quantization("int8", "test"), pack=True)
    prepare_linear_layers(packed, Quantization("none", "test"), pack=True)
    assert not any(isinstance(m, PACKED_LAYERS) for m in quantized.modules())
    assert any(isinstance(m, INT8_LAYERS) for m in quantized.modules())
    assert not any(isinstance(m, INT8_LAYERS) for m in packed.modules())
    if packing_supported(torch.float32):
        assert any(isinstance(m, PACKED_LAYERS) for m in packed.modules())


@needs_int8
def test_int8_generation_runs_through_the_batching_engine_and_the_plain_generator(model_dir):
    loaded = load_model(str(model_dir), device="cpu", quantize="int8")
    assert loaded.quantization.scheme == "int8"
    assert isinstance(loaded.model.lm_head, INT8_LAYERS)
    plain = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id)
    engine = BatchingGenerator(
        HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id), BatchLimits(max_batch_size=4)
    )
    params = GenerationParams(temperature=0, max_new_tokens=12, options={"min_new_tokens": 12})
    prompt = loaded.tokenizer("the cat sees the river")["input_ids"]

    async def tokens(generator):
        return [token async for step in generator.generate(prompt, params) for token in step.token_ids]

    async def run():
        alone = await tokens(plain)
        together = await asyncio.gather(*(tokens(engine) for _ in range(3)))
        return alone, together

    try:
        alone, together = asyncio.run(run())
    finally:
        engine.close()
        plain.close()
    assert len(alone) == 12
    assert all(len(one) == 12 for one in together)


@pytest.mark.parametrize(
    ("requested", "types", "dtype_requested", "scheme"),
    [
        (None, (), False, "none"),
        (None, ("F32",), False, "none"),
        (None, ("Q8_0",), False, "int8"),
        (None, ("Q4_1", "Q8_0"), False, "int4" if native.unavailable() is None else "int8"),
        (None, ("Q4_K", "Q6_K"), False, "int4" if native.unavailable() is None else "int8"),
        (None, ("Q5_K", "Q8_0"), False, "int8"),
        (None, ("Q8_0",), True, "none"),
        ("none", ("Q8_0",), False, "none"),
        ("int4", ("Q8_0",), False, "int4"),
        ("int8", (), True, "int8"),
    ],
)
def test_the_scheme_follows_the_flag_then_dtype_then_the_gguf_files_types(requested, types, dtype_requested, scheme):
    if scheme != "none" and not kernel_works(scheme):
        pytest.skip(f"no {scheme} CPU kernel in this torch")
    chosen = resolve_quantization(
        requested, device=CPU, dtype=torch.float32, dtype_requested=dtype_requested, gguf_weight_types=types
    )
    assert chosen.scheme == scheme
    assert chosen.reason


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_on_cuda_is_refused_at_start_up_with_what_to_do(scheme):
    with pytest.raises(QuantizationError, match="--device cpu"):
        resolve_quantization(scheme, device=torch.device("cuda"), dtype=torch.float16, dtype_requested=False)


def test_a_quantized_gguf_on_cuda_is_served_in_float():
    chosen = resolve_quantization(
        None, device=torch.device("cuda"), dtype=torch.bfloat16, dtype_requested=False, gguf_weight_types=("Q8_0",)
    )
    assert chosen.scheme == "none"


def test_quantizing_with_a_half_precision_dtype_is_refused():
    with pytest.raises(QuantizationError, match="--dtype bfloat16"):
        resolve_quantization("int8", device=CPU, dtype=torch.bfloat16, dtype_requested=True)


def test_an_unknown_scheme_is_refused():
    with pytest.raises(QuantizationError, match="int8"):
        resolve_quantization("int3", device=CPU, dtype=torch.float32, dtype_requested=False)


@pytest.mark.parametrize(
    ("flag", "expected"), [([], None), (["--quantize", "INT8"], "int8"), (["--quantize", "none"], "none")]
)
def test_the_quantize_flag_parses_into_the_settings(flag, expected):
    assert parse_settings(flag, environ={}).quantize == expected


def test_an_unknown_quantize_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--quantize", "fp8"], environ={})
    assert "--quantize" in capsys.readouterr().err


def test_the_gguf_files_matrix_types_decide_the_default(tmp_path):
    path = tmp_path / "tiny-q8_0.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    weight = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    types = gguf_weight_types(path)
    assert types == {"Q8_0"}
    chosen = resolve_quantization(None, device=CPU, dtype=torch.float32, dtype_requested=False, gguf_weight_types=types)
    assert chosen.scheme == "int8"
    assert "Q8_0" in chosen.reason
    assert "--quantize none" in chosen.reason


@pytest.mark.parametrize(
    ("flag", "expected"), [([], 4), (["--speculative-tokens", "2"], 2), (["--speculative-tokens", "0"], 0)]
)
def test_speculation_is_on_by_default(flag, expected):
    assert parse_settings(flag, environ={}).speculative_tokens == expected


@needs_int8
def test_a_served_int8_model_speculates_by_default(model_dir):
    engine = load_engine(parse_settings(["--model", str(model_dir), "--quantize", "int8"], environ={}))
    try:
        assert engine.generator.speculation.tokens == 4
    finally:
        engine.generator.close()


@needs_int8
def test_int8_speculation_leaves_each_request_alone_decoding_as_without_it(tmp_path):
    """A verifying pass attends one new position at a time, so an 8-bit step rounds as the one-token steps would."""
    model_dir = build_tiny_model(tmp_path / "tiny", hidden_size=256)  # heads of 64 dimensions, as SmolLM2's

    def engine(tokens: int) -> BatchingGenerator:
        flags = ["--model", str(model_dir), "--quantize", "int8", "--speculative-tokens", str(tokens)]
        return load_engine(parse_settings(flags, environ={})).generator

    speculating, plain = engine(4), engine(0)
    texts = [
        "The cat eats an apple. The cat eats an apple. The cat",
        "def add(a, b):\n    return a + b\ndef add(a, b):\n",
        "one two three four one two three four one two",
        "Hello there",
    ]
    params = GenerationParams(temperature=0, max_new_tokens=40)
    try:
        for text in texts:
            ids = plain.encode(text, add_special_tokens=True)
            assert tokens_of(collect(speculating, ids, params)) == tokens_of(collect(plain, ids, params))
        assert speculating.drafts.totals()[1] > 0
    finally:
        speculating.close()
        plain.close()


@pytest.mark.parametrize(
    ("flags", "reduce"),
    [(frozenset({"avx2", "avx512f", "avx512_vnni"}), False), (frozenset({"avx2", "avx512f"}), True), (None, True)],
)
def test_int8_inputs_take_all_8_bits_only_where_the_product_sums_in_32_bits(flags, reduce):
    assert int8_reduce_range(flags) is reduce


@needs_int8
def test_the_int8_product_does_not_saturate_with_the_inputs_it_takes_on_this_cpu():
    """Every input and weight at the top of its range, of one sign: a kernel that sums pairs of products in 16 bits
    (no VNNI) saturates on these with 8-bit inputs, so the range chosen for this CPU must keep the sums exact."""
    linear = nn.Linear(576, 64, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        inputs = torch.ones(2, 576)
        inputs[:, :2] = -1.0
        expected = linear(inputs)
        actual = Int8Linear(linear, reduce_range=int8_reduce_range(cpu_flags()))(inputs)
    assert (actual - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_kernel_probe_answers_the_same_whatever_the_global_random_state_and_leaves_it_alone(scheme):
    answers = set()
    for seed in (0, 287):  # at 287, a probe drawn from the global generator once put int4 past its bound
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        answers.add(kernel_works(scheme))
        assert torch.equal(torch.get_rng_state(), state)
    assert len(answers) == 1


def test_a_4_bit_gguf_is_served_at_8_bits_where_our_kernels_do_not_build(monkeypatch):
    monkeypatch.setattr(native, "unavailable", lambda: "the CPU lacks avx512_vnni")
    if not kernel_works("int8"):
        pytest.skip("no int8 CPU kernel in this torch")
    chosen = resolve_quantization(
        None, device=CPU, dtype=torch.float32, dtype_requested=False, gguf_weight_types=("Q4_1", "Q8_0")
    )
    assert chosen.scheme == "int8"
    assert "8 bits" in chosen.reason
