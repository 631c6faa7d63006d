"""Kernels of our own, in C++ (``kernels.cpp``), built with this machine's compiler the first time a server needs them.

They serve CPU models whose linear layers are quantized (int8, int4) or packed in float32, on CPUs with AVX-512 VNNI
or with AVX2, FMA and F16C, where a compiler builds them (`BUILDS`: one source, built for the CPU's kind):

- ``int8_linear``: the int8 product `NativeInt8Linear` (``quantization.py``) calls instead of FBGEMM's. A decoding
  step of a small model calls a hundred or more small products; FBGEMM's costs some 25 us a call beyond reading its
  weights (quantizing the inputs with the range of the whole call, packing them, its output pipeline), and reads a
  576-by-3072 weight at about half the memory's speed. This one quantizes each input row with a scale of its own
  (`Int8Linear` had to bound FBGEMM's inputs to get that), multiplies with ``vpdpbusd`` (with AVX2, ``vpmaddubsw``
  on the inputs' magnitudes and the weights given the inputs' signs: the same exact sums) over weights packed in
  panels of 16 output rows, and scales back, in one call. On a 2-core AMD EPYC (Zen 4, AVX-512 VNNI), SmolLM2-135M's
  120 layer products at one row took 4.6 against 6.2 ms, at 16 rows 9.3 against 10.9 ms, at 64 rows the same as
  FBGEMM (README, "Kernels of our own").
- ``int4_linear``: the int4 product `NativeInt4Linear` calls instead of torch's int4 op: 4-bit codes in groups of 32
  with a float16 scale and minimum each (GGUF's q4_1 layout), inputs quantized to 8 bits per group of 32 (as
  llama.cpp's q8_1 blocks), two ``vpdpbusd`` for every 64 bytes of weights.
- ``rms_norm``: a Llama-style RMS norm in one pass, where transformers' takes eight ops; `OwnRMSNorm` stands in for
  the model's norms (`use_own_norms`), so transformers' forward and the engine's lean pass both call it.
- ``one_query_attention``: one query position's attention, which `attention.one_query` takes for the attention
  blocks `use_own_attention` marked, from transformers' forward and the lean pass alike; 1.6-1.8x torch's sdpa at
  SmolLM2's shapes.
- ``float_linear``: the float32 product `packing.OwnPackedLinear` calls instead of oneDNN's; ``silu``, which
  `OwnSiLU` stands in with for a model's SiLU activations.
- ``attention_input``, ``layer_output``: a Llama-style layer's halves around its attention, each one op over the
  kernels above (`own_halves`); ``decode_layers``: every layer of a decoding step or verifying pass in one op
  (`OwnDecodingSteps`).

The library is built once per source, torch version and compiler command, with ``g++`` (``$CXX``) straight into a
shared library under torch's extensions folder (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), some
10 seconds on two cores, and loaded with ``torch.ops.load_library``. Without a compiler, without the CPU features, or
with ``HF_OPENAI_SERVER_NATIVE=0`` in the environment, `unavailable` says why, and torch's kernels stay.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import structlog
import torch
from torch import nn
from torch.utils import cpp_extension
from transformers import activations

from adapters.huggingface.cpu_features import cpu_flags

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
FEATURES = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
"""The CPU flags (as ``/proc/cpuinfo`` names them) the AVX-512 build is compiled for."""
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")
"""``-fopenmp``: torch's ``at::parallel_for`` is inline OpenMP, and runs on one thread without it (the library then
links the OpenMP runtime torch has already loaded). ``-ffp-contract=off``: no fused multiply-adds but those written,
so every row is scaled by the same roundings whatever code path (and build) it takes."""
ARCHITECTURE_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
AVX2_FEATURES = frozenset({"avx2", "fma", "f16c"})
"""The CPU flags the AVX2 build of the same source is compiled for, where the AVX-512 one cannot run."""
AVX2_ARCHITECTURE_FLAGS = ("-mavx2", "-mfma", "-mf16c")
BUILDS = (("AVX-512 VNNI", FEATURES, ARCHITECTURE_FLAGS), ("AVX2", AVX2_FEATURES, AVX2_ARCHITECTURE_FLAGS))
"""Each build of ``kernels.cpp``: its name, the CPU flags it needs and its compiler flags, the first that fits wins.
Both give the same bits (sixteen floats at a time in one register or two, exact integer sums in both)."""
BUILD_SECONDS = 300
"""How long a build may take before the server gives up on it and keeps torch's kernels."""
PANEL = 16
"""Output rows per packed panel (sixteen sums)."""
GROUP = 4
"""Inputs per 32-bit lane of the packed int8 weights: the packed weights' inner dimension."""
DISABLE = "HF_OPENAI_SERVER_NATIVE"
"""Set to ``0`` to keep torch's own kernels, to ``avx2`` to take the AVX2 build (`ONLY_AVX2`)."""
ONLY_AVX2 = "avx2"
"""``HF_OPENAI_SERVER_NATIVE=avx2``: the AVX2 build, even where the AVX-512 one runs: what an AVX2-only CPU runs, on
this one."""


_loading = threading.Lock()
_isa: list[str] = []
"""The loaded build's name (`BUILDS`), once `unavailable` has loaded one."""


@functools.cache
def unavailable() -> str | None:
    """Why our kernels are not there, or ``None`` once ``torch.ops.hf_openai_server`` holds them.

    Built (the first build of `BUILDS` the CPU takes) and loaded on the first call (two first calls at once: one
    builds, the other waits, then loads the built library), which logs the outcome: ``native.kernels.ready`` with the
    build and the seconds it took, or ``native.kernels.unavailable`` with the reasons.
    """
    with _loading:
        started = time.perf_counter()
        setting = os.environ.get(DISABLE, "").strip().lower()
        if setting == "0":
            reasons = [f"{DISABLE}={setting}"]
        else:
            reasons = []
            for name, features, flags in BUILDS:
                if setting == ONLY_AVX2 and flags != AVX2_ARCHITECTURE_FLAGS:
                    reasons.append(f"{name}: {DISABLE}={setting}")
                    continue
                reason = _unavailable(features) or _loaded(flags)
                if reason is None:
                    _isa.append(name)
                    log.info("native.kernels.ready", isa=name, seconds=round(time.perf_counter() - started, 2))
                    return None
                reasons.append(f"{name}: {reason}")
        reason = "; ".join(reasons)
        log.info("native.kernels.unavailable", reason=reason)
        return reason


def isa() -> str | None:
    """The name of the build our kernels run (``"AVX-512 VNNI"``, ``"AVX2"``), ``None`` where they do not."""
    return _isa[0] if unavailable() is None else None


def _loaded(architecture: tuple[str, ...]) -> str | None:
    """Build (unless built) and load the library for ``architecture``; why that failed, or ``None`` once loaded."""
    try:
        torch.ops.load_library(str(_built(architecture)))  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        torch.ops.hf_openai_server.decode_layers  # noqa: B018  raises unless the library registered its ops
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {str(error).strip()[-500:]}"
    return None


def _unavailable(features: frozenset[str]) -> str | None:
    """Why a library for ``features`` cannot be built here, before trying; ``None`` when it may be."""
    missing = sorted(features - (cpu_flags() or frozenset()))
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler (g++, or $CXX)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _built(architecture: tuple[str, ...]) -> Path:
    """The kernels' library for ``architecture``, compiled now unless a build of this very source and setup is there."""
    compiler = _compiler()
    if compiler is None:
        msg = "no C++ compiler"
        raise OSError(msg)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [flag for path in cpp_extension.library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
    command = [compiler, *FLAGS, *architecture, abi, *includes, str(SOURCE), *libraries, "-lc10", "-ltorch_cpu"]
    setup = _digest(torch.__version__, *command)  # this torch, compiler, paths: another virtual env builds its own
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    library = folder / f"hf_openai_server_kernels_{setup}_{_digest(SOURCE.read_text())}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # a build another process runs at once lands alike
        partial = Path(scratch) / library.name
        subprocess.run(  # noqa: S603  our own compiler command, no shell
            [*command, "-o", str(partial)], check=True, capture_output=True, text=True, timeout=BUILD_SECONDS
        )
        partial.replace(library)
    for stale in folder.glob(f"hf_openai_server_kernels_{setup}_*.so"):  # this setup's earlier sources
        if stale != library:
            stale.unlink(missing_ok=True)  # a process that loaded it keeps it mapped
    return library


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def pack_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (``[out, in]``) as int8 per output row, packed for `int8_linear`: panels, row sums, row scales.

    Symmetric, as FBGEMM's weights are quantized here (each row's scale is its largest magnitude over 127). The
    panels are ``[out / 16, in / 4, 16, 4]`` (both padded with zeros): 16 output rows' 4 consecutive weights side by
    side, what one ``vpdpbusd`` multiplies with 4 inputs broadcast. The row sums undo the 128 the inputs are
    shifted by to be unsigned.
    """
    rows, columns = weight.shape
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.clamp(torch.round(weight / scales[:, None]), -127, 127).to(torch.int8)
    padded_rows, padded_columns = -(-rows // PANEL) * PANEL, -(-columns // GROUP) * GROUP
    padded = torch.zeros(padded_rows, padded_columns, dtype=torch.int8)
    padded[:rows, :columns] = codes
    panels = padded.view(padded_rows // PANEL, PANEL, padded_columns // GROUP, GROUP).permute(0, 2, 1, 3).contiguous()
    sums = torch.zeros(padded_rows, dtype=torch.int32)
    sums[:rows] = codes.sum(dim=1, dtype=torch.int32)
    padded_scales = torch.zeros(padded_rows)
    padded_scales[:rows] = scales
    return panels, sums, padded_scales


def int8_linear(
    inputs: torch.Tensor,
    panels: torch.Tensor,
    sums: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_features: int,
) -> torch.Tensor:
    """``inputs @ weight.T + bias``, approximately, over a weight from `pack_int8_weight` (once `unavailable` is None).

    Each row of ``inputs`` (float32, ``[..., in]``) is quantized to 8 bits with its own scale, so a row's product is
    the same bits alone, in a batch or in a prompt.
    """
    outputs: torch.Tensor = torch.ops.hf_openai_server.int8_linear(inputs, panels, sums, scales, bias, out_features)
    return outputs


INT4_GROUP = 32
"""Inputs per int4 group: each group of each output row has its own scale and minimum (GGUF's q4_1 blocks)."""


def pack_int4_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``, ``in`` a multiple of 32) as 4-bit codes per group of 32, packed for `int4_linear`.

    Asymmetric per group, as GGUF's q4_1: a weight is ``code * scale + minimum``, codes 0 to 15, the scale and
    minimum float16 (a q4_1 file's own, so its weights come back exactly where a group spans codes 0 to 15). Returns
    ``[out / 16, in / 32, 320]`` bytes: per panel of 16 output rows and group, four 64-byte blocks of codes (block
    ``j``: each row's inputs ``4j..4j+3`` in the low nibbles, ``4j+16..4j+19`` in the high ones), then the 16 scales
    and the 16 minimums.
    """
    rows, columns = weight.shape
    padded_rows = -(-rows // PANEL) * PANEL
    groups = torch.zeros(padded_rows, columns // INT4_GROUP, INT4_GROUP)
    groups[:rows] = weight.detach().float().reshape(rows, -1, INT4_GROUP)
    minimum = groups.amin(dim=-1).half()
    scale = ((groups.amax(dim=-1) - minimum.float()) / 15).half()
    steps = scale.float().unsqueeze(-1)
    codes = torch.where(steps > 0, torch.round((groups - minimum.float().unsqueeze(-1)) / steps), 0).clamp(0, 15)
    codes = codes.to(torch.uint8).view(padded_rows // PANEL, PANEL, -1, INT4_GROUP).transpose(1, 2)  # [P, G, 16, 32]

    def blocks(half: torch.Tensor) -> torch.Tensor:  # [P, G, 16, 16] -> [P, G, 4, 64]: block j, row, 4 inputs
        panels, count = half.shape[0], half.shape[1]
        return half.reshape(panels, count, PANEL, 4, GROUP).transpose(2, 3).reshape(panels, count, 4, PANEL * GROUP)

    nibbles = blocks(codes[..., :16]) | (blocks(codes[..., 16:]) << 4)
    panels, count = nibbles.shape[0], nibbles.shape[1]

    def as_bytes(values: torch.Tensor) -> torch.Tensor:  # [rows, groups] float16 -> [P, G, 32] bytes
        return values.view(panels, PANEL, count).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([nibbles.reshape(panels, count, -1), as_bytes(scale), as_bytes(minimum)], dim=-1).contiguous()


def int4_linear(
    inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, *, out_features: int
) -> torch.Tensor:
    """``inputs @ weight.T + bias``, approximately, over a weight from `pack_int4_weight` (once `unavailable` is None).

    Each group of 32 inputs of each row (float32) is quantized to 8 bits with its own scale, so a row's product is
    the same bits alone, in a batch or in a prompt.
    """
    outputs: torch.Tensor = torch.ops.hf_openai_server.int4_linear(inputs, packed, bias, out_features)
    return outputs


def pack_float_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``, float32) packed for `float_linear`: ``[out / 16, in, 16]``, rows padded with zeros.

    Each input's weights of 16 output rows side by side, what one fused multiply-add takes with the input broadcast.
    """
    rows, columns = weight.shape
    padded_rows = -(-rows // PANEL) * PANEL
    weight = weight.detach().float()
    if padded_rows != rows:  # else no copy but the packed one: a weight of 100 MB or more is packed at load
        weight = torch.cat((weight, weight.new_zeros(padded_rows - rows, columns)))
    return weight.view(padded_rows // PANEL, PANEL, columns).transpose(1, 2).contiguous()


def float_linear(
    inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, *, out_features: int
) -> torch.Tensor:
    """``inputs @ weight.T + bias`` in float32, over a weight from `pack_float_weight` (`unavailable` is None).

    Each output is summed over its inputs in order with fused multiply-adds, so a row's product is the same bits
    alone, in a batch or in a prompt.
    """
    outputs: torch.Tensor = torch.ops.hf_openai_server.float_linear(inputs, packed, bias, out_features)
    return outputs


OWN_ATTENTION = "hf_openai_server_own_attention"
"""The attribute `use_own_attention` sets on an attention block whose one-query attention takes our kernel."""


def one_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Each query position's attention as a one-token step at its place computes it, ``[rows, fed, heads, dim]``.

    By our kernel (once `unavailable` is None). ``query``: ``[rows, heads, fed, dim]``, the positions of ``key``'s
    last ``fed`` columns; ``key``/``value``: ``[rows, key heads, columns, dim]``; ``mask``: boolean ``[rows, 1, fed,
    columns]`` (True: attend) or ``None`` (each position sees the columns up to its own). A head size that is a
    multiple of 16 up to 256, at most 8 query heads a key head (`attends`).
    """
    output: torch.Tensor = torch.ops.hf_openai_server.one_query_attention.default(query, key, value, mask, scaling)
    return output


def attends(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `one_query_attention` takes these shapes (else the caller keeps torch's)."""
    heads, key_heads = query.shape[1], key.shape[1]
    plain_mask = mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == query.shape[2])
    return (
        query.device.type == "cpu"
        and query.dtype == torch.float32
        and heads % key_heads == 0
        and _heads_fit(query.shape[-1], heads // key_heads)
        and plain_mask
    )


def _heads_fit(head_dim: int, groups: int) -> bool:
    """Whether `one_query_attention`'s registers take heads of ``head_dim`` with ``groups`` query heads a key head."""
    return head_dim % 16 == 0 and head_dim <= 256 and groups <= 8  # noqa: PLR2004  the kernel's registers


def use_own_attention(model: nn.Module) -> int:
    """Mark the attention blocks of ``model`` (those with ``num_key_value_groups``) for our one-query kernel.

    Both transformers' forward and the engine's lean pass read the mark (`attention.one_position`, the decoder's
    layer plans), so they keep computing the same numbers. Returns how many blocks were marked.
    """
    marked = 0
    for module in model.modules():
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            setattr(module, OWN_ATTENTION, True)
            marked += 1
    log.info("native.attention.done", marked=marked)
    return marked


class OwnRMSNorm(nn.Module):
    """A Llama-style RMS norm (``weight * x / sqrt(mean(x^2) + eps)``, in float32) through our ``rms_norm`` kernel.

    Takes over the norm's own ``weight`` (the same parameter) and epsilon.
    """

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` normed along its last dimension."""
        normed: torch.Tensor = torch.ops.hf_openai_server.rms_norm(hidden, self.weight, self.variance_epsilon)
        return normed

    def extra_repr(self) -> str:
        """Its size and epsilon, as transformers' norms show theirs."""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, own kernel"


def product_parts(module: nn.Module) -> list[torch.Tensor | None] | None:
    """A product's weights as `OwnAttentionInput` and `OwnLayerOutput` pass them to our kernels, else ``None``.

    ``[weights, sums, scales, bias]`` of an int8, int4 or float32 layer on our kernels (``native_parts``, which
    ``quantization.NativeInt8Linear`` and ``NativeInt4Linear`` and ``packing.OwnPackedLinear`` have); ``None`` for any
    other module.
    """
    parts = getattr(module, "native_parts", None)
    return parts() if callable(parts) else None


class OwnAttentionInput(nn.Module):
    """A Llama-style layer up to its attention (norm, stacked q/k/v product, rotation) in one op of our own.

    The lean pass's ``AttentionInput`` (``engine/decoder.py``) where its parts are ours (`own_halves`): the same
    kernels in the same order, without an op dispatch for each view, slice and product between them.
    """

    def __init__(self, norm: OwnRMSNorm, product: nn.Module, sizes: tuple[int, int], head_dim: int) -> None:
        super().__init__()
        self.norm = norm
        self.product = product
        self.queries_size, self.keys_size = sizes
        self.head_dim = head_dim

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``hidden``, as ``AttentionInput.forward`` gives them."""
        norm, product = self.norm, self.product
        outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = torch.ops.hf_openai_server.attention_input.default(
            hidden,
            norm.weight,
            norm.variance_epsilon,
            product_parts(product),
            product.out_features,
            cos,
            sin,
            self.queries_size,
            self.keys_size,
            self.head_dim,
        )
        return outputs


class OwnLayerOutput(nn.Module):
    """A Llama-style layer after its attention (output product, residual, norm, gated SiLU MLP, residual) in one op.

    The lean pass's ``LayerOutput`` where its parts are ours (`own_halves`); the activation is our ``silu`` (`OwnSiLU`).
    """

    def __init__(self, o_proj: nn.Module, norm: OwnRMSNorm, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.o_proj = o_proj
        self.norm = norm
        self.gate_up = gate_up
        self.down_proj = down
        self.gate_size = down.in_features

    def forward(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output, as ``LayerOutput.forward`` gives it."""
        norm = self.norm
        output: torch.Tensor = torch.ops.hf_openai_server.layer_output.default(
            hidden,
            attended,
            product_parts(self.o_proj),
            norm.weight,
            norm.variance_epsilon,
            product_parts(self.gate_up),
            self.gate_size,
            product_parts(self.down_proj),
        )
        return output


class OwnDecodingStep:
    """A decoding step of a layer whose halves are ours (`own_halves`) and whose attention is our kernel's.

    What `OwnDecodingSteps` runs for the layer: `OwnAttentionInput`, the new keys and values into the cache's new
    columns, ``one_query_attention``, `OwnLayerOutput`; the lean pass's calls, in the same order.
    """

    def __init__(self, attention_input: OwnAttentionInput, output: OwnLayerOutput, scaling: float) -> None:
        self.attention_input = attention_input
        self.output = output
        self.scaling = scaling

    def arguments(self) -> tuple[list[torch.Tensor | None], list[float], list[int]]:
        """The layer's share of ``DecodingLayers``' arguments (``kernels.cpp``): its parts, floats and sizes."""
        first, second = self.attention_input, self.output
        parts = [
            first.norm.weight,
            second.norm.weight,
            *(product_parts(first.product) or ()),
            *(product_parts(second.o_proj) or ()),
            *(product_parts(second.gate_up) or ()),
            *(product_parts(second.down_proj) or ()),
        ]
        floats = [first.norm.variance_epsilon, second.norm.variance_epsilon, self.scaling]
        qkv_out, gate_size = cast("int", first.product.out_features), cast("int", second.gate_size)
        sizes = [qkv_out, first.queries_size, first.keys_size, first.head_dim, gate_size]
        return parts, floats, sizes


class OwnDecodingSteps:
    """A decoding step of every layer of a model in one op (``decode_layers``), where each layer has `OwnDecodingStep`.

    Each layer's parts are checked once, here, and held by a ``DecodingLayers`` of ours: a step then costs one op
    call, where one a layer took 20 us of Python and argument conversion each (0.7 of SmolLM2's 6.6 ms int8 step at
    batch 1, on a 2-core AMD EPYC).
    """

    def __init__(self, steps: list[OwnDecodingStep]) -> None:
        parts: list[torch.Tensor | None] = []
        floats: list[float] = []
        sizes: list[int] = []
        for step in steps:
            layer_parts, layer_floats, layer_sizes = step.arguments()
            parts += layer_parts
            floats += layer_floats
            sizes += layer_sizes
        self.layers = torch.classes.hf_openai_server.DecodingLayers(parts, floats, sizes)

    def __call__(
        self,
        hidden: torch.Tensor,
        angles: tuple[torch.Tensor, torch.Tensor],
        columns: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The last layer's output for ``hidden`` (``[rows, fed, hidden]``: a decoding step's or verifying pass's).

        ``angles``: the rotary cosines and signed sines, as `OwnAttentionInput` takes them; ``columns``: each layer's
        cached keys and values, every column, the ``fed`` new ones last (written here); ``mask``: boolean ``[rows,
        1, fed, columns]`` (causal among the new positions) or ``None``. Each new position attends as a one-token
        step at its place would (``attention.each_query``'s numbers).
        """
        cos, sin = angles
        keys = [pair[0] for pair in columns]
        values = [pair[1] for pair in columns]
        output: torch.Tensor = torch.ops.hf_openai_server.decode_layers.default(
            self.layers, hidden, cos, sin, keys, values, mask
        )
        return output


def own_step(halves: tuple[OwnAttentionInput, OwnLayerOutput], attention: Any) -> OwnDecodingStep | None:  # noqa: ANN401
    """A layer's share of the one-op step (`OwnDecodingStep`) where its attention block takes our kernel, else ``None``.

    The block must be marked (`use_own_attention`), with a float ``scaling``, and of shapes `attends` takes (a head
    size that is a multiple of 16 up to 256, at most 8 query heads a key head).
    """
    head_dim, groups, scaling = attention.head_dim, attention.num_key_value_groups, attention.scaling
    if not getattr(attention, OWN_ATTENTION, False) or not isinstance(scaling, float):
        return None
    return OwnDecodingStep(*halves, scaling) if _heads_fit(head_dim, groups) else None


def own_halves(
    layer: Any,  # noqa: ANN401  a Llama-style decoder layer
    attention_products: list[nn.Module],
    mlp_products: list[nn.Module],
) -> tuple[OwnAttentionInput, OwnLayerOutput] | None:
    """``layer``'s two halves around its attention as ops of our own, where every part is ours; else ``None``.

    ``attention_products``/``mlp_products``: the products the lean pass calls (one stacked q/k/v product, one stacked
    gate/up product, else the parts themselves). Ours: both norms `OwnRMSNorm`, the activation `OwnSiLU`, both
    products stacked, those and ``o_proj`` and ``down_proj`` on our kernels (`product_parts`: int8, int4 or float32),
    gate and up of one size, an even head size.
    """
    attention, down = layer.self_attn, layer.mlp.down_proj
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    products = (*attention_products, attention.o_proj, *mlp_products, down)
    stacked = len(attention_products) == len(mlp_products) == 1
    if not stacked or not all(isinstance(norm, OwnRMSNorm) for norm in norms):
        return None
    if not isinstance(layer.mlp.act_fn, OwnSiLU):
        return None
    if any(product_parts(product) is None for product in products) or attention.head_dim % 2:
        return None
    if mlp_products[0].out_features != 2 * down.in_features:
        return None
    sizes = (attention.q_proj.out_features, attention.k_proj.out_features)
    return (
        OwnAttentionInput(norms[0], attention_products[0], sizes, attention.head_dim),
        OwnLayerOutput(attention.o_proj, norms[1], mlp_products[0], down),
    )


class OwnSiLU(nn.Module):
    """``x * sigmoid(x)`` by our ``silu`` kernel, standing in for a model's SiLU activations (`use_own_activations`).

    The gated MLP of `OwnLayerOutput` computes the same bits; torch's ``silu`` differs from it in the last bits.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` through SiLU, elementwise."""
        outputs: torch.Tensor = torch.ops.hf_openai_server.silu(inputs)
        return outputs


SILU_CLASSES: tuple[type[nn.Module], ...] = tuple(
    kind for kind in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if kind is not None
)
"""The SiLU activations `OwnSiLU` stands in for: ``nn.SiLU``, and transformers' own class."""


NORM_PROBE_BOUND = 1e-5
"""How far `OwnRMSNorm` may be from the norm it replaces, relative to the largest output (another summation order)."""


def use_own_norms(model: nn.Module) -> int:
    """Replace each float32 Llama-style RMS norm of ``model`` on the CPU with an `OwnRMSNorm`; return how many.

    A norm qualifies when it holds a 1-D float32 ``weight`` and a ``variance_epsilon``, and gives `OwnRMSNorm`'s
    output to `NORM_PROBE_BOUND` on a probe (Gemma's ``1 + weight`` or any other formula does not). The kernels
    must be loaded (`unavailable` is ``None``).
    """
    generator = torch.Generator().manual_seed(0)
    found = [
        (parent, name, child, parts)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (parts := _norm_parts(child)) is not None
    ]
    replaced = 0
    with torch.no_grad():
        for parent, name, child, (weight, epsilon) in found:
            own = OwnRMSNorm(weight, epsilon)
            probe = torch.randn(3, weight.numel(), generator=generator) * 4
            expected, actual = child(probe), own(probe)
            if float((expected - actual).abs().max()) <= NORM_PROBE_BOUND * float(expected.abs().max()):
                setattr(parent, name, own)
                replaced += 1
    log.info("native.norms.done", replaced=replaced, found=len(found))
    return replaced


def use_own_activations(model: nn.Module) -> int:
    """Replace each SiLU activation module of ``model`` (`SILU_CLASSES`, exactly) with an `OwnSiLU`; return how many.

    For a model on the CPU whose products are ours, so that transformers' forward and `OwnLayerOutput` compute the
    same gate (the kernels must be loaded).
    """
    found = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in SILU_CLASSES
    ]
    for parent, name in found:
        setattr(parent, name, OwnSiLU())
    log.info("native.activations.done", replaced=len(found))
    return len(found)


def _norm_parts(module: nn.Module) -> tuple[nn.Parameter, float] | None:
    """A norm's float32 CPU weight (1-D) and ``variance_epsilon``, if ``module`` has both, else ``None``."""
    weight, epsilon = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, nn.Parameter) or not isinstance(epsilon, float):
        return None
    if weight.dim() != 1 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    return weight, epsilon


__all__ = [
    "OWN_ATTENTION",
    "SILU_CLASSES",
    "OwnAttentionInput",
    "OwnDecodingStep",
    "OwnDecodingSteps",
    "OwnLayerOutput",
    "OwnRMSNorm",
    "OwnSiLU",
    "attends",
    "float_linear",
    "int4_linear",
    "int8_linear",
    "isa",
    "one_query_attention",
    "own_halves",
    "own_step",
    "pack_float_weight",
    "pack_int4_weight",
    "pack_int8_weight",
    "product_parts",
    "unavailable",
    "use_own_activations",
    "use_own_attention",
    "use_own_norms",
]
