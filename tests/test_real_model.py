"""The whole server on a tiny real model (random Llama weights, a real BPE tokenizer), loaded in the lifespan."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM

from entrypoints.bootstrap import Services, build_services
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.tiny_model import build_tiny_model

USER = [{"role": "user", "content": "Tell me a story about the sea."}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def ready_client(settings: ServerSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the tiny model never loaded"
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[TestClient]:
    yield from ready_client(ServerSettings(model=str(tiny_model), device="cpu"))


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 24, "temperature": 0} | body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_text(client: TestClient, path: str, body: dict) -> str:
    text = ""
    for block in client.post(path, json=body | {"stream": True}).text.split("\n\n"):
        if block.startswith("data: {"):
            choice = json.loads(block.removeprefix("data: "))["choices"]
            if choice:
                text += choice[0].get("text") or choice[0].get("delta", {}).get("content") or ""
    return text


def test_models_names_the_directory(client: TestClient, tiny_model: Path) -> None:
    assert client.get("/v1/models").json()["data"][0]["id"] == tiny_model.name  # its name, not a server path


def test_greedy_chat_is_deterministic_and_counts_real_tokens(client: TestClient) -> None:
    first, second = chat(client), chat(client)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["usage"]["completion_tokens"] <= 24
    assert first["usage"]["prompt_tokens"] > 10
    if first["choices"][0]["finish_reason"] == "length":
        assert first["usage"]["completion_tokens"] == 24


def test_the_tokenizers_chat_template_renders_the_prompt(client: TestClient) -> None:
    with structlog.testing.capture_logs() as logs:
        chat(client, max_tokens=2)
    prompt = next(entry["prompt"] for entry in logs if entry["event"] == "prompt.tokenized")
    assert prompt.startswith("<|im_start|>user\nTell me a story")
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_text_equals_the_whole_answer(client: TestClient, path: str) -> None:
    body: dict = {"max_tokens": 24, "temperature": 0}
    body |= {"messages": USER} if path.endswith("chat/completions") else {"prompt": "Once upon a time, café 日本 🎉"}
    whole = client.post(path, json=body).json()["choices"][0]
    text = whole.get("text", whole.get("message", {}).get("content"))
    assert streamed_text(client, path, body) == text


def test_a_stop_sequence_from_the_middle_cuts_the_answer(client: TestClient) -> None:
    text = chat(client)["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]
    cut = chat(client, stop=[stop])
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = streamed_text(
        client, "/v1/chat/completions", {"messages": USER, "max_tokens": 24, "temperature": 0, "stop": [stop]}
    )
    assert streamed == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client: TestClient) -> None:
    sampled = [chat(client, temperature=1.0, seed=11)["choices"][0]["message"]["content"] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_hf_parameters_change_the_output(client: TestClient) -> None:
    greedy = chat(client)["choices"][0]["message"]["content"]
    penalised = chat(client, repetition_penalty=3.0, no_repeat_ngram_size=2)["choices"][0]["message"]["content"]
    beams = chat(client, num_beams=3, length_penalty=0.5, early_stopping=True)
    assert beams["choices"][0]["finish_reason"] in {"stop", "length"}
    assert greedy != penalised or greedy != beams["choices"][0]["message"]["content"]


def test_invalid_hf_values_are_400s(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, "bad_words_ids": [[10**7]]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "bad_words_ids"


def test_prompt_beyond_the_context_window_is_refused(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "sea " * 400})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_bf16_weights_serve(tiny_model: Path) -> None:
    for client in ready_client(ServerSettings(model=str(tiny_model), device="cpu", dtype="bf16")):
        assert chat(client, max_tokens=4)["usage"]["completion_tokens"] >= 1


def test_health_and_api_answer_503_while_the_model_loads() -> None:
    release = threading.Event()

    def slow_loader(settings: ServerSettings) -> Services:
        release.wait(timeout=30)
        return build_services(settings, FakeGenerator())

    with TestClient(create_app(ServerSettings(), loader=slow_loader)) as client:
        health = client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        with structlog.testing.capture_logs() as logs:
            refused = client.post("/v1/chat/completions", json={"messages": USER})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_not_ready"
        assert [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("request.")] == [
            ("request.unavailable", "warning")  # an expected refusal, without an error's traceback
        ]
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post("/v1/chat/completions", json={"messages": USER}).status_code == 200


def test_a_model_that_fails_to_load_reports_error_and_calls_back() -> None:
    failures: list[BaseException] = []

    def broken_loader(settings: ServerSettings) -> Services:
        raise RuntimeError("weights are corrupt")

    with TestClient(create_app(ServerSettings(), loader=broken_loader, on_load_failure=failures.append)) as client:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/health").json() == {"status": "error"}
        assert (
            "weights are corrupt"
            in client.post("/v1/chat/completions", json={"messages": USER}).json()["error"]["message"]
        )


def reference_logprobs(model_dir: Path, token_ids: list[int]) -> list[float]:
    """Log-probabilities of ``token_ids[1:]`` computed directly with transformers, to check the server against."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i, token]) for i, token in enumerate(token_ids[1:])]


def test_echo_scoring_matches_a_direct_forward_pass(client: TestClient, tiny_model: Path) -> None:
    tokens = client.post("/tokenize", json={"prompt": "The sea is calm tonight"}).json()["tokens"]
    body = {"prompt": [tokens], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    served = choice["logprobs"]["token_logprobs"]
    assert served[0] is None
    assert served[1:] == pytest.approx(reference_logprobs(tiny_model, tokens), abs=1e-4)
    assert len(choice["logprobs"]["text_offset"]) == len(tokens)


def test_lm_eval_loglikelihood_request_on_a_real_model(client: TestClient, tiny_model: Path) -> None:
    """lm-eval's local-completions payload: the continuation's logprobs are ``token_logprobs[ctxlen:-1]``."""
    context = client.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    continuation = client.post("/tokenize", json={"prompt": " the sea", "add_special_tokens": False}).json()["tokens"]
    payload = {
        "model": "m",
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    choice = client.post("/v1/completions", json=payload).json()["choices"][0]
    token_logprobs = choice["logprobs"]["token_logprobs"][len(context) : -1]
    expected = reference_logprobs(tiny_model, context + continuation)[len(context) - 1 :]
    assert token_logprobs == pytest.approx(expected, abs=1e-4)


def test_greedy_logprobs_name_the_most_likely_token(client: TestClient) -> None:
    choice = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)["choices"][0]
    for entry in choice["logprobs"]["content"]:
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert entry["logprob"] <= 0


def test_logit_bias_forces_a_token(client: TestClient) -> None:
    token = client.post("/tokenize", json={"prompt": "sea", "add_special_tokens": False}).json()["tokens"][0]
    answer = chat(client, max_tokens=4, logit_bias={str(token): 100})
    ids = client.post(
        "/tokenize", json={"prompt": answer["choices"][0]["message"]["content"], "add_special_tokens": False}
    )
    assert set(ids.json()["tokens"]) == {token}


def test_presence_and_frequency_penalties_change_greedy_output(client: TestClient) -> None:
    plain = chat(client, max_tokens=24)["choices"][0]["message"]["content"]
    penalised = chat(client, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0)["choices"][0]["message"]
    assert penalised["content"] != plain


def test_n_seeded_choices_are_reproducible_and_the_first_matches_n_1(client: TestClient) -> None:
    body = chat(client, max_tokens=5, n=3, temperature=1.0, seed=3)
    again = chat(client, max_tokens=5, n=3, temperature=1.0, seed=3)
    single = chat(client, max_tokens=5, temperature=1.0, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"] for c in body["choices"]] == [c["message"] for c in again["choices"]]
    assert body["choices"][0]["message"] == single["choices"][0]["message"]
    assert 3 <= body["usage"]["completion_tokens"] <= 15
    assert body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]


def test_a_repeated_prompt_is_read_from_the_prefix_cache_and_says_so(client: TestClient) -> None:
    messages = [{"role": "user", "content": "The old man paints the river at night. " * 6 + "What does he paint?"}]
    first = chat(client, messages=messages)
    again = chat(client, messages=messages)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 16 * ((prompt_tokens - 1) // 16)}
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    streamed = client.post(
        "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}
        | {"stream_options": {"include_usage": True}},
    ).text
    usage = json.loads(streamed.split("data: ")[-2])["usage"]
    assert usage["prompt_tokens_details"] == again["usage"]["prompt_tokens_details"]


# The peers' extras on a real tokenizer and model ----------------------------------------------------------------


def generated_ids(client: TestClient, answer: dict) -> list[int]:
    text = answer["choices"][0]["message"]["content"]
    return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def test_allowed_token_ids_are_the_only_tokens_generated_even_when_sampling(client: TestClient) -> None:
    allowed = client.post("/tokenize", json={"prompt": " sea sky", "add_special_tokens": False}).json()["tokens"]
    for seed in range(3):
        answer = chat(client, max_tokens=8, temperature=1.0, top_k=5, seed=seed, allowed_token_ids=allowed)
        assert set(generated_ids(client, answer)) <= set(allowed)


def test_a_stop_token_id_ends_generation_like_end_of_sequence(client: TestClient) -> None:
    free = chat(client, max_tokens=12)
    produced = generated_ids(client, free)
    stopper = produced[2]
    stopped = chat(client, max_tokens=12, stop_token_ids=[stopper])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == produced.index(stopper) + 1


def test_ignore_eos_generates_the_whole_budget(client: TestClient) -> None:
    answer = chat(client, max_tokens=30, ignore_eos=True, temperature=1.0, seed=1)
    assert answer["usage"]["completion_tokens"] == 30
    assert answer["choices"][0]["finish_reason"] == "length"


def test_tokenize_token_strs_are_the_tokenizers_own_strings(client: TestClient, tiny_model: Path) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415  only this test needs the tokenizer alone

    counted = client.post("/tokenize", json={"messages": USER, "return_token_strs": True}).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert counted["token_strs"] == tokenizer.convert_ids_to_tokens(counted["tokens"])
    assert any(piece.startswith("Ġ") for piece in counted["token_strs"])  # byte-level spaces, not decoded text


def test_prompt_logprobs_rank_each_prompt_token_among_the_models_alternatives(client: TestClient) -> None:
    body = {"prompt": "The sea is calm tonight", "max_tokens": 1, "prompt_logprobs": 3, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    positions = answer["choices"][0]["prompt_logprobs"]
    assert positions[0] is None
    for position in positions[1:]:
        alternatives = sorted(position.values(), key=lambda p: p["rank"])
        assert [p["rank"] for p in alternatives][:3] == [1, 2, 3] or len(position) == 4
        best = max(p["logprob"] for p in position.values())
        assert next(p for p in position.values() if p["rank"] == 1)["logprob"] == pytest.approx(best)
