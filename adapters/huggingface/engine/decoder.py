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

It is used only where it gives transformers' logits bit for bit: a model qualifies by its shape (a Llama-style
decoder: embedding, layers of norm / attention / norm / gated MLP, final norm, output projection, full attention)
and by a probe at start-up that runs one-token steps and a verifying pass both ways, left padding included, and
compares the logits exactly. Anything else (other families, sliding windows, another attention implementation, a
probe that differs) keeps transformers' forward. Prefill stays transformers': it runs once a request.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import torch
from torch import nn

from adapters.huggingface.engine import attention
from adapters.huggingface.shared_input import stacked_product
from adapters.huggingface.torch_compat import has_forward_hooks
from adapters.huggingface.transformers_compat import cache_layers, growing_cache, layer_kv

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

    def hooked(self) -> bool:
        """Whether a forward hook waits on a module this decoder does not call (then transformers' forward must run)."""
        return has_forward_hooks(self.bypassed)

    @classmethod
    def for_model(cls, model: PreTrainedModel, reference: ModelStep) -> LeanDecoder | None:
        """A decoder for ``model`` if its shape qualifies and its probe matches ``reference`` exactly, else ``None``.

        ``reference``: the engine's step through transformers' forward (the probe compares against it).
        """
        reason = unsupported(model)
        if reason is None:
            decoder = cls(model)
            try:
                reason = probe(decoder, reference)
            except Exception as error:  # noqa: BLE001  any failure keeps transformers' forward
                reason = f"the probe failed: {type(error).__name__}: {error}"
            if reason is None:
                log.info("engine.lean_decoder.ready", layers=len(decoder.model.model.layers))
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
        fed = ids.shape[1]
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        angles = cos.unsqueeze(2), signed_sines(sin).unsqueeze(2)  # [rows, fed, 1, head_dim]: broadcast over heads
        attention_mask = step_attention_mask(mask, fed)
        for layer, cache_layer in zip(self._planned(), cache_layers(cache), strict=True):
            hidden = hidden + layer.attention(layer.attention_norm(hidden), angles, cache_layer, attention_mask)
            hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
        hidden = inner.norm(hidden)
        logits: torch.Tensor = self.model.get_output_embeddings()(hidden)
        return logits

    def _planned(self) -> tuple[LayerPlan, ...]:
        """Each layer's plan, made again for a layer whose parts are not the ones it was made of (LoRA wraps some)."""
        plans = list(self._layers)
        for index, layer in enumerate(self.model.model.layers):
            parts = LayerPlan.parts_of(layer)
            if index >= len(plans) or plans[index].parts != parts:
                plans[index : index + 1] = [LayerPlan.of(layer, parts)]
        self._layers = tuple(plans)
        return self._layers


@attrs.frozen
class AttentionPlan:
    """A Llama-style attention block's parts, looked up once: its products, its sizes, its attention call."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    stacked: nn.Module | None
    """The one product of q, k and v where `stack_shared_input_linears` stacked them (`stacked_product`)."""
    queries_size: int
    keys_size: int
    head_dim: int
    attend: attention.Attend

    @classmethod
    def of(cls, module: Any) -> AttentionPlan:  # noqa: ANN401  a Llama-style attention module
        """The plan of ``module``."""
        return cls(
            q_proj=module.q_proj,
            k_proj=module.k_proj,
            v_proj=module.v_proj,
            o_proj=module.o_proj,
            stacked=stacked_product(module.q_proj, module.k_proj, module.v_proj),
            queries_size=module.q_proj.out_features,
            keys_size=module.k_proj.out_features,
            head_dim=module.head_dim,
            attend=functools.partial(attention.one_query, groups=module.num_key_value_groups, scaling=module.scaling),
        )

    def __call__(
        self,
        hidden: torch.Tensor,
        angles: tuple[torch.Tensor, torch.Tensor],
        cache_layer: Any,  # noqa: ANN401  a DynamicLayer
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The block's output for ``hidden`` (``[rows, fed, hidden]``), its keys and values added to the cache.

        ``angles``: the rotary cosines and `signed_sines`, ``[rows, fed, 1, head_dim]``.
        """
        rows, fed, _ = hidden.shape
        cos, sin = angles
        head_dim, queries_size = self.head_dim, self.queries_size
        if self.stacked is not None:  # queries and keys side by side in one product: rotated together
            product = self.stacked(hidden)
            rotated = rotate(product[..., : queries_size + self.keys_size].view(rows, fed, -1, head_dim), cos, sin)
            queries, keys = rotated[:, :, : queries_size // head_dim], rotated[:, :, queries_size // head_dim :]
            values = product[..., queries_size + self.keys_size :].view(rows, fed, -1, head_dim)
        else:
            queries = rotate(self.q_proj(hidden).view(rows, fed, -1, head_dim), cos, sin)
            keys = rotate(self.k_proj(hidden).view(rows, fed, -1, head_dim), cos, sin)
            values = self.v_proj(hidden).view(rows, fed, -1, head_dim)
        keys, values = cache_layer.update(keys.transpose(1, 2), values.transpose(1, 2))
        output = attention.each_query(queries.transpose(1, 2), keys, values, attention_mask, self.attend)
        result: torch.Tensor = self.o_proj(output.reshape(rows, fed, -1))
        return result


@attrs.frozen
class MlpPlan:
    """A Llama-style gated MLP's parts, looked up once."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: nn.Module
    stacked: nn.Module | None
    """The one product of gate and up where they are stacked (`stacked_product`)."""
    sizes: tuple[int, int]

    @classmethod
    def of(cls, module: Any) -> MlpPlan:  # noqa: ANN401  a Llama-style MLP
        """The plan of ``module``."""
        return cls(
            gate_proj=module.gate_proj,
            up_proj=module.up_proj,
            down_proj=module.down_proj,
            act_fn=module.act_fn,
            stacked=stacked_product(module.gate_proj, module.up_proj),
            sizes=(module.gate_proj.out_features, module.up_proj.out_features),
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``down(act(gate(hidden)) * up(hidden))``, gate and up in one product where they are stacked."""
        if self.stacked is not None:
            gate, up = self.stacked(hidden).split(self.sizes, dim=-1)
        else:
            gate, up = self.gate_proj(hidden), self.up_proj(hidden)
        result: torch.Tensor = self.down_proj(self.act_fn(gate) * up)
        return result


@attrs.frozen
class LayerPlan:
    """What the lean pass calls for one decoder layer, and what it derives from them (a stacked product, sizes).

    Worked out once, and reused while the layer's parts stay the same modules.
    """

    parts: tuple[nn.Module, ...]
    """The modules the plan was made of (`parts_of`): a new one anywhere (LoRA wrapping a layer) makes a new plan."""
    attention_norm: nn.Module
    attention: AttentionPlan
    mlp_norm: nn.Module
    mlp: MlpPlan

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
        return cls(
            parts=parts,
            attention_norm=layer.input_layernorm,
            attention=AttentionPlan.of(layer.self_attn),
            mlp_norm=layer.post_attention_layernorm,
            mlp=MlpPlan.of(layer.mlp),
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
    device = model.device
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (PROBE_ROWS, PROBE_PROMPT + 4), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
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
            expected, actual = reference(*arguments, theirs), decoder(*arguments, mine)
            if not torch.equal(expected, actual):
                difference = float((expected - actual).abs().max())
                return f"its logits differ from transformers' by up to {difference:.3g} ({fed} new positions)"
        if any(
            not torch.equal(layer_kv(a)[0], layer_kv(b)[0])
            for a, b in zip(cache_layers(theirs), cache_layers(mine), strict=True)
        ):
            return "its cached keys differ from transformers'"
    return None


__all__ = ["LeanDecoder", "ModelStep", "probe", "rotate", "signed_sines", "step_attention_mask", "unsupported"]
