"""LoRA adapters on tiny real models: per-row application in one batch, the HTTP endpoints, bad adapters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from litestar.testing import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.huggingface.lora import AdapterFiles, AdapterGenerator, LoraAdapters, LoraWeights
from adapters.huggingface.packing import PackedLinear, packing_supported
from adapters.huggingface.quantization import Int8Linear, kernel_works
from domain.generation import GenerationParams
from entrypoints.bootstrap import load_services
from entrypoints.http.app import create_app
from entrypoints.settings import LoraChoice, ModelChoice, ServerSettings
from tests.test_lean_decoder import counted
from tests.tiny_model import build_tiny_lora, build_tiny_model

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ("The cat eats an apple", "Hello, world! How are", "a dog sees the red book in the garden and")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny models, two adapters for the first, one for the second (which has other shapes)."""
    root = tmp_path_factory.mktemp("lora")
    alpha = build_tiny_model(root / "alpha", seed=0)
    beta = build_tiny_model(root / "beta", seed=1, hidden_size=48)
    misfit = build_tiny_lora(root / "misfit", beta, seed=3)  # made for beta, but says it is for alpha
    config = json.loads((misfit / "adapter_config.json").read_text())
    (misfit / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(alpha)}))
    return {
        "alpha": alpha,
        "beta": beta,
        "pirate": build_tiny_lora(root / "pirate", alpha, seed=1),
        "poet": build_tiny_lora(root / "poet", alpha, seed=2, targets=("k_proj", "o_proj", "up_proj", "lm_head")),
        "beta-lora": build_tiny_lora(root / "beta-lora", beta, seed=4),
        "misfit": misfit,
    }


def greedy(max_new_tokens: int = 12) -> GenerationParams:
    return GenerationParams(temperature=0, max_new_tokens=max_new_tokens, options={"ignore_eos": True})


def peft_reference(models: dict[str, Path], adapter: str | None, prompt_ids: list[int], tokens: int) -> list[int]:
    """What PEFT's own model generates, greedy, for ``adapter`` on alpha (``None``: the base model)."""
    model = AutoModelForCausalLM.from_pretrained(models["alpha"])
    if adapter is not None:
        model = PeftModel.from_pretrained(model, models[adapter])
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens)
    return output[0, len(prompt_ids) :].tolist()


async def collect(generator, prompt_ids: list[int], params: GenerationParams) -> list[int]:
    tokens: list[int] = []
    async with contextlib.aclosing(generator.generate(prompt_ids, params)) as steps:
        async for step in steps:
            tokens.extend(step.token_ids)
    return tokens


@contextlib.contextmanager
def base_and_two_adapters(models: dict[str, Path]) -> Iterator[tuple[Any, list[Any]]]:
    """Alpha served with pirate and poet attached: its generator, and the base's, pirate's and poet's."""
    services = load_services(ServerSettings(model=str(models["alpha"]), device="cpu"))
    try:
        assert services.adapters is not None
        assert services.generator is not None
        for name in ("pirate", "poet"):
            services.adapters.attach(f"{name}#0", _read(models[name]))
        base: Any = services.generator
        yield base, [base, AdapterGenerator(base, "pirate#0", "pirate"), AdapterGenerator(base, "poet#0", "poet")]
    finally:
        services.close()


def decode_together(generators: list[Any], prompts: list[list[int]]) -> list[list[int]]:
    """Each generator's greedy tokens for its prompt, all at once."""

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(g, p, greedy()) for g, p in zip(generators, prompts, strict=True))))

    return asyncio.run(together())


def test_base_and_two_adapters_in_one_batch_equal_each_alone_and_peft(models: dict[str, Path]) -> None:
    with base_and_two_adapters(models) as (base, generators):
        prompts = [base.encode(text, add_special_tokens=True) for text in PROMPTS]
        batch_sizes: list[int] = []
        hook = base.model.register_forward_pre_hook(
            lambda _m, _a, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        batched = decode_together(generators, prompts)
        hook.remove()
        alone = [asyncio.run(collect(g, p, greedy())) for g, p in zip(generators, prompts, strict=True)]
        assert max(batch_sizes) == 3  # the three rows did decode together
        assert batched == alone
        assert len({tuple(tokens) for tokens in alone[:1]} | {tuple(alone[1]), tuple(alone[2])}) == 3
        for adapter, prompt, tokens in zip((None, "pirate", "poet"), prompts, alone, strict=True):
            assert tokens == peft_reference(models, adapter, prompt, len(tokens))


def test_adapters_in_one_batch_decode_through_the_lean_decoder_as_peft(models: dict[str, Path]) -> None:
    """The engine's lean pass (no hook on the model) applies each row's adapter, stacked projections or not."""
    with base_and_two_adapters(models) as (base, generators):
        counter = counted(base)
        prompts = [base.encode(text, add_special_tokens=True) for text in PROMPTS]
        batched = decode_together(generators, prompts)
        assert max(counter.rows) == 3
        for adapter, prompt, tokens in zip((None, "pirate", "poet"), prompts, batched, strict=True):
            assert tokens == peft_reference(models, adapter, prompt, len(tokens))


@pytest.mark.skipif(not packing_supported(torch.float32), reason="oneDNN is not available here")
def test_on_a_packed_layer_a_rows_delta_is_the_same_alone_and_among_other_rows() -> None:
    """Bit for bit, as the packed layer's own product: speculation's verifying pass and a batch then give a row the
    logits of its one-token step alone (MKL's products round one to eight rows otherwise). Quantized layers get
    packed adapters too; a plain ``nn.Linear`` (unpacked on purpose) keeps PEFT's products."""
    generator = torch.Generator().manual_seed(5)
    a, b = torch.randn(8, 1536, generator=generator), torch.randn(96, 8, generator=generator)
    weights = LoraWeights(a, b, 0.5).packed_for(PackedLinear(torch.nn.Linear(1536, 96), keep_weight=False))
    assert weights.packed is not None
    inputs = torch.randn(6, 1, 1536, generator=generator)
    with torch.inference_mode():
        together = weights.delta(inputs)
        for count in (1, 2, 3):
            assert torch.equal(weights.delta(inputs[:count]), together[:count]), count
        expected = torch.nn.functional.linear(torch.nn.functional.linear(inputs, a), b) * 0.5
    assert torch.allclose(together, expected, rtol=1e-4, atol=1e-4)
    assert LoraWeights(a, b, 0.5).packed_for(torch.nn.Linear(1536, 96)).packed is None  # unpacked base: as PEFT
    if kernel_works("int8"):
        assert LoraWeights(a, b, 0.5).packed_for(Int8Linear(torch.nn.Linear(1536, 96))).packed is not None


def _read(path: Path) -> AdapterFiles:
    return AdapterFiles.read(path)


@contextlib.contextmanager
def served(models: dict[str, Path], *names: str, lora: str = "pirate") -> Iterator[TestClient]:
    """A server of the tiny models ``names`` and the adapter ``lora``, once it answers ``/health``."""
    settings = ServerSettings(
        models=tuple(ModelChoice(name=name, source=str(models[name])) for name in names),
        loras=(LoraChoice(name=lora, path=models[lora]),),
        device="cpu",
        api_keys=(KEY,),
    )
    with TestClient(create_app(settings)) as client:
        while client.get("/health").status_code != 200:
            pass
        yield client


@pytest.fixture
def client(models: dict[str, Path]) -> Iterator[TestClient]:
    with served(models, "alpha", "beta") as test_client:
        yield test_client


def complete(client: TestClient, model: str, prompt: str = PROMPTS[0], **extra: object) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True} | extra
    response = client.post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def test_adapters_are_listed_and_answer_under_their_own_name(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert set(cards) == {"alpha", "beta", "pirate"}
    assert cards["pirate"]["parent"] == "alpha"
    assert cards["beta"]["status"] == "unloaded"
    base, pirate = complete(client, "alpha"), complete(client, "pirate")
    assert pirate["model"] == "pirate"
    assert base["choices"][0]["text"] != pirate["choices"][0]["text"]
    assert client.get("/v1/models", headers=AUTH).json()["data"][1]["status"] == "unloaded"  # beta never asked for


def test_the_first_request_for_an_adapter_finds_it_whole_however_slowly_it_attaches(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is ready (health, requests) only once its adapters are attached: a request that came first ran on a
    half-attached adapter (or none), and got another answer than the next."""
    attach = LoraAdapters.attach

    def slow(self: LoraAdapters, key: str, adapter: AdapterFiles) -> None:
        time.sleep(0.5)
        attach(self, key, adapter)

    monkeypatch.setattr(LoraAdapters, "attach", slow)
    with served(models, "alpha") as client:
        first = complete(client, "pirate")["choices"]
        assert complete(client, "pirate")["choices"] == first
        assert complete(client, "alpha")["choices"] != first


def test_an_adapter_added_while_its_base_attaches_others_is_attached_too(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beta loads on demand with one adapter named at start; a second one comes while that one attaches. The load
    attaches only the adapters served when it began, so the new one must wait for it and attach itself."""
    attach, attaching = LoraAdapters.attach, threading.Event()

    def slow(self: LoraAdapters, key: str, adapter: AdapterFiles) -> None:
        if key.startswith("beta-lora#"):
            attaching.set()
        time.sleep(0.5)
        attach(self, key, adapter)

    monkeypatch.setattr(LoraAdapters, "attach", slow)
    with served(models, "alpha", "beta", lora="beta-lora") as client:
        loading = threading.Thread(target=complete, args=(client, "beta"))
        loading.start()
        assert attaching.wait(timeout=60)
        added = {"lora_name": "second", "lora_path": str(models["beta-lora"])}
        response = client.post("/v1/load_lora_adapter", json=added, headers=AUTH)
        loading.join()
        assert response.status_code == 200, response.text
        second = complete(client, "second")["choices"]
        assert second == complete(client, "beta-lora")["choices"]  # the same adapter under two names
        assert second != complete(client, "beta")["choices"]


def test_load_and_unload_an_adapter_at_run_time(client: TestClient, models: dict[str, Path]) -> None:
    load = {"lora_name": "pirate2", "lora_path": str(models["pirate"])}
    assert client.post("/v1/load_lora_adapter", json=load).status_code == 401  # behind the API key
    response = client.post("/v1/load_lora_adapter", json=load, headers=AUTH)
    assert response.status_code == 200, response.text
    assert complete(client, "pirate2")["choices"] == complete(client, "pirate")["choices"]
    assert client.post("/v1/load_lora_adapter", json=load, headers=AUTH).status_code == 400  # already served
    unload = {"lora_name": "pirate2"}
    assert client.post("/v1/unload_lora_adapter", json=unload, headers=AUTH).status_code == 200
    gone = client.post("/v1/completions", json={"model": "pirate2", "prompt": "x"}, headers=AUTH)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_found")
    assert client.post("/v1/unload_lora_adapter", json=unload, headers=AUTH).status_code == 404
    assert complete(client, "pirate")["model"] == "pirate"


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("missing", "adapter_config.json is missing"),
        ("alpha", "adapter_config.json is missing"),
        ("misfit", "does not fit"),
    ],
)
def test_a_bad_adapter_path_is_a_400_and_disturbs_nothing(
    client: TestClient, models: dict[str, Path], path: str, needle: str
) -> None:
    before = complete(client, "pirate")
    lora_path = str(models.get(path, models["alpha"].parent / path))
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": lora_path}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "lora_path"
    assert needle in response.json()["error"]["message"]
    assert client.get("/health").status_code == 200
    assert "bad" not in {card["id"] for card in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert complete(client, "pirate")["choices"] == before["choices"]


@pytest.mark.parametrize(
    "body", [{"lora_name": "x"}, {"lora_name": " ", "lora_path": "/tmp"}, {"lora_name": "alpha", "lora_path": "/tmp"}]
)
def test_a_bad_load_request_body_is_a_400(client: TestClient, body: dict) -> None:
    response = client.post("/v1/load_lora_adapter", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_cached_prompt_blocks_never_cross_adapters(client: TestClient) -> None:
    prompt = " ".join(PROMPTS * 2)
    base_first = complete(client, "alpha", prompt)
    assert complete(client, "alpha", prompt)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    pirate = complete(client, "pirate", prompt)
    assert pirate["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = complete(client, "pirate", prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"] == pirate["choices"]
    assert base_first["choices"] != pirate["choices"]


def test_an_adapter_goes_on_the_model_its_config_names_loaded_on_demand(
    client: TestClient, models: dict[str, Path]
) -> None:
    load = {"lora_name": "beta-lora", "lora_path": str(models["beta-lora"])}
    assert client.post("/v1/load_lora_adapter", json=load, headers=AUTH).status_code == 200
    cards = {card["id"]: card for card in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert (cards["beta-lora"]["parent"], cards["beta-lora"]["status"]) == ("beta", "unloaded")
    tuned, base = complete(client, "beta-lora"), complete(client, "beta")
    assert tuned["model"] == "beta-lora"
    assert tuned["choices"][0]["text"] != base["choices"][0]["text"]
    assert complete(client, "alpha")["model"] == "alpha"
