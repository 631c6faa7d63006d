"""The one table of generation options: each option's type and range checked once, in one message style."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

from domain.errors import InvalidRequestError
from domain.options import OPTIONS, Kind, option, read_options, unbatched
from tests.fakes import FakeGenerator

OUTSIDE = {
    "temperature": -0.5,
    "top_p": 1.5,
    "presence_penalty": 2.5,
    "frequency_penalty": -3,
    "seed": 2**63,
    "top_k": -1,
    "typical_p": 0,
    "min_p": 1.5,
    "epsilon_cutoff": -0.1,
    "eta_cutoff": 2,
    "repetition_penalty": 0,
    "no_repeat_ngram_size": -1,
    "encoder_no_repeat_ngram_size": -2,
    "bad_words_ids": [[]],
    "min_length": -1,
    "min_new_tokens": -1,
    "num_beams": 0,
    "num_beam_groups": 0,
    "diversity_penalty": -1.0,
    "length_penalty": float("inf"),
    "early_stopping": "sometimes",
    "guidance_scale": -1,
    "do_sample": 1,
    "ignore_eos": "yes",
}


def test_every_option_has_a_value_it_refuses() -> None:
    assert set(OUTSIDE) == {row.name for row in OPTIONS}


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_a_value_outside_an_options_range_is_refused_naming_it(name: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        option(name).check(OUTSIDE[name])
    assert raised.value.param == name
    assert raised.value.message.startswith(f"`{name}` must ")
    assert raised.value.message.endswith(f", got {OUTSIDE[name]!r}.")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("top_k", -1, "`top_k` must be >= 0, got -1."),
        ("typical_p", 0, "`typical_p` must be in (0, 1], got 0."),
        ("top_p", 1.5, "`top_p` must be in [0, 1], got 1.5."),
        ("repetition_penalty", 0, "`repetition_penalty` must be > 0, got 0."),
        ("top_k", 2.5, "`top_k` must be an integer, got 2.5."),
        ("top_k", True, "`top_k` must be an integer, got True."),
        ("min_p", "0.1", "`min_p` must be a number, got '0.1'."),
        ("bad_words_ids", [[1, -2]], "`bad_words_ids` must hold token ids (integers >= 0), got [[1, -2]]."),
        ("min_tokens", -1, "`min_tokens` must be >= 0, got -1."),
    ],
)
def test_one_message_style(name: str, value: object, message: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        option(name).check(value, sent_as=name)
    assert raised.value.message == message
    assert raised.value.param == name


def test_options_are_split_from_other_fields_and_typed() -> None:
    fields = {"top_k": 3, "min_p": 0, "bad_words_ids": [[1, 2]], "frobnicate": 1, "typical_p": None}
    options, others = read_options(fields)
    assert options == {"top_k": 3, "min_p": 0.0, "bad_words_ids": ((1, 2),)}
    assert isinstance(options["min_p"], float)
    assert others == {"frobnicate": 1}


def test_options_a_dialect_declares_itself_are_not_read_from_other_fields() -> None:
    """Anthropic's Messages API has no presence_penalty: sent there, it is an unknown field, not an option."""
    assert read_options({"presence_penalty": 1.0, "top_k": 2}) == ({"top_k": 2}, {"presence_penalty": 1.0})


def test_an_alias_lands_under_the_options_own_name_and_two_names_at_once_are_refused() -> None:
    assert read_options({"min_tokens": 4}) == ({"min_new_tokens": 4}, {})
    with pytest.raises(InvalidRequestError) as raised:
        read_options({"min_tokens": 4, "min_new_tokens": 5})
    assert "two names" in raised.value.message


def test_what_only_generates_alone_is_told_by_the_table() -> None:
    assert unbatched({"num_beams": 1, "guidance_scale": 1.0, "top_k": 5}) == []
    assert unbatched({"num_beams": 3, "diversity_penalty": 0.5, "guidance_scale": 2.0}) == [
        "num_beams",
        "diversity_penalty",
        "guidance_scale",
    ]


def test_the_schema_fragment_says_what_the_check_enforces() -> None:
    assert option("typical_p").schema() == {
        "description": option("typical_p").doc,
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
    }
    assert option("early_stopping").kind is Kind.EARLY_STOPPING


# Through every dialect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/responses", {"input": "Hi"}),
        ("/v1/messages", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}),
    ],
)
def test_every_dialect_reads_the_tables_options(
    client: TestClient, fake: FakeGenerator, path: str, body: dict[str, object]
) -> None:
    fake.reply = "ok"
    response = client.post(path, json=body | {"top_k": 5, "min_tokens": 2, "repetition_penalty": 1.2})
    assert response.status_code == 200, response.text
    assert fake.calls[-1][1].options == {"top_k": 5, "min_new_tokens": 2, "repetition_penalty": 1.2}
    refused = client.post(path, json=body | {"typical_p": 1.5})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"] == "`typical_p` must be in (0, 1], got 1.5."
    if path != "/v1/messages":
        assert error["param"] == "typical_p"
    else:
        assert refused.json()["type"] == "error"


def test_a_dialects_own_narrower_range_is_the_tables_check_with_its_bound(client: TestClient) -> None:
    openai = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 2.5}
    )
    assert openai.json()["error"]["message"].endswith("`temperature` must be in [0, 2], got 2.5.")
    anthropic = client.post(
        "/v1/messages", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 1.5}
    )
    assert anthropic.status_code == 400
    assert anthropic.json()["error"]["message"].endswith("`temperature` must be in [0, 1], got 1.5.")


def test_bad_words_outside_the_vocabulary_are_a_400(client: TestClient, fake: FakeGenerator) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "bad_words_ids": [[fake.vocab_size]]}
    error = client.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "bad_words_ids"
    assert "outside the vocabulary" in error["message"]


def test_the_published_schema_lists_the_tables_options_with_their_ranges(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        properties = body["properties"]
        assert properties["typical_p"]["exclusiveMinimum"] == 0, path
        assert properties["typical_p"]["maximum"] == 1, path
        assert properties["min_tokens"]["minimum"] == 0, path
        top_k = properties["top_k"]
        assert 0 in [top_k.get("minimum"), *(branch.get("minimum") for branch in top_k.get("oneOf", []))], path
