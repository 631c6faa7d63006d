"""``/tokenize`` and ``/detokenize``: the counts the completion endpoints use, in vLLM's shapes."""

from __future__ import annotations

from litestar.testing import TestClient

from tests.fakes import FakeGenerator


def test_tokenize_a_prompt(client: TestClient) -> None:
    body = client.post("/tokenize", json={"prompt": "héllo"}).json()
    assert body == {
        "count": 6,
        "max_model_len": 4096,
        "tokens": [ord("h") + 1, 196, 170, 109, 109, 112],
        "token_strs": None,
    }


def test_tokenize_messages_counts_like_a_chat_completion(client: TestClient, fake: FakeGenerator) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    counted = client.post("/tokenize", json={"messages": messages}).json()["count"]
    usage = client.post("/v1/chat/completions", json={"messages": messages}).json()["usage"]
    assert counted == usage["prompt_tokens"]
    assert fake.decode(
        client.post("/tokenize", json={"messages": messages}).json()["tokens"], skip_special_tokens=True
    ) == ("User: Hi\nAssistant:")


def test_token_strings_on_request(client: TestClient) -> None:
    body = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert body["token_strs"] == ["a", "b"]


def test_detokenize_round_trips(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"prompt": "round trip ✓"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "round trip ✓"}


def test_bad_tokenize_and_detokenize_bodies_are_400s(client: TestClient) -> None:
    for path, body in [
        ("/tokenize", {}),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
        ("/tokenize", {"messages": []}),
        ("/tokenize", {"prompt": 5}),
        ("/detokenize", {}),
        ("/detokenize", {"tokens": ["a"]}),
        ("/detokenize", {"tokens": [100000]}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
