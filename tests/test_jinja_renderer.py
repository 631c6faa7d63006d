"""Chat templates: the priority between sources, HF conventions, and template errors as 400s."""

from __future__ import annotations

import pytest

from adapters.jinja_renderer import FALLBACK_TEMPLATE, JinjaTemplateRenderer
from domain.errors import InvalidRequestError
from domain.messages import ChatMessage, Role

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.USER, "Hi")]


def test_file_template_wins_over_the_tokenizers() -> None:
    renderer = JinjaTemplateRenderer.choose(
        override="{{ messages[-1]['content'] }}!", tokenizer_template=CHATML, bos_token=None, eos_token=None
    )
    assert renderer.render(CONVERSATION, add_generation_prompt=True) == "Hi!"


def test_tokenizer_template_is_used_without_an_override() -> None:
    renderer = JinjaTemplateRenderer.choose(override=None, tokenizer_template=CHATML, bos_token=None, eos_token=None)
    assert renderer.render(CONVERSATION, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_fallback_template_without_any_other() -> None:
    renderer = JinjaTemplateRenderer.choose(override=None, tokenizer_template=None, bos_token=None, eos_token=None)
    assert renderer.source == FALLBACK_TEMPLATE
    assert renderer.render(CONVERSATION, add_generation_prompt=True) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert renderer.render(CONVERSATION, add_generation_prompt=False) == "System: Be brief.\nUser: Hi\n"


def test_special_tokens_and_generation_prompt_flag_reach_the_template() -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}>{% endif %}"
    renderer = JinjaTemplateRenderer(template, "<s>", "</s>")
    assert renderer.render(CONVERSATION, add_generation_prompt=True) == "<s>Be brief.</s>Hi</s>>"


def test_raise_exception_in_a_template_is_a_client_error() -> None:
    renderer = JinjaTemplateRenderer("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        renderer.render(CONVERSATION, add_generation_prompt=True)


def test_sandbox_blocks_attribute_escapes() -> None:
    renderer = JinjaTemplateRenderer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        renderer.render(CONVERSATION, add_generation_prompt=True)


def test_tojson_keeps_unicode() -> None:
    renderer = JinjaTemplateRenderer("{{ messages[0] | tojson }}")
    assert renderer.render([ChatMessage(Role.USER, "ça")], add_generation_prompt=False) == (
        '{"role": "user", "content": "ça"}'
    )


def test_a_broken_template_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="invalid chat template"):
        JinjaTemplateRenderer("{% for %}")
