"""``--models-config FILE``: per-model options (and further models and adapters) in TOML.

```toml
[models.tiny]                 # a name: options for the model served under it (--model, --models-dir)
path = "/models/tiny"         # with a path, the file also adds the model
chat_template = "chatml.jinja"   # relative paths are relative to this file
stop_sequences = ["###"]
dtype = "bf16"
device = "cpu"

[loras.pirate]
path = "/adapters/pirate"
base = "tiny"                 # default: the model its adapter_config.json names, else the first model
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from entrypoints.settings import LoraChoice, ModelChoice

MODEL_KEYS = frozenset({"path", "chat_template", "stop_sequences", "dtype", "device"})
LORA_KEYS = frozenset({"path", "base"})


class ModelsConfigError(ValueError):
    """The file cannot be read, or says something the server does not take; the message says where."""


@attrs.frozen
class ModelsConfig:
    """What a models config file says: models to serve, options by model name, adapters."""

    served: tuple[ModelChoice, ...] = ()
    options: tuple[ModelChoice, ...] = ()
    loras: tuple[LoraChoice, ...] = ()


def read_models_config(file: Path) -> ModelsConfig:
    """Read ``file``; ``ModelsConfigError`` names the table and key at fault."""
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        msg = f"cannot read {file}: {error}"
        raise ModelsConfigError(msg) from error
    unknown = set(document) - {"models", "loras"}
    if unknown:
        msg = f"{file}: unknown tables {sorted(unknown)} (expected [models.NAME] and [loras.NAME])"
        raise ModelsConfigError(msg)
    here = file.parent
    models = [_model(name, table, here, file) for name, table in _tables(document, "models", file)]
    loras = [_lora(name, table, here, file) for name, table in _tables(document, "loras", file)]
    return ModelsConfig(
        served=tuple(model for model in models if model.source is not None),
        options=tuple(models),
        loras=tuple(loras),
    )


def _tables(document: dict[str, Any], kind: str, file: Path) -> list[tuple[str, dict[str, Any]]]:
    section = document.get(kind, {})
    if not isinstance(section, dict) or not all(isinstance(table, dict) for table in section.values()):
        msg = f"{file}: [{kind}] must hold one table per name, e.g. [{kind}.NAME]"
        raise ModelsConfigError(msg)
    return list(section.items())


def _check_keys(table: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        msg = f"{where}: unknown keys {sorted(unknown)} (known: {sorted(allowed)})"
        raise ModelsConfigError(msg)
    wrong = [key for key, value in table.items() if key != "stop_sequences" and not isinstance(value, str)]
    if wrong:
        msg = f"{where}: {wrong[0]} must be a string"
        raise ModelsConfigError(msg)


def _model(name: str, table: dict[str, Any], here: Path, file: Path) -> ModelChoice:
    where = f"{file} [models.{name}]"
    _check_keys(table, MODEL_KEYS, where)
    stops = table.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        msg = f"{where}: stop_sequences must be a list of strings"
        raise ModelsConfigError(msg)
    template = table.get("chat_template")
    if template is not None and not (here / template).is_file():
        msg = f"{where}: no such chat template file: {here / template}"
        raise ModelsConfigError(msg)
    path = table.get("path")
    return ModelChoice(
        name=name,
        source=None if path is None else _local(path, here),
        chat_template=None if template is None else here / template,
        stop_sequences=None if stops is None else tuple(stops),
        dtype=table.get("dtype"),
        device=table.get("device"),
    )


def _lora(name: str, table: dict[str, Any], here: Path, file: Path) -> LoraChoice:
    where = f"{file} [loras.{name}]"
    _check_keys(table, LORA_KEYS, where)
    if "path" not in table:
        msg = f"{where}: path is missing"
        raise ModelsConfigError(msg)
    return LoraChoice(name=name, path=Path(_local(table["path"], here)), base=table.get("base"))


def _local(path: str, here: Path) -> str:
    """A path relative to the config file when it exists there; otherwise as written (a hub id)."""
    candidate = here / Path(path).expanduser()
    return str(candidate) if not Path(path).is_absolute() and candidate.exists() else str(Path(path).expanduser())


__all__ = ["ModelsConfig", "ModelsConfigError", "read_models_config"]
