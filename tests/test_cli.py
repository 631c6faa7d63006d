"""The CLI client against a real server backed by the FakeGenerator: one-shot commands in process, the REPL in a pty."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import structlog

from entrypoints.cli.__main__ import main
from entrypoints.cli.options import ClientSettings, Command, HuggingFaceParameters, extra_body, parse_invocation
from tests.fakes import FakeGenerator
from tests.live_server import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def server_logs() -> Iterator[list[structlog.typing.EventDict]]:
    """Keep the in-process server's logs out of the CLI's captured stdout."""
    with structlog.testing.capture_logs() as logs:
        yield logs


@pytest.fixture
def url(live_url: str) -> str:
    return f"{live_url}/v1"


def prompt_text(fake: FakeGenerator, call: int = -1) -> str:
    """The prompt the fake received, as text (the fallback template: ``Role: content`` lines, then ``Assistant:``)."""
    return fake.decode(fake.calls[call][0], skip_special_tokens=True)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# Options ---------------------------------------------------------------------------------------------------------


def test_defaults_match_the_documented_ones() -> None:
    invocation = parse_invocation(["chat"], environ={})
    assert invocation.command is Command.CHAT
    assert invocation.text is None
    assert invocation.settings == ClientSettings()
    settings = invocation.settings
    assert (settings.url, settings.model, settings.max_tokens) == ("http://localhost:8000/v1", None, 512)
    assert (settings.temperature, settings.top_p, settings.api_key, settings.stream) == (0.7, 1.0, "not-needed", True)


def test_url_and_api_key_come_from_the_environment() -> None:
    environ = {"HF_OPENAI_SERVER_URL": "http://gpu-box:9000/v1", "OPENAI_API_KEY": "sk-test"}
    settings = parse_invocation(["models"], environ=environ).settings
    assert (settings.url, settings.api_key) == ("http://gpu-box:9000/v1", "sk-test")
    assert parse_invocation(["--url", "http://other/v1", "models"], environ=environ).settings.url == "http://other/v1"


def test_options_count_before_and_after_the_subcommand() -> None:
    settings = parse_invocation(
        ["--model", "m", "--top-k", "5", "chat", "--seed", "3", "--max-tokens", "9"], {}
    ).settings
    assert (settings.model, settings.huggingface.top_k, settings.huggingface.seed, settings.max_tokens) == (
        "m",
        5,
        3,
        9,
    )


def test_legacy_flags_stand_for_the_commands() -> None:
    assert parse_invocation(["--message", "hi"], {}).command is Command.CHAT
    assert parse_invocation(["--message", "hi"], {}).text == "hi"
    assert (
        parse_invocation(["--completion", "Once"], {}).command,
        parse_invocation(["--completion", "Once"], {}).text,
    ) == (
        Command.COMPLETE,
        "Once",
    )
    assert parse_invocation(["--interactive"], {}).text is None
    assert parse_invocation(["--health"], {}).command is Command.HEALTH
    assert parse_invocation(["--list-models"], {}).command is Command.MODELS


def test_extra_body_holds_only_the_options_set() -> None:
    assert extra_body(HuggingFaceParameters()) == {}
    assert extra_body(HuggingFaceParameters(top_k=0, seed=7)) == {"top_k": 0, "seed": 7}


def test_health_url_is_beside_v1() -> None:
    assert ClientSettings(url="http://h:1/v1").health_url == "http://h:1/health"
    assert ClientSettings(url="http://h:1/v1/").health_url == "http://h:1/health"


def test_usage_errors_exit_2_with_argparse_message(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys)
    assert status == 2
    assert "choose a command" in err
    status, _, err = run_cli(capsys, "--url", "localhost:8000", "models")
    assert status == 2
    assert "--url must start with http://" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "chat", "--help")
    assert status == 0
    assert "--message" in out
    assert "--repetition-penalty" in out


# One-shot commands -----------------------------------------------------------------------------------------------


def test_chat_message_streams_the_answer(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    fake.reply = "Paris, 🙂."
    status, out, err = run_cli(capsys, "chat", "--url", url, "--message", "Capital of France?")
    assert (status, out, err) == (0, "Paris, 🙂.\n", "")
    assert prompt_text(fake) == "User: Capital of France?\nAssistant:"


def test_chat_sends_the_system_message_first(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    assert main(["--url", url, "--system", "Be brief.", "chat", "--message", "Hi"]) == 0
    assert prompt_text(fake) == "System: Be brief.\nUser: Hi\nAssistant:"


def test_legacy_message_flag_is_one_chat_turn(
    capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator
) -> None:
    fake.reply = "Hi there."
    assert run_cli(capsys, "--url", url, "--message", "Hello") == (0, "Hi there.\n", "")
    assert prompt_text(fake) == "User: Hello\nAssistant:"


def test_no_stream_prints_the_same_answer(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    fake.reply = "Whole answer."
    assert run_cli(capsys, "--url", url, "--no-stream", "chat", "--message", "x") == (0, "Whole answer.\n", "")
    assert run_cli(capsys, "--url", url, "--no-stream", "complete", "x") == (0, "Whole answer.\n", "")


def test_complete_with_stop_and_echo(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    fake.reply = " one two three four"
    status, out, _ = run_cli(capsys, "--url", url, "complete", "Count:", "--stop", " three", "--stop", "XX", "--echo")
    assert (status, out) == (0, "Count: one two\n")
    prompt_ids, params = fake.calls[-1]
    assert params.stop == (" three", "XX")
    assert fake.decode(prompt_ids, skip_special_tokens=True) == "Count:"


def test_legacy_completion_flag(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    fake.reply = " upon a time"
    assert run_cli(capsys, "--url", url, "--completion", "Once") == (0, " upon a time\n", "")
    assert fake.calls[-1][1].stop == ()


@pytest.mark.parametrize("stream", ["--show-usage", "--no-stream"])
def test_show_usage_prints_the_token_counts(
    capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator, stream: str
) -> None:
    fake.reply = "Four"
    status, out, _ = run_cli(capsys, "--url", url, "--show-usage", stream, "chat", "--message", "Hi")
    assert status == 0
    prompt_tokens = len(fake.calls[-1][0])
    completion_tokens = len(b"Four") + 1  # and the EOS
    assert out == (
        f"Four\nusage: prompt_tokens={prompt_tokens} completion_tokens={completion_tokens} "
        f"total_tokens={prompt_tokens + completion_tokens}\n"
    )


def test_show_usage_for_completions(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    fake.reply = "!"
    status, out, _ = run_cli(capsys, "--url", url, "complete", "Hi", "--show-usage")
    assert status == 0
    assert out == "!\nusage: prompt_tokens=2 completion_tokens=2 total_tokens=4\n"


def test_show_usage_names_the_prompt_tokens_the_prefix_cache_held(
    capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator
) -> None:
    fake.reply, fake.cached_tokens = "!", 16
    try:
        status, out, _ = run_cli(capsys, "--url", url, "complete", "more than sixteen bytes", "--show-usage")
    finally:
        fake.cached_tokens = 0
    assert status == 0
    assert out.endswith(" cached_tokens=16\n")


def test_generation_options_reach_the_server(capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator) -> None:
    flags = ["--max-tokens", "40", "--temperature", "0.3", "--top-p", "0.9", "--top-k", "5", "--seed", "7"]
    flags += ["--repetition-penalty", "1.2", "--num-beams", "2", "--no-repeat-ngram-size", "3", "--min-length", "4"]
    assert main(["--url", url, *flags, "chat", "--message", "x"]) == 0
    params = fake.calls[-1][1]
    assert (params.max_new_tokens, params.temperature, params.top_p) == (40, 0.3, 0.9)
    assert params.seed == 7
    assert params.options == {
        "top_k": 5,
        "repetition_penalty": 1.2,
        "num_beams": 2,
        "no_repeat_ngram_size": 3,
        "min_length": 4,
    }
    assert params.extra == {}


def test_unset_huggingface_options_are_not_sent(
    capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator
) -> None:
    assert main(["--url", url, "complete", "x"]) == 0
    params = fake.calls[-1][1]
    assert (params.max_new_tokens, params.temperature, params.top_p) == (512, 0.7, 1.0)
    assert params.seed is None
    assert params.options == {}


@pytest.mark.parametrize("argv", [["health"], ["--health"]])
def test_health_prints_the_status_json(capsys: pytest.CaptureFixture[str], url: str, argv: list[str]) -> None:
    status, out, _ = run_cli(capsys, "--url", url, *argv)
    assert status == 0
    assert json.loads(out) == {"status": "ok", "model": "fake-model", "models": {"fake-model": "loaded"}}


@pytest.mark.parametrize("argv", [["models"], ["--list-models"]])
def test_models_lists_the_served_model(capsys: pytest.CaptureFixture[str], url: str, argv: list[str]) -> None:
    assert run_cli(capsys, "--url", url, *argv) == (0, "fake-model\tloaded\n", "")


# Failures: one line on stderr, a non-zero status, no traceback ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "target"),
    [(["chat", "--message", "hi"], "/v1"), (["complete", "x"], "/v1"), (["models"], "/v1"), (["health"], "/health")],
)
def test_a_server_that_is_down_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], target: str) -> None:
    root = f"http://127.0.0.1:{free_port()}"
    status, out, err = run_cli(capsys, "--url", f"{root}/v1", *argv)
    assert (status, out) == (1, "")
    assert err == f"error: cannot reach {root}{target}: connection refused\n"


def test_a_rejected_request_is_one_line(capsys: pytest.CaptureFixture[str], url: str) -> None:
    status, out, err = run_cli(capsys, "--url", url, "--temperature", "5", "chat", "--message", "hi")
    assert status == 1
    assert out == ""
    assert err.startswith("error: 400 invalid_request_error: ")
    assert "temperature" in err
    assert err.count("\n") == 1


def test_an_error_in_the_middle_of_a_stream_is_one_line(
    capsys: pytest.CaptureFixture[str], url: str, fake: FakeGenerator
) -> None:
    fake.reply, fake.fail_after = "abcdef", 3
    status, out, err = run_cli(capsys, "--url", url, "chat", "--message", "hi")
    assert (status, out) == (1, "abc\n")
    assert err == "error: server_error: the fake model broke down\n"


def test_a_url_without_v1_says_so(capsys: pytest.CaptureFixture[str], live_url: str) -> None:
    status, _, err = run_cli(capsys, "--url", live_url, "models")
    assert status == 1
    assert err.startswith("error: 404 ")
    assert "ending in /v1" in err
    assert err.count("\n") == 1


def test_failures_in_a_subprocess_show_no_traceback() -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    output, status = pexpect.run(
        f"{sys.executable} -m entrypoints.cli --url {down} chat --message hi",
        cwd=str(REPO),
        withexitstatus=True,
        encoding="utf-8",
        timeout=30,
    )
    assert status == 1
    assert "Traceback" not in output
    assert output.strip() == f"error: cannot reach {down}: connection refused"


# The interactive chat ------------------------------------------------------------------------------------------------


@pytest.fixture
def repl(url: str) -> Iterator[pexpect.spawn]:
    """``chat`` in a pseudo-terminal, past its banner and first prompt."""
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable, ["-m", "entrypoints.cli", "--url", url, "chat"], cwd=str(REPO), env=env, encoding="utf-8"
    )
    child.timeout = 60  # generous: on a busy machine the child and the in-process server share two cores
    child.expect_exact(f"at {url}")
    child.expect_exact("you> ")
    yield child
    child.close(force=True)


def say(child: pexpect.spawn, line: str, *, expect: str) -> None:
    child.sendline(line)
    child.expect_exact(expect)
    child.expect_exact("you> ")


def test_interactive_session_keeps_history_and_obeys_commands(repl: pexpect.spawn, fake: FakeGenerator) -> None:
    say(repl, "/system You are terse.", expect="(system message set)")
    fake.reply = "First answer."
    say(repl, "Hello", expect="First answer.")
    fake.reply = "Second answer."
    say(repl, "And then?", expect="Second answer.")
    say(repl, "/clear", expect="(conversation cleared)")
    fake.reply = "Third answer."
    say(repl, "Fresh start", expect="Third answer.")
    say(repl, "/help", expect="/clear")
    repl.sendline("quit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0

    assert prompt_text(fake, 0) == "System: You are terse.\nUser: Hello\nAssistant:"
    assert prompt_text(fake, 1) == (
        "System: You are terse.\nUser: Hello\nAssistant: First answer.\nUser: And then?\nAssistant:"
    )
    assert prompt_text(fake, 2) == "System: You are terse.\nUser: Fresh start\nAssistant:"


def test_interactive_errors_are_one_line_and_the_session_goes_on(repl: pexpect.spawn, fake: FakeGenerator) -> None:
    repl.sendline("/system " + "x")
    repl.expect_exact("you> ")
    fake.reply = "Fine."
    say(repl, "Hi", expect="Fine.")
    repl.sendline("/unknown")
    repl.expect_exact("unknown command /unknown")
    repl.expect_exact("you> ")
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    assert "Traceback" not in (repl.before or "")


def test_ctrl_d_leaves_cleanly(repl: pexpect.spawn) -> None:
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session(repl: pexpect.spawn, fake: FakeGenerator) -> None:
    story = "Once upon a time " + "and so on " * 1000
    fake.reply = story
    fake.step_delay = 0.02
    repl.sendline("Tell me a story")
    repl.expect_exact("Once upon a time")
    repl.sendintr()
    repl.expect_exact("[stopped]")
    repl.expect_exact("you> ")
    deadline = time.monotonic() + 10
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.closed_early == 1, "closing the stream stops the generation"
    assert fake.produced < len(story)

    fake.reply, fake.step_delay = "The end.", 0.0
    say(repl, "Go on", expect="The end.")
    repl.sendline("exit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    # The part of the answer that was shown stays in the conversation.
    question, partial, follow_up = prompt_text(fake).split("\n")[:3]
    assert question == "User: Tell me a story"
    assert partial.startswith("Assistant: Once upon a time")
    assert story.startswith(partial.removeprefix("Assistant: "))
    assert follow_up == "User: Go on"
