"""The engine's decoding passes through a lean copy of a Llama-style model's forward: the same numbers, fewer ops.

A decoding step of a small model on a CPU is mostly overhead: transformers' forward builds a causal mask, runs
output-capturing hooks and keyword plumbing, and each decoder layer rotates its queries and keys apart, asks its
stacked projections for their parts one by one and goes through the attention registry. `LeanDecoder` runs the
same modules (norms, linear layers, whatever wraps them: packed, quantized, stacked, LoRA) and the same attention
kernels in the same order, but rotates queries and keys in one op, takes a stacked product whole, builds the
mask and rotary angles once a pass, and works out once what a layer's parts give (`LayerPlan`: a stacked product,
sizes), again only for a layer whose parts are other modules than before (LoRA wrapping some). A step of
SmolLM2-135M at batch 1 on a 2-core Xeon took 16.8 ms against transformers' 19.9 in int8, 34.5 against 37.8 in
float32 (README, "A lean decoding pass").

Each layer's two halves around its attention (`AttentionInput`: norm, products, rotation; `LayerOutput`: output
product, residuals, norm, gated MLP) are modules of their own, compiled by TorchScript where every part can be
(`torch_compat.script`): the same ops in the same order, run from C++, with no Python between them. That took an
int8 step of SmolLM2 at batch 1 from 18-19 to 13-14 ms on the same Xeon. A part TorchScript cannot compile (a LoRA
wrapper) keeps that layer's halves in Python; a forward hook on any part of a layer, which a compiled half would not
call, sends the steps through transformers' forward. Where a layer's parts are all our own kernels' (a quantized or
packed float32 model on a CPU with AVX-512 VNNI: `native.own_halves`), each half is one op of ours instead, the same
kernels in the same order: an int8 step of SmolLM2 at batch 1 went from 7.5 to 6.8 ms on a 2-core AMD EPYC (Zen
4). Where the attention is ours too, a decoding step or verifying pass takes one op for all the layers
(`native.OwnDecodingSteps`: each layer's halves, the cache's new columns and the attention): 5.7 ms.

It is used only where it gives transformers' logits bit for bit: a model qualifies by its shape (a Llama-style
decoder: embedding, layers of norm / attention / norm / gated MLP, final norm, output projection, full attention)
and by a probe at start-up that runs one-token steps and a verifying pass both ways, left padding included, and
compares the logits exactly. Anything else (other families, sliding windows, another attention implementation, a
probe that differs) keeps transformers' forward.

Prefills go through the same compiled halves (`LeanDecoder.prefill`), with the attention mask transformers builds
and the sdpa function its forward calls, where a second probe (`probe_prefill`: left padding, and the rest of a
prompt after cached columns) finds transformers' logits and cache bit for bit; else they keep transformers' forward.
The uncached dozen tokens of a chat prompt took 31 against 45 ms on the 2-core Xeon (int8, alternating in one
process).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import attrs
import structlog
import torch
from torch import nn

from adapters.huggingface import native
from adapters.huggingface.engine import attention
from adapters.huggingface.shared_input import stacked_product
from adapters.huggingface.torch_compat import children_watch, forward_hooks_watch, script
from adapters.huggingface.transformers_compat import (
    GrowingLayer,
    cache_layers,
    causal_mask,
    growing_cache,
    layer_kv,
)

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

log = structlog.get_logger(__name__)

LAYER_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
MLP_PARTS = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})
STACKED_PREFIX = "shared_input_"
"""Children `stack_shared_input_linears` adds beside the layers it stacks."""

ModelStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "DynamicCache"], torch.Tensor]
"""``(ids, positions, mask, cache) -> logits`` of every new position: a decoding step or verifying pass."""

ModelPass = Callable[..., torch.Tensor]
"""``(ids, positions, mask, cache, *, keep) -> logits`` of the last ``keep`` positions: a prefill."""


class LeanDecoder:
    """Decoding and verifying passes of a Llama-style model, as transformers computes them, with less overhead.

    Build it with `LeanDecoder.for_model`, which returns ``None`` for a model it cannot stand in for.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model: Any = model
        """A ``PreTrainedModel`` whose shape `unsupported` accepted (typed loosely: its parts are reached by name)."""
        layers = self.model.model.layers
        self.bypassed: tuple[nn.Module, ...] = (
            model,
            self.model.model,
            *layers,
            *(layer.self_attn for layer in layers),
            *(layer.mlp for layer in layers),
        )
        """The modules whose own ``forward`` this decoder does the work of, instead of calling it."""
        self._layers: tuple[LayerPlan, ...] = ()
        self._hooked: Callable[[], bool] = lambda: False
        """Watches `bypassed` and every layer's parts, which a compiled plan calls without their hooks."""
        self._replaced: Callable[[], bool] = lambda: True
        """Watches the layers and their blocks for a part set anew (LoRA wraps parts at run time)."""
        self._steps: native.OwnDecodingSteps | None = None
        """Every layer's decoding step in one op, where each layer's plan has one (`LayerPlan.step`)."""
        self.prefills = False
        """Whether `prefill` gives transformers' prefill bit for bit (`probe_prefill` found it so)."""
        self._planned()

    def hooked(self) -> bool:
        """Whether a forward hook waits on a module of the layers (then transformers' forward must run).

        A compiled layer runs its parts without their hooks, and a stacked product stands in for its slices.
        """
        return self._hooked()

    def compiled_layers(self) -> int:
        """How many layers run compiled: by TorchScript, or as ops of our own (`LayerPlan.compiled`)."""
        return sum(plan.compiled for plan in self._layers)

    def own_layers(self) -> int:
        """How many layers run as ops of our own kernels (`LayerPlan.own`)."""
        return sum(plan.own for plan in self._layers)

    def one_op_steps(self) -> bool:
        """Whether a decoding step takes one op for every layer (`LayerPlan.step`), where the cache holds columns."""
        self._planned()
        return self._steps is not None

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, reference: ModelStep, prefill_reference: ModelPass | None = None
    ) -> LeanDecoder | None:
        """A decoder for ``model`` if its shape qualifies and its probe matches ``reference`` exactly, else ``None``.

        ``reference``: the engine's step through transformers' forward (the probe compares against it);
        ``prefill_reference``: its prefill, against which `probe_prefill` decides whether `prefill` is used.
        """
        reason = unsupported(model)
        if reason is None:
            try:
                decoder = cls(model)
                reason = probe(decoder, reference)
            except Exception as error:  # noqa: BLE001  any failure keeps transformers' forward
                reason = f"the probe failed: {type(error).__name__}: {error}"
            if reason is None:
                prefill_reason: str | None = "no reference"
                if prefill_reference is not None:
                    try:
                        prefill_reason = probe_prefill(decoder, prefill_reference)
                    except Exception as error:  # noqa: BLE001  prefills keep transformers' forward
                        prefill_reason = f"the probe failed: {type(error).__name__}: {error}"
                decoder.prefills = prefill_reason is None
                log.info(
                    "engine.lean_decoder.ready",
                    layers=len(decoder.model.model.layers),
                    compiled_layers=decoder.compiled_layers(),
                    own_layers=decoder.own_layers(),
                    one_op_steps=decoder.one_op_steps(),
                    prefills=decoder.prefills,
                    **({} if prefill_reason is None else {"prefill_unavailable": prefill_reason}),
                )
                return decoder
        log.info("engine.lean_decoder.unavailable", reason=reason)
        return None

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Every new position's logits, ``[rows, fed, vocab]``, as transformers' forward gives them.

        ``ids``/``positions``: ``[rows, fed]``, the new tokens after ``cache``'s columns; ``mask``: ``[rows, columns
        + fed]``, 1 on real tokens. Several new positions are a verifying pass: each attends as a one-token step at
        its place would (`attention.each_query`).
        """
        inner = self.model.model
        attention_mask = step_attention_mask(mask, ids.shape[1])
        if self._stepped(cache):
            hidden = self._step_layers(inner.embed_tokens(ids), positions, cache, attention_mask)
            return cast("torch.Tensor", self.model.get_output_embeddings()(inner.norm(hidden)))

        def attend(layer: LayerPlan, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return attention.each_query(queries, keys, values, attention_mask, layer.attend)

        hidden = self._through_layers(inner.embed_tokens(ids), positions, cache, attend)
        logits: torch.Tensor = self.model.get_output_embeddings()(inner.norm(hidden))
        return logits

    def prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, *, keep: int
    ) -> torch.Tensor:
        """The last ``keep`` positions' logits of a prefill, ``[rows, keep, vocab]``, as transformers' forward has them.

        The arguments are `__call__`'s, any number of new positions after ``cache``'s columns (none, or a cached
        prefix). Where every layer has a one-op step, the prompt goes through them all in one op, each position
        attending as a one-token step at its place, as transformers' forward then attends too
        (`attention.own_positions`). Else the attention takes the mask transformers builds and its sdpa call
        (`attention.whole_prompt`), and the rest is each layer's compiled halves, which compute each position on its
        own.
        """
        inner = self.model.model
        embeddings = inner.embed_tokens(ids)
        if self.one_op_steps() and all(isinstance(layer, GrowingLayer) for layer in cache_layers(cache)):
            hidden = self._step_layers(embeddings, positions, cache, step_attention_mask(mask, ids.shape[1]))
            return cast("torch.Tensor", self.model.get_output_embeddings()(inner.norm(hidden[:, -keep:])))
        attention_mask = causal_mask(
            self.model.config, embeddings, None if bool(mask.all()) else mask, cache, positions
        )

        def attend(layer: LayerPlan, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return attention.whole_prompt(layer.attention_module, queries, keys, values, attention_mask)

        hidden = self._through_layers(embeddings, positions, cache, attend)
        logits: torch.Tensor = self.model.get_output_embeddings()(inner.norm(hidden[:, -keep:]))
        return logits

    def _through_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        attend: Callable[[LayerPlan, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The embeddings ``hidden`` through every layer, the new keys and values added to ``cache``.

        ``attend(layer, queries, keys, values)``: the layer's attention over the cached and new keys (a decoding
        step's, one query at a time, or a prefill's).
        """
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        angles = cos.unsqueeze(2), signed_sines(sin).unsqueeze(2)  # [rows, fed, 1, head_dim]: broadcast over heads
        for layer, cache_layer in zip(self._planned(), cache_layers(cache), strict=True):
            queries, keys, values = layer.attention_input(hidden, *angles)
            keys, values = cache_layer.update(keys, values)
            hidden = layer.output(hidden, attend(layer, queries, keys, values))
        return hidden

    def _stepped(self, cache: DynamicCache) -> bool:
        """Whether a decoding step or verifying pass goes through every layer in one op (`LayerPlan.step`)."""
        return self.one_op_steps() and all(
            isinstance(layer, GrowingLayer) and layer.get_seq_length() for layer in cache_layers(cache)
        )

    def _step_layers(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """A decoding step's or verifying pass's embeddings ``hidden`` through every layer, in one op.

        `native.OwnDecodingSteps`: each new position attends as a one-token step at its place would. The new keys
        and values go into ``cache``'s columns `GrowingLayer.grow` adds.
        """
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        angles = cos.unsqueeze(2), signed_sines(sin).unsqueeze(2)
        rows, fed = hidden.shape[:2]
        first = cast("native.OwnDecodingStep", self._layers[0].step).attention_input
        like = hidden.new_empty(rows, first.keys_size // first.head_dim, 0, first.head_dim)  # for an empty cache
        columns = [cast("GrowingLayer", cache_layer).grow(fed, like) for cache_layer in cache_layers(cache)]
        return cast("native.OwnDecodingSteps", self._steps)(hidden, angles, columns, mask)

    def _planned(self) -> tuple[LayerPlan, ...]:
        """Each layer's plan, made again for a layer whose parts are not the ones it was made of (LoRA wraps some).

        Looked into only when a part was set anew in a layer or its blocks (`children_watch`).
        """
        if not self._replaced():
            return self._layers
        layers = self.model.model.layers
        plans = list(self._layers)
        for index, layer in enumerate(layers):
            parts = LayerPlan.parts_of(layer)
            if index >= len(plans) or plans[index].parts != parts:
                plans[index : index + 1] = [LayerPlan.of(layer, parts)]
        self._layers = tuple(plans[: len(layers)])
        steps = [plan.step for plan in self._layers]
        self._steps = native.OwnDecodingSteps(cast("list[native.OwnDecodingStep]", steps)) if all(steps) else None
        self._hooked = forward_hooks_watch((*self.bypassed, *(part for plan in plans for part in plan.parts)))
        self._replaced = children_watch(
            (self.model.model, layers, *(block for layer in layers for block in (layer, layer.self_attn, layer.mlp)))
        )
        return self._layers


class AttentionInput(nn.Module):
    """A Llama-style layer up to its attention: the norm, the query, key and value products, the rotation.

    Written for TorchScript as well as Python (`LayerPlan.of` compiles it where it can), from the layer's own
    modules: ``products`` is the one stacked product of q, k and v (`stacked_product`), else the three of them.
    """

    def __init__(self, norm: nn.Module, products: list[nn.Module], attention: Any) -> None:  # noqa: ANN401
        super().__init__()
        self.norm = norm
        self.products = nn.ModuleList(products)
        self.queries_size: int = attention.q_proj.out_features
        self.keys_size: int = attention.k_proj.out_features
        self.head_dim: int = attention.head_dim

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``hidden`` (``[rows, fed, hidden]``), each ``[rows, heads, fed, head_dim]``.

        ``cos``/``sin``: the rotary cosines and `signed_sines`, ``[rows, fed, 1, head_dim]``. Queries and keys are
        rotated together, side by side (the rotation is elementwise: the same numbers as one at a time).
        """
        rows, fed = hidden.shape[0], hidden.shape[1]
        normed = self.norm(hidden)
        outputs: list[torch.Tensor] = [linear(normed) for linear in self.products]
        product = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        rotated_size = self.queries_size + self.keys_size
        rotated = rotate(product[..., :rotated_size].view(rows, fed, -1, self.head_dim), cos, sin)
        query_heads = self.queries_size // self.head_dim
        queries, keys = rotated[:, :, :query_heads], rotated[:, :, query_heads:]
        values = product[..., rotated_size:].view(rows, fed, -1, self.head_dim)
        return queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)


class LayerOutput(nn.Module):
    """A Llama-style layer after its attention: the output product and residual, the norm, the gated MLP, residual.

    Written for TorchScript as well as Python, like `AttentionInput`; ``products`` is the stacked product of gate and
    up, else the two of them.
    """

    def __init__(self, o_proj: nn.Module, norm: nn.Module, products: list[nn.Module], mlp: Any) -> None:  # noqa: ANN401
        super().__init__()
        self.o_proj = o_proj
        self.norm = norm
        self.products = nn.ModuleList(products)
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.sizes = [mlp.gate_proj.out_features, mlp.up_proj.out_features]  # unannotated: TorchScript infers it

    def forward(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output, from its input ``hidden`` and its attention's output ``attended``.

        ``hidden``: ``[rows, fed, hidden]``; ``attended``: ``[rows, fed, heads, head_dim]``.
        """
        rows, fed = hidden.shape[0], hidden.shape[1]
        hidden = hidden + self.o_proj(attended.reshape(rows, fed, -1))
        normed = self.norm(hidden)
        outputs: list[torch.Tensor] = [linear(normed) for linear in self.products]
        if len(outputs) == 1:
            parts = torch.split(outputs[0], self.sizes, dim=-1)
            gate, up = parts[0], parts[1]
        else:
            gate, up = outputs[0], outputs[1]
        mlp: torch.Tensor = self.down_proj(self.act_fn(gate) * up)
        return hidden + mlp


@attrs.frozen
class LayerPlan:
    """What the lean pass calls for one decoder layer: its two halves around the attention, compiled where they can be.

    Worked out once, and reused while the layer's parts stay the same modules.
    """

    parts: tuple[nn.Module, ...]
    """The modules the plan was made of (`parts_of`): a new one anywhere (LoRA wrapping a layer) makes a new plan."""
    attention_input: nn.Module
    """`AttentionInput`, compiled by TorchScript where it can be."""
    attend: attention.Attend
    """The attention of one query position (a decoding step's)."""
    attention_module: nn.Module
    """The layer's attention block, which a prefill's attention reads (`attention.whole_prompt`)."""
    output: nn.Module
    """`LayerOutput`, compiled by TorchScript where it can be."""
    compiled: bool
    """Whether both halves run compiled, by TorchScript or as ops of our own (`own`); a part TorchScript cannot read
    (a LoRA wrapper, say) keeps both in Python."""
    own: bool = False
    """Whether both halves are ops of our own kernels (`native.own_halves`), which need no compiling."""
    step: native.OwnDecodingStep | None = None
    """A decoding step's halves and attention in one op (`native.own_step`), where the halves and attention are ours."""

    @staticmethod
    def parts_of(layer: Any) -> tuple[nn.Module, ...]:  # noqa: ANN401  a Llama-style decoder layer
        """The modules of ``layer`` the lean pass calls, and those whose parts it reads."""
        attention, mlp = layer.self_attn, layer.mlp
        return (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            attention,
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
            mlp,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )

    @classmethod
    def of(cls, layer: Any, parts: tuple[nn.Module, ...]) -> LayerPlan:  # noqa: ANN401  a Llama-style layer
        """The plan of ``layer``, whose `parts_of` are ``parts``."""
        attention_module, mlp = layer.self_attn, layer.mlp
        stacked = stacked_product(attention_module.q_proj, attention_module.k_proj, attention_module.v_proj)
        attention_products = (
            [stacked] if stacked else [attention_module.q_proj, attention_module.k_proj, attention_module.v_proj]
        )
        stacked = stacked_product(mlp.gate_proj, mlp.up_proj)
        mlp_products = [stacked] if stacked else [mlp.gate_proj, mlp.up_proj]
        attend = functools.partial(
            attention.one_query,
            groups=attention_module.num_key_value_groups,
            scaling=attention_module.scaling,
            own=getattr(attention_module, native.OWN_ATTENTION, False),
        )
        own = native.own_halves(layer, attention_products, mlp_products)
        if own:
            step = native.own_step(own, attention_module)
            return cls(parts, own[0], attend, attention_module, own[1], compiled=True, own=True, step=step)
        halves = (
            AttentionInput(layer.input_layernorm, attention_products, attention_module),
            LayerOutput(attention_module.o_proj, layer.post_attention_layernorm, mlp_products, mlp),
        )
        compiled = [script(half) for half in halves]
        both = all(half is not None for half in compiled)
        attention_input, output = compiled if both else halves
        return cls(
            parts=parts,
            attention_input=cast("nn.Module", attention_input),
            attend=attend,
            attention_module=attention_module,
            output=cast("nn.Module", output),
            compiled=both,
        )


def rotate(states: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``states`` (``[rows, fed, heads, head_dim]``), as transformers' Llama applies it.

    Transformers computes ``states * cos + cat(-second_half, first_half) * sin``; here the halves swap in one op and
    the sign rides on the sines (`signed_sines`), which gives the same bits: negating is exact, in either factor.
    """
    return states * cos + states.roll(states.shape[-1] // 2, dims=-1) * signed_sin


def signed_sines(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sines with their first half negated, for `rotate` (computed once a pass, not once a layer)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def step_attention_mask(mask: torch.Tensor, fed: int) -> torch.Tensor | None:
    """The boolean ``[rows, 1, fed, columns]`` mask of the new positions (causal among them), ``None`` if all attend.

    A one-token step with nothing masked gets ``None``, as transformers leaves it out; `attention.each_query` drops
    it per query position when that position sees no masked column.
    """
    if fed == 1 and bool(mask.all()):
        return None
    columns = mask.shape[1]
    visible = mask.bool()[:, None, None, :]
    if fed == 1:
        return visible
    column = torch.arange(columns, device=mask.device)
    causal = column <= column[columns - fed :, None]  # [fed, columns]: each new position sees up to its own column
    return visible & causal[None, None]


def unsupported(model: PreTrainedModel) -> str | None:
    """Why `LeanDecoder` cannot stand in for ``model``'s forward, or ``None`` when its shape qualifies."""
    config = model.config
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    reason = None
    if inner is None or not isinstance(layers, nn.ModuleList) or not len(layers):
        reason = "not a decoder with model.layers"
    elif not all(hasattr(inner, part) for part in ("embed_tokens", "norm", "rotary_emb")):
        reason = "no embed_tokens, norm or rotary_emb"
    elif getattr(config, "_attn_implementation", None) != "sdpa":
        reason = f"attention is {getattr(config, '_attn_implementation', None)!r}, not sdpa"
    elif getattr(config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
    ):
        reason = "sliding-window attention"
    else:
        reason = next(filter(None, map(_unsupported_layer, layers)), None)
    return reason


def _unsupported_layer(layer: nn.Module) -> str | None:
    """Why ``layer`` is not a Llama-style decoder layer, or ``None``."""
    found = {
        "layer": set(dict(layer.named_children())),
        "attention": set(dict(getattr(layer, "self_attn", nn.Module()).named_children())),
        "mlp": set(dict(getattr(layer, "mlp", nn.Module()).named_children())),
    }
    expected = {"layer": LAYER_PARTS, "attention": ATTENTION_PARTS, "mlp": MLP_PARTS}
    for part, names in found.items():
        extra = {name for name in names - expected[part] if not name.startswith(STACKED_PREFIX)}
        if extra or not expected[part] <= names:
            return f"{type(layer).__name__}'s {part} has {sorted(names)}"
    return None


PROBE_ROWS = 2
PROBE_PROMPT = 5


def probe(decoder: LeanDecoder, reference: ModelStep) -> str | None:
    """Run one-token steps and a verifying pass through ``decoder`` and ``reference``; why they differ, or ``None``.

    Two rows, the first left-padded, so both the masked and the unmasked attention paths run; the verifying pass
    only where transformers' attention goes one query at a time (`attention.installed`), as the engine's do.
    """
    model = decoder.model
    ids, positions, mask = probe_rows(model, PROBE_PROMPT + 4, seed=0)
    with torch.inference_mode():
        cache = growing_cache(model.config)
        reference(ids[:, :PROBE_PROMPT], positions[:, :PROBE_PROMPT], mask[:, :PROBE_PROMPT], cache)
        theirs, mine = cache, copy.deepcopy(cache)
        passes = [(PROBE_PROMPT, 1), (PROBE_PROMPT + 1, 1)]
        if attention.installed():
            passes.append((PROBE_PROMPT + 2, 2))
        for start, fed in passes:
            end = start + fed
            arguments = (ids[:, start:end], positions[:, start:end], mask[:, :end])
            reason = difference(reference(*arguments, theirs), decoder(*arguments, mine), f"{fed} new positions")
            if reason is not None:
                return reason
        return None if same_keys(theirs, mine) else "its cached keys differ from transformers'"


def probe_prefill(decoder: LeanDecoder, reference: ModelPass) -> str | None:
    """Prefill through ``decoder`` and ``reference``; why they differ, or ``None``.

    `probe`'s two rows, every position's logits compared; then three more positions after the cached ones, as the
    engine prefills the rest of a prompt whose beginning came from the prefix cache.
    """
    model = decoder.model
    ids, positions, mask = probe_rows(model, PROBE_PROMPT + 3, seed=1)
    with torch.inference_mode():
        theirs, mine = growing_cache(model.config), growing_cache(model.config)
        for start, end in ((0, PROBE_PROMPT), (PROBE_PROMPT, PROBE_PROMPT + 3)):
            arguments = (ids[:, start:end], positions[:, start:end], mask[:, :end])
            expected = reference(*arguments, theirs, keep=end - start)
            reason = difference(expected, decoder.prefill(*arguments, mine, keep=end - start), "prefill")
            if reason is not None:
                return reason
        return None if same_keys(theirs, mine) else "its prefill's cached keys differ from transformers'"


def probe_rows(model: Any, length: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN401
    """A probe's ``(ids, positions, mask)``: `PROBE_ROWS` rows of ``length`` random tokens, the first left-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model.config.vocab_size), (PROBE_ROWS, length), generator=generator).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, (mask.cumsum(dim=1) - 1).clamp(min=0), mask


def difference(expected: torch.Tensor, actual: torch.Tensor, what: str) -> str | None:
    """Why ``actual`` logits are not ``expected`` bit for bit, or ``None``."""
    if torch.equal(expected, actual):
        return None
    return f"its logits differ from transformers' by up to {float((expected - actual).abs().max()):.3g} ({what})"


def same_keys(theirs: DynamicCache, mine: DynamicCache) -> bool:
    """Whether two caches hold the same keys, bit for bit."""
    pairs = zip(cache_layers(theirs), cache_layers(mine), strict=True)
    return all(torch.equal(layer_kv(a)[0], layer_kv(b)[0]) for a, b in pairs)


__all__ = [
    "LeanDecoder",
    "ModelPass",
    "ModelStep",
    "probe",
    "probe_prefill",
    "rotate",
    "signed_sines",
    "step_attention_mask",
    "unsupported",
]
