"""The ``Generator`` port over a transformers causal LM: one worker thread generates, the event loop streams."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import re
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import structlog
import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from adapters.huggingface.constraints import GrammarCompiler
from adapters.huggingface.delivery import ThreadToLoop
from adapters.huggingface.lora import selecting
from adapters.huggingface.model_facts import ModelFacts, TellsModelFacts
from adapters.huggingface.processors import LogprobRecorder, request_processors, token_logprob
from adapters.huggingface.threads import on_own_thread
from domain.errors import ContextLengthExceededError, DomainError, GenerationError, InvalidRequestError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams, TokenLogprob
from domain.options import OPTIONS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = structlog.get_logger(__name__)

T = TypeVar("T")

GROUP_BEAM_SEARCH_REPO = Path(__file__).parent / "group_beam_search"
"""A local ``custom_generate`` repo with diverse beam search, which transformers 5 moved to the Hub."""

SAMPLING_OPTIONS = frozenset({"temperature", *(row.name for row in OPTIONS if row.sampling)})
"""Options that only matter when sampling: greedy requests may carry them (OpenAI clients do) without error."""

OWN_OPTIONS = frozenset({"ignore_eos"})
"""Options of the table this adapter gives a meaning of its own (they are not ``GenerationConfig`` attributes)."""

FORBIDDEN_EXTRA_OPTIONS = frozenset(
    {
        # what the server owns: output shape, special tokens, lengths, stop strings
        "return_dict_in_generate",
        "num_return_sequences",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "max_length",
        "stop_strings",
        "token_healing",
        "transformers_version",
        # caches, compilation and batching are deployment choices, not request options
        "cache_config",
        "cache_implementation",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "low_memory",
        "watermarking_config",
        # assisted / speculative decoding needs a second model
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "prompt_lookup_num_tokens",
        "max_matching_ngram_size",
        "target_lookbehind",
        "speculation_type",
        "use_mtp",
        # modes transformers 5 moved to the Hub: they would try to download code
        "constraints",
        "force_words_ids",
        "dola_layers",
        "penalty_alpha",
    }
)
"""``GenerationConfig`` attributes a request's extra options may not set."""

FORBIDDEN_EXTRA_PREFIXES = ("_", "output_", "assistant_")

_MINOR_ISSUE = re.compile(r"^- `(\w+)`:", re.MULTILINE)
_BACKTICKED = re.compile(r"`(\w+)`")


@functools.cache
def extra_option_names() -> frozenset[str]:
    """``GenerationConfig`` attributes a request may set through ``GenerationParams.extra``."""
    return frozenset(
        name
        for name in GenerationConfig().to_dict()  # type: ignore[no-untyped-call]
        if name not in FORBIDDEN_EXTRA_OPTIONS and not name.startswith(FORBIDDEN_EXTRA_PREFIXES)
    )


def check_combinations(params: GenerationParams) -> None:
    """Reject combinations of options generation would choke on (each option's range is checked by the wire)."""
    beams, groups = params.options.get("num_beams", 1), params.options.get("num_beam_groups", 1)
    if isinstance(beams, int) and isinstance(groups, int) and beams % groups:
        msg = f"`num_beams` ({beams}) must be divisible by `num_beam_groups` ({groups})."
        raise InvalidRequestError(msg, param="num_beam_groups")
    if params.logprobs is not None and params.uses_beams:
        raise InvalidRequestError("`logprobs` cannot be combined with beam search.", param="logprobs")


def build_generation_config(
    base: GenerationConfig,
    params: GenerationParams,
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
) -> GenerationConfig:
    """The ``GenerationConfig`` for one request: the model's defaults, the request's options, then validation.

    Temperature 0 means greedy decoding; with neither temperature nor top_p given, sampling at temperature 1 (OpenAI's
    default) unless beam search was asked for. ``params.extra`` may set other ``GenerationConfig`` attributes, bar
    those the server owns; unknown ones are logged and ignored. Raises ``InvalidRequestError`` naming the bad option.
    """
    check_combinations(params)
    allowed = extra_option_names()
    extra = {name: value for name, value in params.extra.items() if name in allowed}
    ignored = sorted(set(params.extra) - set(extra))
    if ignored:
        log.info("generation.ignored_options", options=ignored)
        warn_unknown_options(ignored)

    named = _named_options(params)
    named |= _token_options(params, {**extra, **named}, vocab_size=vocab_size)
    beams = params.options.get("num_beams", base.num_beams or 1)
    updates = extra | named | _sampling(params, beams=isinstance(beams, int) and beams > 1)
    if "do_sample" in named:
        updates["do_sample"] = named["do_sample"]

    config = copy.deepcopy(base)
    eos_token_ids = tuple(dict.fromkeys((*eos_token_ids, *params.stop_token_ids)))
    if eos_token_ids:
        config.eos_token_id = list(eos_token_ids)
    if config.pad_token_id is None and eos_token_ids:
        config.pad_token_id = eos_token_ids[0]
    user_set = set(updates)
    if not updates["do_sample"]:
        user_set -= SAMPLING_OPTIONS
    try:
        config.update(**updates)  # type: ignore[no-untyped-call]
        _validate(config, user_set)
    except (ValueError, TypeError) as error:
        msg = f"Invalid generation options: {error}"
        raise InvalidRequestError(msg, param=_param_of(error, updates)) from error
    if (config.num_beam_groups or 1) > 1 and config.do_sample:
        raise InvalidRequestError(
            "Diverse beam search (`num_beam_groups` > 1) does not sample: use temperature 0 or leave it unset.",
            param="num_beam_groups",
        )
    return config


def _named_options(params: GenerationParams) -> dict[str, Any]:
    """The request's options under ``GenerationConfig``'s names (the table's, bar those given a meaning here)."""
    named: dict[str, Any] = {name: value for name, value in params.options.items() if name not in OWN_OPTIONS}
    if "bad_words_ids" in named:
        named["bad_words_ids"] = [list(word) for word in named["bad_words_ids"]]
    if params.max_new_tokens is not None:
        named["max_new_tokens"] = params.max_new_tokens
    if params.top_p is not None:
        named["top_p"] = params.top_p
    if params.logit_bias:
        named["sequence_bias"] = {(token,): bias for token, bias in params.logit_bias.items()}
    return named


def _token_options(params: GenerationParams, extra: Mapping[str, Any], *, vocab_size: int) -> dict[str, Any]:
    """``ignore_eos`` and ``allowed_token_ids`` as ``GenerationConfig`` options.

    End-of-sequence is masked until the budget is spent; tokens not allowed are suppressed before sampling's
    filters (top-k, top-p), so those can never leave nothing to choose from.
    """
    options: dict[str, Any] = {}
    if params.options.get("ignore_eos") and params.max_new_tokens is not None:
        options["min_new_tokens"] = params.max_new_tokens
    if params.allowed_token_ids is not None:
        allowed = set(params.allowed_token_ids)
        suppressed = {int(i) for i in extra.get("suppress_tokens") or ()} | set(range(vocab_size)) - allowed
        options["suppress_tokens"] = sorted(suppressed)
    return options


_WARNED_OPTIONS: set[str] = set()
"""Unknown request options already warned about: each is named once per process."""


def warn_unknown_options(names: Sequence[str]) -> None:
    """Log each request option neither the API nor ``GenerationConfig`` knows, once per process, at WARNING."""
    for name in names:
        if name not in _WARNED_OPTIONS:
            _WARNED_OPTIONS.add(name)
            log.warning("request.unknown_option", option=name)


def stopping_token_ids(config: GenerationConfig) -> tuple[int, ...]:
    """The token ids that end a generation under ``config``: end-of-sequence and the request's stop tokens."""
    configured = config.eos_token_id
    ids = configured if isinstance(configured, list | tuple) else [configured]
    return tuple(int(i) for i in ids if i is not None)


def finish_reason(new_ids: Sequence[int], config: GenerationConfig) -> FinishReason:
    """``LENGTH`` when the token budget ran out on something other than an end-of-sequence or stop token."""
    ran_out = len(new_ids) >= (config.max_new_tokens or 0)
    ended = bool(new_ids) and new_ids[-1] in stopping_token_ids(config)
    return FinishReason.LENGTH if ran_out and not ended else FinishReason.STOP


def _sampling(params: GenerationParams, *, beams: bool) -> dict[str, Any]:
    """``do_sample`` and ``temperature``: 0 is greedy; nothing set samples at 1 (OpenAI's default) unless beams."""
    if params.temperature == 0:
        return {"do_sample": False}
    if params.temperature is not None:
        return {"do_sample": True, "temperature": params.temperature}
    if params.top_p is not None:
        return {"do_sample": True}
    if beams:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 1.0}


def _validate(config: GenerationConfig, user_set: set[str]) -> None:
    """Validate strictly, but only fail on conflicts the request caused; the model's own defaults get a warning."""
    try:
        config.validate(strict=True, user_set_attributes=user_set)
    except ValueError as error:
        culprits = set(_MINOR_ISSUE.findall(str(error)))
        if not culprits or culprits & user_set:
            raise
        config.validate(strict=False, user_set_attributes=user_set)


def _param_of(error: Exception, updates: Mapping[str, object]) -> str | None:
    """The request option an error message names first, if any."""
    message = str(error)
    named = _MINOR_ISSUE.findall(message) or _BACKTICKED.findall(message)
    return next((name for name in named if name in updates), None)


@attrs.define
class HuggingFaceGenerator(TellsModelFacts):
    """A transformers causal LM and its tokenizer behind the ``Generator`` port.

    ``model.generate`` runs on one dedicated worker thread, one request at a time; tokens reach the event loop through
    a streamer. Closing the stream sets an event a stopping criterion checks every step, so the worker stops within one
    token; a request still queued when it is closed never runs.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    _model_id: str = attrs.field(kw_only=True, alias="model_id")
    threads: int | None = attrs.field(kw_only=True, default=None)
    """Torch's CPU threads for the plain path's work; ``None`` leaves torch's setting alone."""
    facts: ModelFacts = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: ModelFacts(self.model, self.tokenizer, self._model_id), takes_self=True),
    )
    """The model's name, limits and tokenizer facts, shared with the batching engine."""
    _executor: ThreadPoolExecutor = attrs.field(
        init=False, factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate-queue")
    )
    """Runs the plain path's work one job at a time, each on a thread of its own (`_submit`)."""
    grammars: GrammarCompiler = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids), takes_self=True
        ),
    )
    """Compiles ``response_format`` and forced tool-call constraints for this tokenizer (cached)."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends generation."""
        return self.facts.eos_token_ids

    def generation_config(self, params: GenerationParams, *, prompt_length: int) -> GenerationConfig:
        """The validated ``GenerationConfig`` for a request; by default it may fill the context window."""
        if params.max_new_tokens is None:
            params = attrs.evolve(params, max_new_tokens=max(1, self.context_length - prompt_length))
        return build_generation_config(
            self.model.generation_config, params, vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids
        )

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """Stream new tokens after ``prompt_ids``; the last item carries the finish reason.

        Beam search only knows its tokens at the end, so it yields them in one step.
        """
        config = self.generation_config(params, prompt_length=len(prompt_ids))
        beams = (config.num_beams or 1) > 1
        if beams:  # the use case stops streams at a stop sequence; beams only come out whole, so each beam stops here
            config.stop_strings = list(params.stop) or None
        log.debug("generation.config", config=config.to_diff_dict(), seed=params.seed)
        steps: ThreadToLoop[GeneratedTokens | None] = ThreadToLoop()
        cancelled = threading.Event()
        constraint = None if params.constraint is None else self.grammars.processor(params.constraint)
        processors, recorder = request_processors(params, prompt_length=len(prompt_ids), constraint=constraint)
        job = _Job(
            prompt_ids=tuple(prompt_ids),
            config=config,
            seed=params.seed,
            cancelled=cancelled,
            streamer=None if beams else _QueueStreamer(steps, cancelled, recorder),
            processors=processors,
            adapter=params.adapter,
        )
        future = self._submit(functools.partial(self._run, job))
        future.add_done_callback(lambda _: steps.put(None))
        try:
            while (step := await steps.get()) is not None:
                yield step
            new_ids = _result(future)
            if beams and new_ids:
                yield GeneratedTokens(token_ids=tuple(new_ids))
            yield GeneratedTokens(finish_reason=finish_reason(new_ids, config))
        finally:
            cancelled.set()
            if not future.cancel():
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(future)

    async def score(self, token_ids: Sequence[int], *, top: int, adapter: str | None = None) -> list[TokenLogprob]:
        """Log-probability of each of ``token_ids[1:]`` given what precedes it: one forward pass on the worker.

        ``adapter``: the LoRA adapter to score with (``None``: the base model).
        """
        if len(token_ids) < 2:  # noqa: PLR2004  the first token has no context to be scored in
            return []
        if len(token_ids) > self.context_length:
            msg = f"{len(token_ids)} tokens do not fit in the context window of {self.context_length}."
            raise ContextLengthExceededError(msg, param="prompt")
        future = self._submit(functools.partial(self._score, tuple(token_ids), top, adapter))
        return await asyncio.wrap_future(future)

    def _submit(self, work: Callable[[], T]) -> Future[T]:
        """Queue ``work`` behind the plain path's others; it runs on a thread of its own (`on_own_thread`)."""
        return self._executor.submit(on_own_thread, work, name="generate", threads=self.threads)

    def _score(self, token_ids: tuple[int, ...], top: int, adapter: str | None) -> list[TokenLogprob]:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)
        with torch.inference_mode(), selecting(adapter):
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return [token_logprob(row, token, top) for row, token in zip(logprobs, token_ids[1:], strict=True)]

    def close(self) -> None:
        """Stop accepting generations and drop queued ones; the running one ends at its next step."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: _Job) -> list[int]:
        """Generate on the worker thread; return the new token ids."""
        if job.cancelled.is_set():
            return []
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.model.device)
        kwargs: dict[str, Any] = {
            "attention_mask": torch.ones_like(input_ids),
            "generation_config": job.config,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(job.cancelled)]),
            "streamer": job.streamer,
            "logits_processor": job.processors,
        }
        if job.config.stop_strings:
            kwargs["tokenizer"] = self.tokenizer
        if (job.config.num_beam_groups or 1) > 1:
            kwargs |= {"custom_generate": str(GROUP_BEAM_SEARCH_REPO), "trust_remote_code": True}
        with self._seeded(job.seed), selecting(job.adapter):
            output = self.model.generate(input_ids, **kwargs)  # type: ignore[operator]
        return [int(token) for token in output[0, len(job.prompt_ids) :].tolist()]

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed the RNGs for one generation, restoring everyone else's random state afterwards."""
        if seed is None:
            yield
            return
        device = self.model.device
        accelerated = device.type != "cpu"
        devices = [device.index if device.index is not None else 0] if accelerated else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else None):
            torch.manual_seed(seed)
            yield


@attrs.frozen
class _Job:
    """One generation as the worker thread sees it."""

    prompt_ids: tuple[int, ...]
    config: GenerationConfig
    seed: int | None
    cancelled: threading.Event
    streamer: _QueueStreamer | None
    processors: LogitsProcessorList
    adapter: str | None = None


class _QueueStreamer(BaseStreamer):
    """Hands each step's new token ids to the event loop; the first ``put`` is the prompt and is skipped."""

    def __init__(
        self,
        steps: ThreadToLoop[GeneratedTokens | None],
        cancelled: threading.Event,
        recorder: LogprobRecorder | None,
    ) -> None:
        self._steps = steps
        self._cancelled = cancelled
        self._recorder = recorder
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate`` with the prompt, then with each step's tokens."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        token_ids = [int(t) for t in value.reshape(-1).tolist()]
        logprobs = () if self._recorder is None else self._recorder.logprobs_of(token_ids)
        if not self._steps.put(GeneratedTokens(tuple(token_ids), logprobs=logprobs)):
            self._cancelled.set()

    def end(self) -> None:
        """Nothing to do: the end is signalled when the worker's job completes."""


class _Cancelled(StoppingCriteria):
    """Stops every sequence once the consumer has gone away."""

    def __init__(self, cancelled: threading.Event) -> None:
        self._cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, _scores: torch.Tensor | None, **_: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


def _result(future: Future[list[int]]) -> list[int]:
    """The worker's result, its failure re-raised as a domain error."""
    try:
        return future.result()
    except DomainError:
        raise
    except Exception as error:
        log.exception("generation.failed")
        msg = f"Generation failed: {error}"
        raise GenerationError(msg) from error
