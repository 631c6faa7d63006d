"""What a models directory serves, and how much a model takes on disk (the budget's guess before it loads)."""

from __future__ import annotations

from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_files(directory: Path) -> dict[str, Path]:
    """Each model in ``directory`` by name: subdirectories with a ``config.json``, and ``.gguf`` files."""
    from adapters.huggingface.loading import gguf_model_id  # noqa: PLC0415  torch loads only when serving

    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and (path / "config.json").is_file():
            found.setdefault(path.name, path)
        elif path.is_file() and path.suffix.lower() == ".gguf":
            found.setdefault(gguf_model_id(path), path)
    return found


def model_size(source: str | None) -> int:
    """Bytes of weights at ``source`` on disk (0 when it is not a local path): what loading it will take, roughly."""
    if source is None:
        return 0
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return 0


__all__ = ["model_files", "model_size"]
