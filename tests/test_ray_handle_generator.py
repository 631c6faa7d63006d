"""The handle-backed Generator (Ray's ingress side) over in-process fake replicas: no Ray needed.

The same app the single server runs, with the engine behind a replica client: answers, streams, errors, cancellation,
the wire format, prefix routing, per-replica metrics and readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from adapters.ray.board import ReplicaBoard
from adapters.ray.handle_generator import HandleGenerator
from adapters.ray.prefix_routing import BLOCK_TOKENS, PrefixAffinity, prefix_keys
from adapters.ray.replica import EngineFacts
from adapters.ray.wire import error_from_wire, error_to_wire, step_from_wire, step_to_wire
from domain.errors import ContextLengthExceededError, GenerationError, QueueFullError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams, TokenLogprob
from entrypoints.http.app import create_app
from entrypoints.http.metrics import Metrics
from entrypoints.ray.metrics import ReplicaCollector
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.ray_fakes import FakeReplicas, fake_replica

USER = [{"role": "user", "content": "Hello"}]


def ingress(*fakes: FakeGenerator, dies_after: int | None = None) -> tuple[HandleGenerator, FakeReplicas]:
    replicas = FakeReplicas({f"r{i}": fake_replica(fake) for i, fake in enumerate(fakes)}, dies_after=dies_after)
    tokenizer = fakes[0]
    facts = EngineFacts(tokenizer.model_id, tokenizer.context_length, tokenizer.vocab_size)
    return HandleGenerator(replicas, tokenizer, facts), replicas


def events_of(response) -> list:
    blocks = [block for block in response.text.split("\n\n") if block]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]


def test_a_chat_answer_through_a_replica_equals_the_single_server_answer() -> None:
    single, remote = FakeGenerator(reply="Hi there"), FakeGenerator(reply="Hi there")
    generator, replicas = ingress(remote)
    body = {"messages": USER, "temperature": 0}
    with TestClient(create_app(ServerSettings(), generator=single)) as client:
        expected = client.post("/v1/chat/completions", json=body).json()
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["choices"] == expected["choices"]
    assert answer["usage"] == expected["usage"]
    assert remote.calls[0][0] == single.calls[0][0], "the replica got the prompt the ingress tokenized"
    assert replicas.routed == ["r0"]


def test_a_stream_through_a_replica_carries_the_same_text() -> None:
    generator, _ = ingress(FakeGenerator(reply="Streamed answer"))
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    events = events_of(response)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Streamed answer"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_cached_tokens_reported_by_the_replica_reach_usage() -> None:
    generator, _ = ingress(FakeGenerator(cached_tokens=16))
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        body = client.post("/v1/completions", json={"prompt": "x" * 40, "max_tokens": 2}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}


def test_logprobs_and_scoring_cross_the_wire() -> None:
    bodies = [
        {"prompt": "Hey", "echo": True, "logprobs": 2, "max_tokens": 0},
        {"prompt": "Hey", "logprobs": 1, "max_tokens": 2},
        {"messages": USER, "logprobs": True, "top_logprobs": 2, "max_tokens": 3},
    ]
    generator, _ = ingress(FakeGenerator(reply="ab"))
    answers = []
    for app in (
        create_app(ServerSettings(), generator=FakeGenerator(reply="ab")),
        create_app(ServerSettings(), generator=generator),
    ):
        with TestClient(app) as client:
            paths = ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
            answers.append(
                [client.post(path, json=body).json()["choices"] for path, body in zip(paths, bodies, strict=True)]
            )
    single, remote = answers
    assert remote == single
    assert len(remote[0][0]["logprobs"]["token_logprobs"]) == 3


class FullQueueGenerator(FakeGenerator):
    async def generate(self, prompt_ids, params):
        raise QueueFullError("the queue is full")
        yield  # an async generator that refuses before its first step


def test_a_full_queue_on_the_replica_is_a_429_at_the_ingress() -> None:
    fake = FullQueueGenerator()
    generator, _ = ingress(fake)
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "queue_full"


def test_a_replica_lost_before_answering_is_a_503() -> None:
    generator, _ = ingress(FakeGenerator(reply="never seen"), dies_after=0)
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "replica_unavailable"
    assert response.headers["retry-after"]


def test_a_replica_lost_mid_stream_ends_the_stream_with_one_503_error_event() -> None:
    generator, _ = ingress(FakeGenerator(reply="abcdefgh"), dies_after=3)
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    events = events_of(response)
    assert events[-1]["error"]["code"] == "replica_unavailable"
    assert events[-1]["error"]["type"] == "service_unavailable"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "abc"


def test_an_engine_error_mid_stream_keeps_its_type() -> None:
    generator, _ = ingress(FakeGenerator(reply="abcdef", fail_after=2))
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert events_of(response)[-1]["error"]["type"] == "server_error"


def test_closing_the_stream_early_cancels_the_generation_on_the_replica() -> None:
    fake = FakeGenerator(reply="x" * 200, step_delay=0.01)
    generator, replicas = ingress(fake)

    async def read_two_then_leave() -> None:
        steps = generator.generate([1, 2, 3], GenerationParams(max_new_tokens=200))
        async with contextlib.aclosing(steps):
            await anext(steps)
            await anext(steps)
        await replicas.settle()

    asyncio.run(read_two_then_leave())
    assert replicas.streams[0].cancelled
    assert fake.closed_early == 1
    assert 2 <= fake.produced < 200
    replica = replicas.replicas["r0"]
    assert (replica.running, replica.waiting) == (0, 0)


def test_a_finished_stream_is_not_cancelled() -> None:
    generator, replicas = ingress(FakeGenerator(reply="ok"))

    async def read_all() -> list[GeneratedTokens]:
        return [step async for step in generator.generate([5, 6], GenerationParams())]

    steps = asyncio.run(read_all())
    assert steps[-1].finish_reason is FinishReason.STOP
    assert not replicas.streams[0].cancelled


def test_requests_sharing_a_prefix_go_to_the_replica_that_served_it() -> None:
    generator, replicas = ingress(FakeGenerator(), FakeGenerator())
    prompts = [
        f"{name} " * 40 + f"question {turn}" for name in ("alpha", "beta", "gamma", "delta") for turn in range(3)
    ]

    async def send_all() -> None:
        for prompt in prompts:
            ids = generator.encode(prompt, add_special_tokens=False)
            async for _ in generator.generate(ids, GenerationParams(max_new_tokens=1)):
                pass

    asyncio.run(send_all())
    by_conversation = [replicas.routed[i : i + 3] for i in range(0, len(prompts), 3)]
    assert all(len(set(turns)) == 1 for turns in by_conversation), by_conversation
    assert replicas.board.affinity.hits == len(prompts) - 4


def test_prefix_keys_cover_whole_blocks_before_the_last_token() -> None:
    assert prefix_keys(list(range(BLOCK_TOKENS))) == ()
    assert len(prefix_keys(list(range(BLOCK_TOKENS + 1)))) == 1
    assert len(prefix_keys(list(range(3 * BLOCK_TOKENS + 1)))) == 3


@given(st.lists(st.integers(0, 50_000), min_size=1, max_size=120), st.lists(st.integers(0, 50_000), max_size=60))
def test_prompts_share_the_keys_of_the_blocks_they_share(head: list[int], tail: list[int]) -> None:
    first, second = prefix_keys(head + tail), prefix_keys([*head, 7, *tail])
    shared = (len(head) - 1) // BLOCK_TOKENS
    assert first[:shared] == second[:shared]


def test_a_busy_prefix_owner_loses_the_request_to_the_least_loaded_replica() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(imbalance=2)
    affinity.record((1, 2, 3), "a")
    assert affinity.choose((1, 2, 3, 4), {"a": 2, "b": 0}) == "a"
    assert affinity.choose((1, 2, 3, 4), {"a": 3, "b": 0}) == "b"
    assert (affinity.hits, affinity.misses) == (1, 1)


def test_the_longest_remembered_prefix_wins_and_gone_replicas_are_forgotten() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity()
    affinity.record((1, 2, 3), "a")
    affinity.record((1,), "b")
    assert affinity.owner((1, 2, 3, 4), {"a": 0, "b": 0}) == "a"
    assert affinity.owner((1, 5), {"a": 0, "b": 0}) == "b"
    assert affinity.owner((1, 2, 3, 4), {"b": 0}) == "b"
    affinity.forget("b")
    assert affinity.owner((1, 5), {"a": 0, "b": 0}) is None
    assert affinity.owner((1, 2), {"a": 0, "b": 0}) == "a"


def test_the_table_forgets_the_least_recently_used_prefixes_first() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(capacity=2)
    affinity.record((1,), "a")
    affinity.record((2,), "a")
    affinity.record((1,), "a")
    affinity.record((3,), "b")
    assert affinity.owner((2,), {"a": 0, "b": 0}) is None
    assert affinity.owner((1,), {"a": 0, "b": 0}) == "a"


token_logprobs = st.builds(
    TokenLogprob,
    st.integers(0, 10**6),
    st.floats(-100, 0),
    st.lists(st.tuples(st.integers(0, 10**6), st.floats(-100, 0)), max_size=3).map(tuple),
    st.none() | st.integers(1, 100),
)


@given(
    st.builds(
        GeneratedTokens,
        st.lists(st.integers(0, 10**6), max_size=4).map(tuple),
        st.none() | st.sampled_from(FinishReason),
        st.lists(token_logprobs, max_size=3).map(tuple),
        st.integers(0, 4096),
    )
)
def test_a_step_survives_the_wire(step: GeneratedTokens) -> None:
    assert step_from_wire(step_to_wire(step)) == step


@pytest.mark.parametrize(
    "error", [QueueFullError("full"), ContextLengthExceededError("long", param="messages"), GenerationError("broke")]
)
def test_a_domain_error_survives_the_wire(error: Exception) -> None:
    back = error_from_wire(error_to_wire(error)["error"])  # type: ignore[arg-type]
    assert type(back) is type(error)
    assert (back.message, back.param) == (error.message, error.param)  # type: ignore[attr-defined]


def test_an_unknown_error_kind_is_a_generation_error() -> None:
    assert type(error_from_wire({"kind": "KeyError", "message": "x"})) is GenerationError


def test_health_is_503_until_a_replica_is_ready() -> None:
    board = ReplicaBoard()
    generator, _ = ingress(FakeGenerator())
    with TestClient(create_app(ServerSettings(), generator=generator, ready=board.ready)) as client:
        assert client.get("/health").status_code == 503
        board.update({"replica-1": {"running": 0}})
        assert client.get("/health").status_code == 200
        board.update({})
        assert client.get("/health").status_code == 503


def test_metrics_carry_each_replica_with_its_label() -> None:
    board = ReplicaBoard()
    board.update({"a1": {"running": 2, "waiting": 1, "prefix_cache_bytes": 4096}, "b2": {"running": 0}})
    board.affinity.record((9,), "a1")
    board.affinity.choose((9,), {"a1": 0, "b2": 0})
    metrics = Metrics.create()
    metrics.registry.register(ReplicaCollector(board))
    generator, _ = ingress(FakeGenerator())
    with TestClient(create_app(ServerSettings(), generator=generator, metrics=metrics)) as client:
        text = client.get("/metrics").text
    assert "hf_openai_replicas_running 2.0" in text
    assert 'hf_openai_replica_running{replica="a1"} 2.0' in text
    assert 'hf_openai_replica_waiting{replica="a1"} 1.0' in text
    assert 'hf_openai_replica_prefix_cache_bytes{replica="a1"} 4096.0' in text
    assert 'hf_openai_replica_running{replica="b2"} 0.0' in text
    assert 'hf_openai_prefix_routing_total{outcome="hit"} 1.0' in text


def test_a_replica_that_goes_away_is_dropped_from_the_affinity_table() -> None:
    board = ReplicaBoard()
    board.update({"a": {}, "b": {}})
    board.affinity.record((1,), "a")
    board.update({"b": {}})
    assert board.affinity.owner((1,), {"a": 0, "b": 0}) is None


def test_a_replica_sends_the_steps_ready_together_as_one_item() -> None:
    replica = fake_replica(FakeGenerator(reply="abcdef"))

    async def batches() -> list[list[dict]]:
        return [batch async for batch in replica.generate([1, 2], GenerationParams())]

    sent = asyncio.run(batches())
    steps = [step_from_wire(item) for batch in sent for item in batch]
    assert len(steps) == len("abcdef") + 2, "every token, the end-of-sequence token and the finish"
    assert len(sent) < len(steps)
    assert steps[-1].finish_reason is FinishReason.STOP
    assert (replica.running, replica.waiting) == (0, 0)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_n2_streams_on_a_lost_replica_end_with_one_503_error_event(path: str) -> None:
    generator, replicas = ingress(FakeGenerator(reply="x" * 100, step_delay=0.005), dies_after=3)
    replicas.dying_streams = 1
    body = {"messages": USER} if "chat" in path else {"prompt": "Hello"}
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post(path, json={**body, "n": 2, "stream": True})
    events = events_of(response)
    assert [event for event in events if "error" in event] == [events[-1]]
    assert events[-1]["error"]["code"] == "replica_unavailable"
    assert len(replicas.streams) == 2
    assert replicas.streams[1].cancelled, "the choice on a live replica was not stopped"


def test_an_n2_answer_on_a_lost_replica_is_a_503_and_the_other_choice_is_cancelled() -> None:
    fake = FakeGenerator(reply="x" * 100, step_delay=0.005)
    generator, replicas = ingress(fake, dies_after=3)
    replicas.dying_streams = 1
    with TestClient(create_app(ServerSettings(), generator=generator)) as client:
        response = client.post("/v1/chat/completions", json={"messages": USER, "n": 2})
        asyncio.run(replicas.settle())
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "replica_unavailable"
    assert replicas.streams[1].cancelled
    assert fake.produced < 100, "the choice still running was not stopped"
    replica = replicas.replicas["r0"]
    assert (replica.running, replica.waiting) == (0, 0)


def test_the_deployment_counts_draft_tokens_over_its_replicas_and_never_counts_down() -> None:
    board = ReplicaBoard()
    board.update({"a": {"draft_tokens": 10, "accepted_tokens": 6}, "b": {"draft_tokens": 4, "accepted_tokens": 1}})
    assert board.draft_tokens() == (14, 7)
    board.affinity.record((1,), "a")
    board.remove("a")
    assert board.affinity.owner((1,), {"a": 0, "b": 0}) is None, "a dead replica's prefixes are forgotten"
    assert set(board.replicas()) == {"b"}
    stale = {"a": {"draft_tokens": 8, "accepted_tokens": 5}, "b": {"draft_tokens": 5, "accepted_tokens": 1}}
    board.update(stale)  # a view from before "a" died
    assert board.draft_tokens() == (15, 7)
    board.update({"b": {"draft_tokens": 5, "accepted_tokens": 1}, "c": {"draft_tokens": 2, "accepted_tokens": 2}})
    assert board.draft_tokens() == (17, 9), "a replica that went is counted once, with its highest counts"


def test_the_ingress_metrics_carry_the_replicas_draft_tokens() -> None:
    replica = fake_replica(FakeGenerator())
    replica.draft_tokens = lambda: (12, 5)
    board = ReplicaBoard()
    board.update({"r0": replica.stats(), "r1": {"draft_tokens": 3, "accepted_tokens": 3}})
    metrics = Metrics.create(draft_tokens=board.draft_tokens)
    metrics.registry.register(ReplicaCollector(board))
    generator, _ = ingress(FakeGenerator())
    with TestClient(create_app(ServerSettings(), generator=generator, metrics=metrics)) as client:
        text = client.get("/metrics").text
    assert "hf_openai_spec_decode_draft_tokens_total 15.0" in text
    assert "hf_openai_spec_decode_accepted_tokens_total 8.0" in text
