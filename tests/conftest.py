"""Shared fixtures: the real app factory around a FakeGenerator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings()


@pytest.fixture
def client(fake: FakeGenerator, settings: ServerSettings) -> Iterator[TestClient]:
    with TestClient(app=create_app(settings, generator=fake)) as test_client:
        yield test_client


@pytest.fixture
def live_url(fake: FakeGenerator, settings: ServerSettings) -> Iterator[str]:
    """Base URL of a real server (uvicorn, loopback) backed by the FakeGenerator."""
    with serve(create_app(settings, generator=fake)) as base:
        yield base


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``ray`` start a Ray cluster (minutes): they run only when ``-m`` names them (``nox -s ray``)."""
    selection = config.getoption("markexpr") or ""
    if "ray" in selection.replace("not ray", ""):
        return
    skip = pytest.mark.skip(reason="starts a Ray cluster: run with -m ray (nox -s ray)")
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(skip)
