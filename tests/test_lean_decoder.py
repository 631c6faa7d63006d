"""The engine's lean decoding pass: transformers' logits bit for bit where it runs, transformers' forward elsewhere."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adapters.huggingface import native
from adapters.huggingface.engine import BatchingGenerator, Speculation, attention
from adapters.huggingface.engine.decoder import LeanDecoder, rotate, signed_sines, step_attention_mask
from adapters.huggingface.engine.forward import Forward
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.loading import load_model
from adapters.huggingface.quantization import kernel_works
from adapters.huggingface.transformers_compat import cache_layers, growing_cache, layer_kv
from tests.test_huggingface_generator import ForwardCounter, collect, greedy, tokens_of
from tests.tiny_model import build_tiny_model


class CountingDecoder:
    """Stands in for an engine's `LeanDecoder`, counting the rows of each pass it runs (decoding steps and prefills
    apart)."""

    def __init__(self, decoder: LeanDecoder) -> None:
        self.decoder = decoder
        self.rows: list[int] = []
        self.prefilled: list[int] = []

    @property
    def prefills(self) -> bool:
        return self.decoder.prefills

    def hooked(self) -> bool:
        return self.decoder.hooked()

    def __call__(self, ids: torch.Tensor, *args: object) -> torch.Tensor:
        self.rows.append(ids.shape[0])
        return self.decoder(ids, *args)  # type: ignore[arg-type]

    def prefill(self, ids: torch.Tensor, *args: object, keep: int) -> torch.Tensor:
        self.prefilled.append(ids.shape[0])
        return self.decoder.prefill(ids, *args, keep=keep)  # type: ignore[arg-type]


def counted(generator: BatchingGenerator) -> CountingDecoder:
    """Count the passes ``generator``'s engine runs through its lean decoder (which it must have)."""
    forward = generator._engine.forward
    assert forward.decoder is not None, "the model did not get a lean decoder"
    counter = CountingDecoder(forward.decoder)
    forward.decoder = counter  # type: ignore[assignment]
    return counter


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """SmolLM2's head size (64), so that attention takes the kernels the served model takes."""
    return build_tiny_model(tmp_path_factory.mktemp("lean") / "tiny", hidden_size=256)


TINY_LAYERS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The sizes of the other families' tiny models built here."""

SCHEMES = [
    "none",
    pytest.param("int8", marks=pytest.mark.skipif(not kernel_works("int8"), reason="no int8 CPU kernel")),
    pytest.param("int4", marks=pytest.mark.skipif(not kernel_works("int4"), reason="no int4 CPU kernel")),
]


def lean(directory, scheme: str) -> tuple[torch.nn.Module, Forward, LeanDecoder]:
    """The model at ``directory`` loaded as the server loads it (``scheme``), its engine passes and its lean decoder."""
    model = load_model(str(directory), device="cpu", quantize=scheme).model
    attention.install()
    forward = Forward(model)
    decoder = LeanDecoder.for_model(model, forward.model_step, forward.model_pass)
    assert decoder is not None
    return model, forward, decoder


@pytest.mark.parametrize("scheme", SCHEMES)
def test_steps_and_verifying_passes_give_transformers_logits_bit_for_bit(tiny_dir, scheme):
    """Left-padded rows, one-token steps and a verifying pass, on prepacked float32, int8 and int4 weights."""
    model, forward, decoder = lean(tiny_dir, scheme)
    layers = model.config.num_hidden_layers
    assert decoder.compiled_layers() == layers  # what runs here is the compiled pass
    assert decoder.own_layers() == (layers if native.unavailable() is None else 0)  # float32 is packed for ours
    assert decoder.one_op_steps() is (native.unavailable() is None)  # the steps below take one op for every layer
    ids = torch.randint(3, 390, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs = growing_cache(model.config)
        forward.model_pass(ids[:, :20], positions[:, :20], mask[:, :20], theirs, keep=1)
        mine = copy.deepcopy(theirs)
        for start, fed in ((20, 1), (21, 1), (22, 4), (26, 1), (27, 3)):
            end = start + fed
            arguments = (ids[:, start:end], positions[:, start:end], mask[:, :end])
            expected = forward.model_step(*arguments, theirs)
            actual = decoder(*arguments, mine)
            assert actual.shape == (3, fed, model.config.vocab_size)
            assert torch.equal(actual, expected), (start, fed)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_prefill_gives_transformers_logits_bit_for_bit(tiny_dir, scheme):
    """Rows of other lengths left-padded, then the rest of each prompt after a cached prefix laid out as the engine
    lays out prefix-cache hits (``[zeros | prefix | zeros | rest]``): every position's logits and the cache as
    transformers' forward leaves them."""
    model, forward, decoder = lean(tiny_dir, scheme)
    assert decoder.prefills
    ids = torch.randint(3, 390, (3, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a shorter prefix
    mask[1, 9:12] = 0  # a shorter rest, right-aligned after the prefixes' columns
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs, mine = growing_cache(model.config), growing_cache(model.config)
        for start, end in ((0, 9), (9, 24)):
            arguments = (ids[:, start:end], positions[:, start:end], mask[:, :end])
            expected = forward.model_pass(*arguments, theirs, keep=end - start)
            actual = decoder.prefill(*arguments, mine, keep=end - start)
            assert torch.equal(actual, expected), (start, end)
        for a, b in zip(cache_layers(theirs), cache_layers(mine), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(layer_kv(a), layer_kv(b), strict=True))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_prefill_of_one_position_gives_transformers_logits_bit_for_bit(tiny_dir, scheme):
    """The rest of a prompt can be one token after its cached blocks: one query position under a mask, which
    transformers' forward hands to `attention.one_query` (through `per_query`), and so must the lean prefill."""
    model, forward, decoder = lean(tiny_dir, scheme)
    ids = torch.randint(3, 390, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs, mine = growing_cache(model.config), growing_cache(model.config)
        for start, end in ((0, 9), (9, 10)):
            arguments = (ids[:, start:end], positions[:, start:end], mask[:, :end])
            expected = forward.model_pass(*arguments, theirs, keep=end - start)
            assert torch.equal(decoder.prefill(*arguments, mine, keep=end - start), expected), (start, end)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_on_our_kernels_a_prompt_gives_the_logits_of_decoding_it_token_by_token(tiny_dir, scheme):
    """Where every layer is ours, a prefill attends as one-token steps do: the same bits as stepping the prompt."""
    model, _, decoder = lean(tiny_dir, scheme)
    if not decoder.one_op_steps():
        pytest.skip("our kernels do not build here")
    ids = torch.randint(3, 390, (1, 40), generator=torch.Generator().manual_seed(8))
    mask, positions = torch.ones_like(ids), torch.arange(40)[None]
    with torch.inference_mode():
        whole = decoder.prefill(ids, positions, mask, growing_cache(model.config), keep=40)
        cache = growing_cache(model.config)
        steps = [decoder.prefill(ids[:, :1], positions[:, :1], mask[:, :1], cache, keep=1)]
        steps += [decoder(ids[:, i : i + 1], positions[:, i : i + 1], mask[:, : i + 1], cache) for i in range(1, 40)]
    assert torch.equal(whole, torch.cat(steps, dim=1))


def after_a_prompt(model, forward: Forward, *, seed: int):
    """Two rows prefilled with 10 tokens through transformers' forward: the next step's arguments and two copies
    of the cache (``theirs``, ``mine``)."""
    ids = torch.randint(3, 390, (2, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    positions = torch.arange(11).expand(2, -1)
    with torch.inference_mode():
        theirs = growing_cache(model.config)
        forward.model_pass(ids[:, :10], positions[:, :10], mask[:, :10], theirs, keep=1)
    return (ids[:, 10:11], positions[:, 10:11], mask), theirs, copy.deepcopy(theirs)


class Doubled(torch.nn.Module):
    """Wraps a layer and doubles its output, as a LoRA wrapper changes what a layer gives (and, as that wrapper
    does, passes reads of the layer's attributes on)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_features = inner.out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs) * 2


@pytest.mark.parametrize("part", ["o_proj", "down_proj", "k_proj"])
def test_a_layer_replaced_after_the_first_pass_is_the_one_the_next_pass_calls(tiny_dir, part):
    """The decoder plans each layer once, and again when one of its parts is another module (LoRA wraps layers at
    run time, while requests decode)."""
    model, forward, decoder = lean(tiny_dir, "none")
    arguments, theirs, mine = after_a_prompt(model, forward, seed=4)
    with torch.inference_mode():
        before = decoder(*arguments, copy.deepcopy(mine))
        parent = model.model.layers[1].mlp if part == "down_proj" else model.model.layers[1].self_attn
        setattr(parent, part, Doubled(getattr(parent, part)))
        expected = forward.model_step(*arguments, theirs)
        actual = decoder(*arguments, mine)
    assert not torch.equal(actual, before)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("part", ["o_proj", "down_proj"])
def test_a_prefill_after_a_layer_is_replaced_calls_the_new_layer(tiny_dir, part):
    """A prefill plans the layers anew too: one through every layer's one op must not run the parts it was made of."""
    model, forward, decoder = lean(tiny_dir, "none")
    ids = torch.randint(3, 390, (1, 12), generator=torch.Generator().manual_seed(9))
    arguments = (ids, torch.arange(12)[None], torch.ones_like(ids))
    with torch.inference_mode():
        before = decoder.prefill(*arguments, growing_cache(model.config), keep=12)
        parent = model.model.layers[1].mlp if part == "down_proj" else model.model.layers[1].self_attn
        setattr(parent, part, Doubled(getattr(parent, part)))
        expected = forward.model_pass(*arguments, growing_cache(model.config), keep=12)
        actual = decoder.prefill(*arguments, growing_cache(model.config), keep=12)
    assert not torch.equal(actual, before)
    assert torch.equal(actual, expected)


class Counted(torch.nn.Module):
    """Wraps a layer and counts its calls in a way TorchScript cannot compile (a Python object per call)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_features = inner.out_features
        self.calls: list[object] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls.append(object())
        return self.inner(inputs)


def test_a_layer_with_a_part_torchscript_cannot_compile_runs_in_python(tiny_dir):
    """The other layers stay compiled; that layer calls its parts in Python, and the logits stay transformers'."""
    model, forward, decoder = lean(tiny_dir, "int8" if kernel_works("int8") else "none")
    layers = model.config.num_hidden_layers
    counted_part = Counted(model.model.layers[0].mlp.down_proj)
    model.model.layers[0].mlp.down_proj = counted_part
    arguments, theirs, mine = after_a_prompt(model, forward, seed=5)
    with torch.inference_mode():
        expected = forward.model_step(*arguments, theirs)
        calls = len(counted_part.calls)
        actual = decoder(*arguments, mine)
    assert decoder.compiled_layers() == layers - 1
    assert len(counted_part.calls) == calls + 1
    assert torch.equal(actual, expected)


@pytest.mark.skipif(native.unavailable() is not None, reason="no kernels of our own here")
def test_a_layer_with_another_activation_keeps_the_compiled_halves(tiny_dir):
    """Our layer ops compute our SiLU: a layer whose MLP takes another activation runs its TorchScript halves, the
    others stay ours, and the logits stay transformers'."""
    model, forward, decoder = lean(tiny_dir, "int8")
    layers = model.config.num_hidden_layers
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    arguments, theirs, mine = after_a_prompt(model, forward, seed=6)
    with torch.inference_mode():
        expected = forward.model_step(*arguments, theirs)
        actual = decoder(*arguments, mine)
    assert (decoder.compiled_layers(), decoder.own_layers()) == (layers, layers - 1)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("part", ["input_layernorm", "q_proj", "down_proj"])
def test_a_hook_on_a_part_of_a_layer_sees_every_step(tiny_dir, part):
    """A compiled layer calls its parts without their hooks, and a stacked product stands in for its slices: a hook
    on any of them sends the steps through transformers' forward, which calls it."""
    model = load_model(str(tiny_dir), device="cpu", quantize="none").model
    generator = BatchingGenerator(
        HuggingFaceGenerator(model, AutoTokenizer.from_pretrained(tiny_dir), model_id="t"), speculation=Speculation(0)
    )
    try:
        counter = counted(generator)
        prompt = generator.encode("Hello, world!", add_special_tokens=True)
        unhooked = tokens_of(collect(generator, prompt, greedy(max_new_tokens=6)))
        assert counter.rows == [1] * 5
        layer = model.model.layers[1]
        module = getattr(layer, part, None) or getattr(layer.self_attn, part, None) or getattr(layer.mlp, part)
        calls: list[int] = []
        handle = module.register_forward_hook(lambda _module, inputs, _output: calls.append(inputs[0].shape[1]))
        try:
            hooked = tokens_of(collect(generator, prompt, greedy(max_new_tokens=6)))
        finally:
            handle.remove()
        assert hooked == unhooked
        assert counter.rows == [1] * 5  # no more lean passes
        assert counter.prefilled == [1]
        assert calls == [len(prompt)] + [1] * 5  # the prefill, then each step
    finally:
        generator.close()


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotation_gives_transformers_rotary_embedding_bit_for_bit(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    queries, keys = (
        torch.randn(3, 2, 6, head_dim, generator=generator),
        torch.randn(3, 2, 2, head_dim, generator=generator),
    )
    cos, sin = torch.randn(3, 2, head_dim, generator=generator), torch.randn(3, 2, head_dim, generator=generator)
    expected = apply_rotary_pos_emb(queries.transpose(1, 2), keys.transpose(1, 2), cos, sin)  # [rows, heads, fed, dim]
    signed = signed_sines(sin).unsqueeze(2)
    actual = (rotate(queries, cos.unsqueeze(2), signed), rotate(keys, cos.unsqueeze(2), signed))
    for mine, theirs in zip(actual, expected, strict=True):
        assert torch.equal(mine.transpose(1, 2), theirs)


def test_the_mask_of_a_verifying_pass_is_causal_among_the_new_positions():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert step_attention_mask(mask[1:, :4], 1) is None
    assert step_attention_mask(mask[:1, :4], 1).tolist() == [[[[False, True, True, True]]]]
    expected = [
        [[[False, True, True, False, False], [False, True, True, True, False], [False, True, True, True, True]]],
        [[[True, True, True, False, False], [True, True, True, True, False], [True, True, True, True, True]]],
    ]
    assert step_attention_mask(mask, 3).tolist() == expected


def test_one_query_takes_the_grouped_heads_under_a_mask_on_the_cpu():
    """A left-padded batch's one-query attention: transformers' numbers (to rounding), from torch's grouped-query
    kernel (where transformers would lay a key head's query heads out as its positions), which gives a row with
    nothing masked the numbers it gets in the same batch with no mask at all."""
    generator = torch.Generator().manual_seed(4)
    query, key, value = (
        torch.randn(3, 9, 1, 64, generator=generator),
        *torch.randn(2, 3, 3, 40, 64, generator=generator),
    )
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :7] = False
    mask[2, ..., :30] = False
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    theirs = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)[0]
    mine = attention.one_query(query, key, value, mask, groups=3, scaling=0.125)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    grouped = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.125, enable_gqa=True
    )
    assert torch.equal(mine, grouped.transpose(1, 2))
    unmasked = attention.one_query(query, key, value, None, groups=3, scaling=0.125)
    assert torch.equal(mine[0], unmasked[0])


def test_transformers_forward_attends_one_query_as_the_lean_decoder():
    """`per_query` hands one query position to `one_query` (on the CPU), and keeps transformers' own call for what
    `one_query` does not do."""
    generator = torch.Generator().manual_seed(5)
    query, key, value = (
        torch.randn(2, 4, 1, 16, generator=generator),
        *torch.randn(2, 2, 2, 9, 16, generator=generator),
    )
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    output, _ = attention.per_query(module, query, key, value, mask, dropout=0.0, scaling=0.25, position_ids=None)
    assert torch.equal(output, attention.one_query(query, key, value, mask, groups=2, scaling=0.25))
    wide = torch.randn(2, 4, 1, 288, generator=generator), *torch.randn(2, 2, 2, 9, 288, generator=generator)
    per_head = torch.ones(2, 4, 1, 9, dtype=torch.bool)
    per_head[1, 3, ..., :5] = False  # heads wider than torch's grouped kernel takes, a mask of each head's
    output, _ = attention.per_query(module, *wide, per_head, scaling=0.25)
    assert torch.equal(output, sdpa_attention_forward(module, *wide, per_head, scaling=0.25)[0])
    bias = torch.zeros(1, 4, 1, 9)
    output, _ = attention.per_query(module, query, key, value, mask, scaling=0.25, position_bias=bias)
    assert torch.equal(
        output, sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, position_bias=bias)[0]
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_engine_without_drafts_decodes_through_it(tiny_dir, scheme):
    """The engine routes transformers' attention through `per_query` with speculation off too: else transformers'
    one-query attention under a mask is another layout than the lean decoder's, and its probe keeps transformers'
    forward (int8 magnifies the difference)."""
    AttentionInterface.register("sdpa", sdpa_attention_forward)  # as a process that never ran an engine has it
    loaded = load_model(str(tiny_dir), device="cpu", quantize=scheme)
    generator = BatchingGenerator(
        HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id="t"), speculation=Speculation(0)
    )
    try:
        assert attention.installed()
        assert generator._engine.forward.decoder is not None
    finally:
        generator.close()


def test_the_engine_decodes_through_it_as_the_plain_generator(tiny_dir):
    """Concurrent greedy and seeded requests, with drafts, each as the plain generator decodes it alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    reference = HuggingFaceGenerator(copy.deepcopy(model), tokenizer, model_id="tiny")
    generator = BatchingGenerator(
        HuggingFaceGenerator(model, tokenizer, model_id="tiny"), speculation=Speculation(tokens=3)
    )
    try:
        counter = counted(generator)
        texts = ("The cat eats an apple. The cat eats an apple. The cat", "Hello, world!", "she")
        prompts = [generator.encode(text, add_special_tokens=True) for text in texts]
        params = [greedy(max_new_tokens=16), greedy(max_new_tokens=9), greedy(max_new_tokens=12)]
        expected = [tokens_of(collect(reference, p, q)) for p, q in zip(prompts, params, strict=True)]

        async def together() -> list[list[int]]:
            async def one(prompt: list[int], param) -> list[int]:
                return [t async for step in generator.generate(prompt, param) for t in step.token_ids]

            return list(await asyncio.gather(*(one(p, q) for p, q in zip(prompts, params, strict=True))))

        assert asyncio.run(together()) == expected
        assert max(counter.rows) == 3  # the rows decoded together, through the lean decoder
        assert sum(counter.prefilled) == 3  # each was prefilled through it
        assert generator.drafts.proposed > 0  # and it ran verifying passes
    finally:
        generator.close()
        reference.close()


def test_a_hooked_model_decodes_through_its_own_forward(tiny_dir):
    """Forward hooks on the model see every step, as they would without the lean decoder."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    generator = BatchingGenerator(HuggingFaceGenerator(model, AutoTokenizer.from_pretrained(tiny_dir), model_id="t"))
    try:
        counter = counted(generator)
        prompt = generator.encode("Hello, world!", add_special_tokens=True)
        unhooked = tokens_of(collect(generator, prompt, greedy(max_new_tokens=6)))
        assert counter.rows == [1] * 5  # the first token comes from the prefill
        assert counter.prefilled == [1]
        hook = ForwardCounter()
        with hook.attached(model):
            hooked = tokens_of(collect(generator, prompt, greedy(max_new_tokens=6)))
        assert hooked == unhooked
        assert counter.rows == [1] * 5  # no more lean passes
        assert counter.prefilled == [1]
        assert hook.lengths == [len(prompt)] + [1] * 5  # the hook saw the prefill and each step
    finally:
        generator.close()


def test_a_model_of_another_shape_keeps_transformers_forward(tiny_dir):
    """Qwen3 normalises its queries and keys: the lean decoder refuses it, and the engine still decodes."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = Qwen3Config(
        **TINY_LAYERS,
        head_dim=16,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    reference = HuggingFaceGenerator(copy.deepcopy(model), tokenizer, model_id="qwen3")
    generator = BatchingGenerator(HuggingFaceGenerator(model, tokenizer, model_id="qwen3"))
    try:
        assert generator._engine.forward.decoder is None
        prompt = generator.encode("The cat eats", add_special_tokens=True)
        expected = tokens_of(collect(reference, prompt, greedy(max_new_tokens=6)))
        assert tokens_of(collect(generator, prompt, greedy(max_new_tokens=6))) == expected
    finally:
        generator.close()
        reference.close()


@pytest.mark.parametrize(
    ("multipliers", "lean"),
    [({}, True), ({"attention_multiplier": 0.015625}, True), ({"residual_multiplier": 0.22}, False)],
)
def test_the_probe_catches_what_the_shape_does_not_show(multipliers, lean):
    """Granite has Llama's shape; its attention multiplier is the attention's own scaling (which the lean pass
    reads), but its residual multiplier scales each block's output in a forward the lean pass does not run."""
    config = GraniteConfig(
        **TINY_LAYERS,
        vocab_size=300,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **multipliers,
    )
    torch.manual_seed(0)
    model = GraniteForCausalLM(config).eval()
    assert (LeanDecoder.for_model(model, Forward(model).model_step) is not None) is lean


def test_a_probe_that_differs_keeps_transformers_forward(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    forward = Forward(model)

    def off_by_a_little(*arguments: torch.Tensor) -> torch.Tensor:
        return forward.model_step(*arguments) * (1 + 1e-6)  # type: ignore[arg-type]

    assert LeanDecoder.for_model(model, forward.model_step) is not None
    assert LeanDecoder.for_model(model, off_by_a_little) is None
