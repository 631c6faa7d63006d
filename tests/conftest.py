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
