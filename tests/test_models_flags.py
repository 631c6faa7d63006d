"""The flags and the config file that name many models and adapters, and what they become."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from entrypoints.http.__main__ import named_models, parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import LoraChoice, ModelChoice, ServerSettings
from tests.test_models import USER, Loader, statuses, wait_until


def model_dir(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text("{}")
    return root / name


def adapter_dir(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text("{}")
    return root / name


def test_model_is_repeatable_with_optional_names(tmp_path: Path) -> None:
    first, second = model_dir(tmp_path, "first"), model_dir(tmp_path, "second")
    settings = parse_settings(["--model", f"one={first}", "--model", str(second), "--model", "org/hub-model"])
    assert settings.models == (
        ModelChoice(name="one", source=str(first)),
        ModelChoice(source=str(second)),
        ModelChoice(source="org/hub-model"),
    )
    assert settings.model == str(first)
    assert parse_settings([]).models == ()


def test_budget_flags(tmp_path: Path) -> None:
    settings = parse_settings(
        ["--max-loaded-models", "2", "--max-model-memory", "1.5", "--model-idle-timeout", "60", "--preload", "a"]
    )
    assert (settings.max_loaded_models, settings.max_model_memory_gib) == (2, 1.5)
    assert (settings.model_idle_timeout, settings.preload) == (60.0, ("a",))
    for bad in (["--max-loaded-models", "0"], ["--max-model-memory", "-1"], ["--model-idle-timeout", "nan"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)


def test_lora_flags_need_an_adapter_directory(tmp_path: Path) -> None:
    pirate = adapter_dir(tmp_path, "pirate")
    assert parse_settings(["--lora", f"pirate={pirate}"]).loras == (LoraChoice(name="pirate", path=pirate),)
    for bad in (f"pirate={tmp_path}", str(pirate), f"={pirate}"):
        with pytest.raises(SystemExit):
            parse_settings(["--lora", bad])


def test_a_models_dir_serves_what_it_holds_found_again_when_it_changes(tmp_path: Path) -> None:
    model_dir(tmp_path, "beta")
    model_dir(tmp_path, "alpha")
    (tmp_path / "notes").mkdir()
    settings = named_models(parse_settings(["--models-dir", str(tmp_path)]))
    assert [choice.name for choice in settings.models] == ["alpha", "beta"]
    loader = Loader()
    with TestClient(create_app(settings, loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        assert statuses(client) == {"alpha": "loaded", "beta": "unloaded"}
        model_dir(tmp_path, "gamma")
        response = client.post("/v1/chat/completions", json={"model": "gamma", "messages": USER})
        assert response.json()["model"] == "gamma"
        assert "gamma" in statuses(client)
    with pytest.raises(ValueError, match="no models in"):
        named_models(parse_settings(["--models-dir", str(tmp_path / "notes")]))


def test_names_that_clash_or_preloads_that_name_nothing_are_refused(tmp_path: Path) -> None:
    first = model_dir(tmp_path, "first")
    with pytest.raises(ValueError, match="more than one"):
        named_models(parse_settings(["--model", f"x={first}", "--model", f"x={first}"]))
    with pytest.raises(ValueError, match="--preload"):
        named_models(parse_settings(["--model", f"x={first}", "--preload", "y"]))


def test_the_config_file_adds_models_and_adapters_and_sets_options_per_model(tmp_path: Path) -> None:
    alpha, beta = model_dir(tmp_path, "alpha"), model_dir(tmp_path, "beta")
    pirate = adapter_dir(tmp_path, "pirate")
    (tmp_path / "template.jinja").write_text("{{ messages[0]['content'] }}")
    config = tmp_path / "models.toml"
    config.write_text(
        f"""
[models.alpha]
stop_sequences = ["alpha"]

[models.beta]
path = "{beta}"
chat_template = "template.jinja"
dtype = "bf16"

[loras.pirate]
path = "pirate"
base = "beta"
"""
    )
    settings = named_models(parse_settings(["--model", f"alpha={alpha}", "--models-config", str(config)]))
    assert [choice.name for choice in settings.models] == ["alpha", "beta"]
    assert settings.loras == (LoraChoice(name="pirate", path=pirate, base="beta"),)
    beta_settings = settings.for_model(settings.models[1], ("beta",))
    assert (beta_settings.chat_template, beta_settings.dtype, beta_settings.stop_sequences) == (
        tmp_path / "template.jinja",
        "bf16",
        (),
    )
    assert settings.for_model(settings.models[0], ("alpha",)).stop_sequences == ("alpha",)


def test_per_model_stop_sequences_apply_to_that_model_only(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.beta]\nstop_sequences = ["beta"]\n')
    base = parse_settings(["--models-config", str(config)])
    settings = ServerSettings(
        models=(ModelChoice(name="alpha", source="alpha"), ModelChoice(name="beta", source="beta")),
        model_options=base.model_options,
    )
    with TestClient(create_app(settings, loader=Loader())) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        answers = {
            name: client.post("/v1/chat/completions", json={"model": name, "messages": USER}).json()
            for name in ("alpha", "beta")
        }
    assert answers["alpha"]["choices"][0]["message"]["content"] == "I am alpha."
    assert answers["beta"]["choices"][0]["message"]["content"] == "I am "


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[models.a]\nstop_sequences = 3\n", "list of strings"),
        ("[models.a]\ncolour = 'red'\n", "unknown keys"),
        ("[loras.p]\nbase = 'a'\n", "path is missing"),
        ("[other]\n", "unknown tables"),
        ("[models.a\n", "cannot read"),
        ("[models.a]\ndtype = 'int3'\n", "dtype must be one of"),
    ],
)
def test_a_bad_config_file_stops_the_server_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        parse_settings(["--models-config", str(config)])
    assert needle in capsys.readouterr().err
