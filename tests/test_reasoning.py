"""Reasoning models: thinking never reaches the answer text, in chat completions, Responses and Messages alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from application.reasoning import ReasoningSplitter, opens_thinking
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve, wait_ready
from tests.tiny_model import build_tiny_model

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if reasoning_effort is defined %}Effort: {{ reasoning_effort }}\n{% endif %}"
    "{% if add_generation_prompt %}Assistant:"
    "{% if enable_thinking is defined and enable_thinking is false %} <think>\n\n</think>\n\n"
    "{% else %} <think>\n{% endif %}{% endif %}"
)
"""Opens a thinking block unless ``enable_thinking`` is false, as SmolLM3's and Qwen3's templates do."""

USER = [{"role": "user", "content": "What is 2 + 2?"}]
THOUGHT = "<think>\nTwo and two.\n</think>\n\nIt is 4."


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def split(text: str, cuts: list[int], *, thinking: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(thinking)
    thought, answer = "", ""
    for piece in [*chunked(text, cuts), None]:
        more = splitter.flush() if piece is None else splitter.push(piece)
        thought, answer = thought + more[0], answer + more[1]
    return thought, answer


@given(
    st.text(alphabet="ab <>/thinkx\n", max_size=20).filter(lambda t: "</think>" not in t),
    st.text(alphabet="ab <>/thinkx\n", max_size=20),
    st.lists(st.integers(0, 60), max_size=8),
)
def test_thinking_is_split_off_however_the_text_is_chunked(thinking: str, answer: str, cuts: list[int]) -> None:
    text = f"<think>{thinking}</think>{answer}"
    assert split(text, cuts) == (thinking, answer.lstrip())


@given(st.text(max_size=30).filter(lambda t: not t.lstrip().startswith("<think>")), st.lists(st.integers(0, 40)))
def test_text_that_does_not_think_passes_unchanged(text: str, cuts: list[int]) -> None:
    assert split(text, cuts) == ("", text)


def test_thinking_the_prompt_opened_ends_at_the_closing_tag() -> None:
    assert split("Hmm.</think>\n\nYes.", [2, 9], thinking=True) == ("Hmm.", "Yes.")
    assert split("cut short", [3], thinking=True) == ("cut short", "")
    assert opens_thinking("Assistant: <think>\n")
    assert not opens_thinking("Assistant: <think>\n\n</think>\n\n")


@pytest.fixture
def thinking_settings(tmp_path: Path) -> ServerSettings:
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE, encoding="utf-8")
    return ServerSettings(chat_template=template)


@pytest.fixture
def thinking_client(fake: FakeGenerator, thinking_settings: ServerSettings) -> Iterator[TestClient]:
    with TestClient(app=create_app(thinking_settings, generator=fake)) as client:
        yield client


def test_chat_returns_thinking_as_reasoning_content(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = THOUGHT
    body = client.post("/v1/chat/completions", json={"messages": USER}).json()
    message = body["choices"][0]["message"]
    assert message["content"] == "It is 4."
    assert message["reasoning_content"] == message["reasoning"] == "\nTwo and two.\n"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(b"\nTwo and two.\n")


def test_chat_streams_thinking_apart_from_the_answer(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = THOUGHT
    response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "\nTwo and two.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
    assert not any("<think>" in (d.get("content") or "") for d in deltas)


def test_a_template_that_opens_thinking_has_the_model_think(thinking_client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "Two and two.</think>\n\nIt is 4."
    message = thinking_client.post("/v1/chat/completions", json={"messages": USER}).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Two and two.", "It is 4.")
    assert fake.prompt_text().endswith("Assistant: <think>\n")


def test_chat_template_kwargs_reach_the_template(thinking_client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "It is 4."
    body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low"}
    message = thinking_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "It is 4."}
    assert fake.prompt_text().endswith("Effort: low\nAssistant: <think>\n\n</think>\n\n")


def test_responses_return_a_reasoning_item(fake: FakeGenerator, thinking_settings: ServerSettings) -> None:
    fake.reply = "Two and two.</think>\n\nIt is 4."
    with serve(create_app(thinking_settings, generator=fake)) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        response = sdk.responses.create(model="m", input="What is 2 + 2?", reasoning={"effort": "high"})
        events = list(sdk.responses.create(model="m", input="What is 2 + 2?", stream=True))
        with sdk.responses.stream(model="m", input="What is 2 + 2?") as stream:
            final = stream.get_final_response()
    reasoning, _message = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.content is not None
    assert reasoning.content[0].text == "Two and two."
    assert response.output_text == "It is 4."
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == len(b"Two and two.")
    assert "Effort: high" in fake.prompt_text(0)
    thought = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert thought == "Two and two."
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == "It is 4."


def test_messages_return_a_thinking_block(fake: FakeGenerator, thinking_settings: ServerSettings) -> None:
    fake.reply = "Two and two.</think>\n\nIt is 4."
    with serve(create_app(thinking_settings, generator=fake)) as base:
        claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
        message = claude.messages.create(model="m", max_tokens=100, messages=USER)
        with claude.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
            kinds = [event.type for event in stream]
            streamed = stream.get_final_message()
        fake.reply = "It is 4."
        claude.messages.create(model="m", max_tokens=100, messages=USER, thinking={"type": "disabled"})
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Two and two."  # type: ignore[union-attr]
    assert message.content[1].text == "It is 4."  # type: ignore[union-attr]
    assert [block.type for block in streamed.content] == ["thinking", "text"]
    assert "thinking" in kinds
    assert fake.prompt_text().endswith("<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def tiny_thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    directory = tmp_path_factory.mktemp("tiny-thinking")
    model = build_tiny_model(directory / "model", context_length=512)
    template = directory / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE, encoding="utf-8")
    with serve(create_app(ServerSettings(model=str(model), device="cpu", chat_template=template))) as base:
        wait_ready(base)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_a_real_model_thinks_where_the_template_opens_thinking(tiny_thinking: openai.OpenAI) -> None:
    answer = tiny_thinking.chat.completions.create(model="m", messages=USER, max_tokens=12, seed=1)  # type: ignore[arg-type]
    message = answer.choices[0].message.model_dump()
    assert message["reasoning_content"]
    assert "<think>" not in (message["content"] or "")
    assert answer.usage is not None
    assert answer.usage.completion_tokens_details is not None
    assert 0 < (answer.usage.completion_tokens_details.reasoning_tokens or 0) <= answer.usage.completion_tokens
    plain = tiny_thinking.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        max_tokens=12,
        seed=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert "reasoning_content" not in plain.choices[0].message.model_dump()
    assert plain.choices[0].message.content


def test_thinking_sent_back_reaches_templates_that_read_it(fake: FakeGenerator, tmp_path: Path) -> None:
    template = tmp_path / "reads.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m.get('reasoning_content', '') }}|{{ m['content'] }}\n{% endfor %}"
    )
    with TestClient(create_app(ServerSettings(chat_template=template), generator=fake)) as client:
        messages = [*USER, {"role": "assistant", "content": "4", "reasoning_content": "2 + 2"}, *USER]
        assert client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    assert "assistant: 2 + 2|4" in fake.prompt_text()


def test_content_logging_off_keeps_instructions_and_input_out(fake: FakeGenerator) -> None:
    with (
        TestClient(create_app(ServerSettings(log_content=False), generator=fake)) as client,
        structlog.testing.capture_logs() as logs,
    ):
        client.post("/v1/responses", json={"input": "secret one", "instructions": "secret two"})
        client.post("/v1/messages", json={"messages": USER, "system": "secret three", "max_tokens": 5})
    assert "secret" not in repr(logs)
