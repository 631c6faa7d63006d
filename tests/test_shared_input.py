"""Linear layers that read one input, stacked into one product: same logits, same names, undone when unsafe."""

from __future__ import annotations

import threading

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn
from transformers import AutoModelForCausalLM

from adapters.huggingface.loading import load_model
from adapters.huggingface.packing import PACKED_LAYERS
from adapters.huggingface.shared_input import SharedInput, SharedInputSlice, stack_shared_input_linears
from tests.tiny_model import build_tiny_model

PROBE = torch.tensor([[1, 2, 3, 4, 5]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-shared-input"))


def load(model_dir) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_attention_and_mlp_projections_are_stacked_and_the_logits_agree(model_dir):
    plain, stacked = load(model_dir), load(model_dir)
    layers = len(plain.model.layers)
    assert stack_shared_input_linears(stacked, PROBE) == 5 * layers  # q, k, v; gate, up
    attention, mlp = stacked.model.layers[0].self_attn, stacked.model.layers[0].mlp
    for module in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
        assert type(module) is SharedInputSlice
    assert type(attention.o_proj) is nn.Linear
    assert type(mlp.down_proj) is nn.Linear
    assert attention.k_proj.out_features == plain.model.layers[0].self_attn.k_proj.out_features
    assert attention.k_proj.weight.shape == plain.model.layers[0].self_attn.k_proj.weight.shape
    assert sum(type(m) is SharedInput for m in stacked.modules()) == 2 * layers
    ids = torch.randint(0, 400, (3, 17), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(stacked, ids), logits(plain, ids), rtol=1e-4, atol=1e-5)


def test_greedy_generation_is_token_for_token_the_same(model_dir):
    plain, stacked = load(model_dir), load(model_dir)
    stack_shared_input_linears(stacked, PROBE)
    ids = torch.tensor([[1, 7, 42, 99, 5]])
    with torch.inference_mode():
        expected = plain.generate(ids, max_new_tokens=12, do_sample=False)
        actual = stacked.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(actual, expected)


def test_threads_running_the_model_at_once_each_get_their_own_outputs(model_dir):
    plain, stacked = load(model_dir), load(model_dir)
    stack_shared_input_linears(stacked, PROBE)
    inputs = [torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    expected = [logits(plain, ids) for ids in inputs]
    failures: list[int] = []

    def run(index: int) -> None:
        outputs = [logits(stacked, inputs[index]) for _ in range(10)]
        failures.extend(index for output in outputs if not torch.allclose(output, expected[index], atol=1e-5))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


class ChangesItsInput(nn.Module):
    """Two layers read one tensor, which is changed in place between them: stacking would give other outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = self.first(hidden)
        hidden.mul_(2)
        return first + self.second(hidden)


class TinyLanguageModel(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = body

    def forward(self, input_ids: torch.Tensor, **_: object) -> object:
        return type("Output", (), {"logits": self.body(self.embed(input_ids))})()


def test_stacking_that_changes_the_logits_is_undone():
    torch.manual_seed(0)
    model = TinyLanguageModel(ChangesItsInput())
    expected = logits(model, PROBE)
    with capture_logs() as logs:
        assert stack_shared_input_linears(model, PROBE) == 0
    assert [entry["event"] for entry in logs] == ["model.shared_input.undone"]
    assert type(model.body.first) is nn.Linear
    assert type(model.body.second) is nn.Linear
    assert not any(type(m) is SharedInput for m in model.modules())
    assert torch.equal(logits(model, PROBE), expected)


def test_a_model_the_probe_cannot_run_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with capture_logs() as logs:
        assert stack_shared_input_linears(model, PROBE) == 0
    assert logs[0]["event"] == "model.shared_input.unavailable"
    assert all(type(m) is nn.Linear for m in model)


def test_loading_stacks_then_packs_on_the_cpu_and_not_when_asked_for_plain_layers(model_dir):
    packed = load_model(str(model_dir), device="cpu", progress=False)
    plain = load_model(str(model_dir), device="cpu", progress=False, pack_weights=False)
    attention = packed.model.model.layers[0].self_attn
    assert type(attention.q_proj) is SharedInputSlice
    assert type(attention.shared_input_0.product) in {*PACKED_LAYERS, nn.Linear}
    assert not any(type(m) is SharedInputSlice for m in plain.model.modules())
