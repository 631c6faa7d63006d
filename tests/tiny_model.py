"""A tiny random Llama with a real trained tokenizer, built offline in a second, for tests that need a model."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|begin_of_text|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "our robot", "the old man", "a small bird", "she", "he")
_VERBS = ("eats", "sees", "likes", "writes", "reads", "finds", "wants", "builds", "paints", "sings about")
_OBJECTS = ("an apple", "the red book", "a long letter", "some bread", "the blue sky", "a song", "the river", "code")
_TAILS = ("today.", "every morning.", "in the garden.", "with joy!", "again?", "quickly.", "at night.", "for fun.")
_EXTRA = (
    "Hello, world! How are you?",
    "Café, naïve, résumé, jalapeño, Zürich, Ångström.",
    "你好，世界。今天天气很好。",  # noqa: RUF001  full-width punctuation is the point
    "日本語のテキストです。",
    "Emoji: 😀 🎉 🚀 👍🏽 ❤️",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14 1,000",
    "def add(a, b):\n    return a + b",
    "Ünïcödé ßtraße — “quotes” and ‘apostrophes’…",  # noqa: RUF001  typographic quotes are the point
)


def training_text(lines: int = 400, *, seed: int = 0) -> list[str]:
    """Deterministic English-ish sentences plus a few accented, CJK and emoji lines."""
    rng = random.Random(seed)
    text = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(lines)
    ]
    return text + list(_EXTRA) * 5


def build_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens, a BOS that ``add_special_tokens`` prepends, and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=256,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def tied_tiny_llama(vocab_size: int, *, seed: int = 0) -> LlamaForCausalLM:
    """A one-layer random Llama in memory whose output projection shares the input embedding's weight."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_tiny_model(
    directory: Path,
    *,
    vocab_size: int = 400,
    seed: int = 0,
    context_length: int = 256,
    hidden_size: int = 32,
    intermediate_size: int | None = None,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and its tokenizer into ``directory``; return ``directory``.

    ``intermediate_size``: the MLP's width (twice ``hidden_size`` by default).

    Loadable with ``AutoModelForCausalLM.from_pretrained(directory)`` and ``AutoTokenizer.from_pretrained(directory)``.
    The weights are random (seeded), so output is gibberish but deterministic.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.model_max_length = context_length
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_lora(
    directory: Path,
    base: Path,
    *,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rank: int = 4,
) -> Path:
    """Save a tiny PEFT LoRA adapter for the tiny model at ``base`` into ``directory``; return ``directory``.

    PEFT starts ``lora_B`` at zero (the adapter changes nothing until trained); here both matrices are random and
    seeded, so the adapter changes the model's output.
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415  only tests make adapters

    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    peft_model.save_pretrained(directory)
    return directory
