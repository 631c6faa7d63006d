"""Schemathesis against the served OpenAPI schema (``nox -s fuzz``; not part of the fast suite).

Every operation the schema publishes is exercised on a live loopback server backed by the fake generator, with
data that fits the schema and data that does not: no answer may be a 5xx, and every documented response must
match its schema. Operations and request bodies published later are picked up without touching this file.
``FUZZ_EXAMPLES`` sets the examples per operation and mode.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from entrypoints.http.app import create_app
from entrypoints.logs import configure_logging
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    configure_logging("WARNING")
    app = create_app(ServerSettings(), generator=FakeGenerator(reply="Fuzzed, and fine."))
    with serve(app) as url:
        yield url


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_responses_match_the_schema(base: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{base}/docs/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    if mode is GenerationMode.NEGATIVE:  # an operation without parameters or body has nothing to get wrong
        operations = [op for op in operations if any(map(len, (op.body, op.query, op.path_parameters, op.headers)))]
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=base, checks=CHECKS)
            statuses[operation.label, response.status_code] += 1  # noqa: B023  read while the loop is on it

        try:
            check()
        except Unsatisfiable:  # every value fits (a free-form string path parameter): nothing can be wrong
            assert mode is GenerationMode.NEGATIVE
    total = sum(statuses.values())
    print(f"\n{mode.value}: {total} requests over {len(operations)} operations, 0 server errors")  # noqa: T201
    for (label, status), count in sorted(statuses.items()):
        print(f"  {label:32} {status}: {count}")  # noqa: T201
    assert not [key for key in statuses if key[1] >= 500]
