"""Canaries for the private library hooks the compat modules wrap: each fails naming the hook that moved.

When one fails after a library upgrade, mend the one wrapper in ``*_compat.py`` it names (or keep the library below
that release in ``pyproject.toml``); nothing else in the project touches these names.
"""

from __future__ import annotations

import contextvars
import inspect
import re
import socket
from pathlib import Path

import httpx
import pytest
import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from adapters.huggingface import torch_compat, transformers_compat
from adapters.huggingface.loading import load_model
from tests.live_server import assert_counted_as_gone
from tests.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("domain", "application", "adapters", "entrypoints")


def hook(owner: object, name: str, *parameters: str) -> None:
    """``owner.name`` exists and takes ``parameters`` by those names."""
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    assert hasattr(owner, name), f"{where} is gone: mend its wrapper in the compat module"
    if parameters:
        accepted = inspect.signature(getattr(owner, name)).parameters
        missing = [p for p in parameters if p not in accepted]
        assert not missing, f"{where} no longer takes {missing}: mend its wrapper in the compat module"


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("_prepare_generation_config", ("generation_config",)),
        ("_prepare_special_tokens", ("generation_config", "kwargs_has_attention_mask", "device")),
        (
            "_get_logits_processor",
            (
                "generation_config",
                "input_ids_seq_length",
                "encoder_input_ids",
                "logits_processor",
                "device",
                "model_kwargs",
            ),
        ),
        ("_get_stopping_criteria", ("generation_config", "stopping_criteria", "tokenizer")),
        ("_prefill", ()),
        ("_update_model_kwargs_for_generation", ("outputs", "model_kwargs", "is_encoder_decoder")),
    ],
)
def test_transformers_generate_helpers_are_where_the_compat_module_calls_them(name, parameters):
    hook(GenerationMixin, name, *parameters)


def test_transformers_causal_mask_is_what_the_compat_module_calls():
    """The lean prefill builds its attention mask with the function and keywords Llama's forward uses."""
    from transformers import masking_utils  # noqa: PLC0415
    from transformers.models.llama import modeling_llama  # noqa: PLC0415

    hook(masking_utils, "create_causal_mask", "config", "inputs_embeds", "attention_mask", "cache", "position_ids")
    assert modeling_llama.create_causal_mask is masking_utils.create_causal_mask, "Llama builds its mask otherwise"


def test_transformers_dynamic_layer_keeps_the_members_the_growing_layer_relies_on():
    for name in ("update", "lazy_initialization", "get_seq_length"):
        hook(DynamicLayer, name)
    layer = DynamicLayer()  # type: ignore[no-untyped-call]
    assert hasattr(layer, "is_initialized"), "DynamicLayer.is_initialized is gone: mend GrowingLayer"
    keys = torch.zeros(1, 2, 3, 4)
    layer.update(keys, keys)
    assert torch.equal(layer.keys, keys), "DynamicLayer.keys no longer holds the cached keys: mend GrowingLayer"
    assert torch.equal(layer.values, keys), "DynamicLayer.values no longer holds the cached values: mend GrowingLayer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny-compat"))), device="cpu", progress=False)


def test_the_transformers_wrappers_build_what_generate_builds(tiny):
    model = tiny.model
    config = transformers_compat.prepare_generation_config(model, GenerationConfig(max_new_tokens=4, do_sample=True))
    assert isinstance(config, GenerationConfig)
    transformers_compat.prepare_special_tokens(model, config)
    assert transformers_compat.eos_token_tensor(config) is not None, "GenerationConfig._eos_token_tensor is gone"
    transformers_compat.pad_token_tensor(config)
    ids = torch.tensor([[1, 5, 6, 7]])
    config.max_length = 8
    processors = transformers_compat.logits_processors(model, config, ids, LogitsProcessorList())
    assert isinstance(processors, LogitsProcessorList)
    assert processors, "generate's processors for a sampled request (top_k=50...) are missing"
    stopping = transformers_compat.stopping_criteria(model, config, tiny.tokenizer)
    assert isinstance(stopping, StoppingCriteriaList)
    assert stopping, "generate's stopping criteria (max length, EOS) are missing"


def test_the_growing_cache_stands_in_for_the_models_own(tiny):
    assert transformers_compat.has_plain_layers(tiny.model.config)
    cache = transformers_compat.growing_cache(tiny.model.config)
    assert all(type(layer) is transformers_compat.GrowingLayer for layer in transformers_compat.cache_layers(cache))
    with torch.inference_mode():
        tiny.model(torch.tensor([[1, 5, 6]]), cache=cache, use_cache=True)
        tiny.model(torch.tensor([[7]]), cache=cache, use_cache=True)
    keys, values = transformers_compat.layer_kv(transformers_compat.cache_layers(cache)[0])
    assert keys.shape[-2] == values.shape[-2] == 4
    assert cache.get_seq_length() == 4


def test_torch_module_hooks_are_where_the_compat_module_reads_them():
    """The lean decoder leaves a model to its own forward while a hook waits on a module it bypasses."""
    layer, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    watch = torch_compat.forward_hooks_watch([layer, other])  # made before the hooks: torch fills its dictionaries
    assert not watch()
    for register in (torch.nn.Module.register_forward_hook, torch.nn.Module.register_forward_pre_hook):
        for options in ({}, {"prepend": True}, {"with_kwargs": True}):
            handle = register(other, lambda *_, **__: None, **options)
            assert watch(), f"{register.__name__}({options}) is not seen: mend torch_compat"
            assert torch_compat.forward_hooks_watch([other])()
            handle.remove()
            assert not watch()
    for register_global in (
        torch.nn.modules.module.register_module_forward_hook,
        torch.nn.modules.module.register_module_forward_pre_hook,
    ):
        handle = register_global(lambda *_: None)
        try:
            assert watch(), f"{register_global.__name__} is not seen: mend torch_compat"
        finally:
            handle.remove()


def test_torch_module_children_are_where_the_compat_module_watches_them():
    """The lean decoder plans its layers again when a part is set anew (LoRA wraps parts at run time)."""
    block = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    watch = torch_compat.children_watch([block])
    assert not watch()
    block[1] = block[1]  # the same module again: nothing changed
    assert not watch()
    block[1] = torch.nn.GELU()
    assert watch(), "a replaced child is not seen: mend torch_compat"
    watch = torch_compat.children_watch([block])
    block.extra = torch.nn.Identity()
    assert watch(), "a new child is not seen: mend torch_compat"
    watch = torch_compat.children_watch([block])
    del block.extra
    assert watch(), "a removed child is not seen: mend torch_compat"


def test_torch_onednn_ops_are_where_the_compat_module_calls_them():
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        pytest.skip("this torch has no oneDNN: packing is off here")
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        assert hasattr(torch.ops.mkldnn, name), f"torch.ops.mkldnn.{name} is gone: mend torch_compat"
    linear = torch.nn.Linear(8, 6)
    inputs = torch.randn(2, 8)
    packed = torch_compat.reorder_linear_weight(linear.weight.detach())
    with torch.no_grad():
        actual = torch_compat.linear_pointwise(inputs, packed, linear.bias.detach())
        expected = linear(inputs)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5), "mkldnn._linear_pointwise changed its meaning"


def test_torch_quantized_linear_ops_are_where_the_compat_module_calls_them():
    engines = torch.backends.quantized.supported_engines
    if not {"fbgemm", "x86"} & set(engines):
        pytest.skip(f"no FBGEMM in this torch ({engines}): --quantize int8 is refused here")
    for name in ("linear_prepack", "linear_dynamic"):
        assert hasattr(torch.ops.quantized, name), f"torch.ops.quantized.{name} is gone: mend torch_compat"
    assert hasattr(torch, "quantize_per_channel"), "torch.quantize_per_channel is gone: mend torch_compat"
    linear = torch.nn.Linear(64, 24)
    inputs = torch.randn(3, 64)
    packed = torch_compat.pack_int8_dynamic_weight(linear.weight.detach(), linear.bias.detach())
    with torch.no_grad():
        actual, expected = torch_compat.linear_int8_dynamic(inputs, packed, reduce_range=True), linear(inputs)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 0.05 * expected.abs().max(), "quantized::linear_dynamic changed"


def test_torch_int4_cpu_ops_are_where_the_compat_module_calls_them():
    for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
        assert hasattr(torch.ops.aten, name), f"torch.ops.aten.{name} is gone: mend torch_compat"
    linear = torch.nn.Linear(64, 32, bias=False)
    inputs = torch.randn(2, 3, 64)
    packed, scales_and_zeros = torch_compat.pack_int4_weight(linear.weight.detach())
    with torch.no_grad():
        actual, expected = torch_compat.linear_int4(inputs, packed, scales_and_zeros), linear(inputs)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 0.2 * expected.abs().max(), "the int4 CPU kernel changed its meaning"


class Unscriptable(torch.nn.Module):
    """A module TorchScript cannot compile: its forward keeps Python objects."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(object())
        return inputs


def test_torchscript_compiles_the_linear_layers_the_lean_decoder_runs_compiled():
    """The lean decoder compiles each layer's halves with ``torch.jit.script``, which torch deprecates: while it still
    compiles them, they give the numbers their Python forward gives; where it cannot, ``script`` answers ``None``."""
    from adapters.huggingface.packing import PackedLinear  # noqa: PLC0415
    from adapters.huggingface.quantization import Int4Linear, Int8Linear, kernel_works  # noqa: PLC0415

    linear = torch.nn.Linear(64, 32)
    layers = [linear, PackedLinear(linear, keep_weight=False)]
    layers += [Int8Linear(linear)] if kernel_works("int8") else []
    layers += [Int4Linear(linear)] if kernel_works("int4") else []
    inputs = torch.randn(3, 2, 64)
    for layer in layers:
        compiled = torch_compat.script(layer)
        assert compiled is not None, f"TorchScript no longer compiles {type(layer).__name__}: mend torch_compat"
        with torch.inference_mode():
            assert torch.equal(compiled(inputs), layer(inputs)), f"compiled {type(layer).__name__} differs"
            assert torch.equal(compiled(inputs[:1, :1]), layer(inputs[:1, :1]))
    assert torch_compat.script(Unscriptable()) is None


def test_no_module_outside_the_compat_modules_touches_a_librarys_private_names():
    private = re.compile(
        r"(litestar\._\w|torch\.ops\.\w+\._\w|\bmodel\._\w|generation_config\._\w|config\._\w|ray\.[\w.]*\._\w)"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for layer in LAYERS
        for path in sorted((ROOT / layer).rglob("*.py"))
        if not path.name.endswith("_compat.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if private.search(line) and not line.lstrip().startswith(("#", '"', "``"))
    ]
    assert offenders == [], "private library API outside a *_compat.py module"


def test_ray_request_router_keeps_the_members_the_prefix_router_reads():
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from ray.serve.request_router import RequestRouter  # noqa: PLC0415  only with the [ray] extra

    from adapters.ray import ray_compat  # noqa: PLC0415

    hook(RequestRouter, ray_compat.PROBE_QUEUE_LENS, "replicas", "backoff_index")
    for hook_name in ray_compat.HOOKS:
        assert hook_name in inspect.getsource(RequestRouter), f"RequestRouter.{hook_name} is gone: mend ray_compat"
    hook(RequestRouter, "on_request_routed", "pending_request", "replica_id", "result")
    hook(RequestRouter, "update_replicas", "replicas")
    hook(RequestRouter, "choose_replicas", "candidate_replicas", "pending_request")


def test_ray_serve_request_context_keeps_the_internal_id_its_router_files_calls_by():
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    import dataclasses  # noqa: PLC0415

    from ray.serve import context  # noqa: PLC0415  only with the [ray] extra
    from ray.serve._private import default_impl  # noqa: PLC0415
    from ray.serve._private.request_router.request_router import RequestRouter  # noqa: PLC0415

    from adapters.ray import ray_compat  # noqa: PLC0415

    variable = getattr(context, ray_compat.REQUEST_CONTEXT)
    assert isinstance(variable, contextvars.ContextVar), f"ray.serve.context.{ray_compat.REQUEST_CONTEXT} moved"
    fields = {field.name for field in dataclasses.fields(context._RequestContext)}
    assert ray_compat.INTERNAL_REQUEST_ID in fields, "Serve's request context lost its internal id: mend ray_compat"
    assert ray_compat.INTERNAL_REQUEST_ID in inspect.getsource(default_impl.get_request_metadata)
    filing = inspect.getsource(RequestRouter._add_pending_request_to_indices)
    assert "internal_request_id" in filing, "Ray's router files waiting calls differently now: is own_request needed?"


def test_litestar_reports_a_client_that_left_mid_body_as_the_compat_module_reads_it(live_url: str) -> None:
    """``litestar_compat.request_body`` turns Litestar's report into a 499; a 500 here means the report changed."""
    address = httpx.URL(live_url)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port or 80)) as sock:
        sock.sendall(head.encode() + b'{"messages": [')  # a tenth of the body it announced, then it leaves
    assert_counted_as_gone(live_url)
