"""Prepacked linear layers (oneDNN's, or our own float32 kernel's where it builds): the same model, the same greedy
tokens, no extra memory for unshared weights."""

from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn
from transformers import AutoModelForCausalLM

from adapters.huggingface import native
from adapters.huggingface.loading import load_model
from adapters.huggingface.packing import (
    PACKED_LAYERS,
    OwnPackedLinear,
    PackedLinear,
    own_packing,
    pack_linear_layers,
    packing_supported,
)
from tests.tiny_model import build_tiny_model, tied_tiny_llama

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32), reason="oneDNN is not available here")

KERNELS = [
    pytest.param(PackedLinear, id="oneDNN"),
    pytest.param(
        OwnPackedLinear,
        id="own",
        marks=pytest.mark.skipif(native.unavailable() is not None, reason="no float kernel of our own here"),
    ),
]
"""The two packed float layers: oneDNN's everywhere, ours where our kernels build."""


def pack_with(model: nn.Module, layer: type[nn.Module]) -> int:
    """`pack_linear_layers` with ``layer``'s kernel."""
    return pack_linear_layers(model, own=lambda _: layer is OwnPackedLinear)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-packing"))


def load(model_dir, **kwargs) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, *PACKED_LAYERS))]


@pytest.mark.parametrize("layer", KERNELS)
def test_every_linear_layer_is_packed_and_the_logits_agree(model_dir, layer):
    plain, packed = load(model_dir), load(model_dir)
    count = pack_with(packed, layer)
    assert count == len(linears(plain)) > 0
    assert all(type(m) is layer for m in linears(packed))
    ids = torch.randint(0, 400, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, actual = plain(ids).logits, packed(ids).logits
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", KERNELS)
def test_greedy_generation_is_token_for_token_the_same(model_dir, layer):
    plain, packed = load(model_dir), load(model_dir)
    pack_with(packed, layer)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.inference_mode():
        expected = plain.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
        actual = packed.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("in_features", [64, 576, 1536, 2048])
def test_a_row_is_multiplied_the_same_alone_and_among_others(in_features, kind):
    """Bit for bit: a decoding step at batch 1 multiplies one row, a verifying pass or a batch several. (oneDNN takes
    another path for one row of more than 1024 inputs on some CPUs, which `PackedLinear` steps around.)"""
    layer = kind(nn.Linear(in_features, 96), keep_weight=False)
    inputs = torch.randn(6, 1, in_features, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        together = layer(inputs)
        for count in (1, 2, 3):
            assert torch.equal(layer(inputs[:count]), together[:count]), count
        assert torch.equal(layer(inputs[0, 0]), together[0, 0])  # one row without leading dimensions
    assert layer(inputs[:1]).shape == (1, 1, 96)


@pytest.mark.parametrize("layer", KERNELS)
def test_unshared_weights_are_released_and_a_tied_one_is_kept(layer):
    model = tied_tiny_llama(100)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        expected = model(ids).logits
    pack_with(model, layer)
    assert isinstance(model.lm_head, layer)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the embedding still needs it
    projection = model.model.layers[0].self_attn.q_proj
    assert isinstance(projection, layer)
    assert projection.weight.device.type == "meta"  # only its shape and dtype are left
    assert "weight" not in dict(projection.named_parameters())
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_bfloat16_layers_are_packed_where_onednn_runs_them_and_left_alone_elsewhere(model_dir):
    # oneDNN packs bfloat16 only on CPUs with avx512bw/vl/dq or avx_ne_convert: test what this CPU does.
    model = load(model_dir, dtype=torch.bfloat16)
    supported = packing_supported(torch.bfloat16)
    with capture_logs() as logs:
        count = pack_linear_layers(model)
    assert count == (len(linears(model)) if supported else 0)
    if not supported:
        assert {type(m) for m in linears(model)} == {nn.Linear}
        assert "model.pack.unavailable" in [e["event"] for e in logs]
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_where_the_probe_says_no_the_model_keeps_its_layers_and_the_fallback_is_logged(model_dir, dtype):
    model = load(model_dir, dtype=dtype)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        expected = model(ids).logits
    with capture_logs() as logs:
        assert pack_linear_layers(model, supported=lambda _: False, own=lambda _: False) == 0
    assert {type(m) for m in linears(model)} == {nn.Linear}
    assert [(e["event"], e["log_level"]) for e in logs] == [("model.pack.unavailable", "info")]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)


def test_float16_and_meta_models_are_left_alone(model_dir):
    half = load(model_dir, dtype=torch.float16)
    assert pack_linear_layers(half) == 0
    assert all(type(m) is nn.Linear for m in linears(half))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    assert pack_linear_layers(meta) == 0


def test_loading_packs_on_the_cpu_unless_asked_not_to(model_dir):
    packed = load_model(str(model_dir), device="cpu", progress=False)
    plain = load_model(str(model_dir), device="cpu", progress=False, pack_weights=False)
    assert {type(m) for m in linears(packed.model)} == {OwnPackedLinear if own_packing(torch.float32) else PackedLinear}
    assert {type(m) for m in linears(plain.model)} == {nn.Linear}


def test_the_packing_probe_leaves_the_global_random_state_alone():
    torch.manual_seed(287)
    state = torch.get_rng_state()
    assert packing_supported(torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
