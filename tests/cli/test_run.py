"""`mlxweb run`: one answer or a chat, in this process on the tiny model (and the default one),
and /system, /preset, /save driven through stdin."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.contrib.auth.models import User

from chat.models import Conversation, Message
from inference.models import PromptMessage

pytestmark = pytest.mark.django_db


def test_it_answers_one_prompt_in_this_process(tiny_chat: str, cli: Any) -> None:
    result = cli("run", tiny_chat, "Hello there", "--local", "--max-tokens", "6", "--seed", "1")

    assert result.code == 0, result.err
    assert "in this process (--local)" in result.err
    assert result.out.strip()  # the tiny model's random words
    assert "tokens, " in result.err  # the closing note: token counts and the finish reason


def test_it_reads_the_prompt_from_stdin_with_a_dash(
    tiny_chat: str, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello from a pipe"))

    result = cli("run", tiny_chat, "-", "--local", "--max-tokens", "4")

    assert result.code == 0, result.err
    assert "prompt tokens" in result.err


def test_an_unknown_model_exits_with_status_2_before_loading(tiny_chat: str, cli: Any) -> None:
    result = cli("run", "no-such-model", "Hi", "--local")

    assert result.code == 2
    assert "no-such-model" in result.err and "mlxweb list" in result.err
    assert "loading" not in result.err


def test_a_bad_sampling_value_exits_with_status_2(tiny_chat: str, cli: Any) -> None:
    result = cli("run", tiny_chat, "Hi", "--local", "--temperature", "9")

    assert result.code == 2 and "temperature" in result.err


def test_an_unknown_preset_exits_with_status_2(tiny_chat: str, cli: Any) -> None:
    result = cli("run", tiny_chat, "Hi", "--local", "--preset", "loud")

    assert result.code == 2
    assert "no preset 'loud' (known: balanced, creative, deterministic)" in result.err


def test_without_a_server_it_says_it_runs_in_this_process(
    tiny_chat: str, cli: Any, tmp_path: Any
) -> None:
    result = cli(
        "run", tiny_chat, "Hi", "--max-tokens", "2", "--target", f"unix://{tmp_path}/none.sock"
    )

    assert result.code == 0, result.err
    assert "in this process (no server answers at unix://" in result.err


def test_the_chat_keeps_history_and_saves_a_conversation_the_browser_shows(
    tiny_chat: str, admin_user: User, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "\n".join(
        [
            "/system You answer in one word.",
            "/preset deterministic",
            "/preset",
            "Hello",
            "And again",
            "/save A chat from the terminal",
            "/exit",
        ]
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(script + "\n"))

    result = cli("run", tiny_chat, "--local", "--max-tokens", "4")

    assert result.code == 0, result.err
    assert "System prompt set." in result.out
    assert "Preset deterministic: temperature 0.0, top_p 1.0." in result.out
    assert "creative" in result.out and "balanced" in result.out  # /preset lists them
    conversation = Conversation.objects.get(user=admin_user)
    assert conversation.title == "A chat from the terminal"
    assert conversation.model_id == tiny_chat
    assert f"/c/{conversation.code}/" in result.out
    messages = list(conversation.messages.select_related("generation"))
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0].content, messages[2].content] == ["Hello", "And again"]
    second = messages[3].generation
    assert second is not None and second.state == "complete"
    # The second reply's prompt is the whole chat as the model saw it, system prompt first.
    assert second.prompt_id is not None
    prompt = [(m["role"], m["content"]) for m in PromptMessage.chain(second.prompt_id)]
    assert prompt[0] == ("system", "You answer in one word.")
    assert [role for role, _ in prompt] == ["system", "user", "assistant", "user"]
    assert second.params["temperature"] == 0.0


def test_the_browser_shows_the_saved_conversation(
    tiny_chat: str, admin_user: User, admin_client: Any, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/save\n"))
    cli("run", tiny_chat, "--local", "--max-tokens", "3")
    conversation = Conversation.objects.get(user=admin_user)
    reply = conversation.messages.get(role=Message.Role.ASSISTANT)

    page = admin_client.get(f"/c/{conversation.code}/")

    assert page.status_code == 200
    assert conversation.title == "Hello"
    assert reply.generation is not None and reply.generation.text
    assert "Hello" in page.content.decode()


def test_save_names_the_user_or_says_why_not(
    tiny_chat: str, owner: User, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/save\nHi\n/save\n"))

    result = cli("run", tiny_chat, "--local", "--max-tokens", "2", "--user", "nobody")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/save\n"))
    saved = cli("run", tiny_chat, "--local", "--max-tokens", "2", "--user", owner.username)

    assert result.code == 0
    assert "error: no user 'nobody'" in result.err
    assert saved.code == 0 and Conversation.objects.filter(user=owner).count() == 1


@pytest.mark.slow
def test_the_default_model_answers_the_paris_question(
    smollm2_models_root: Any, cli: Any
) -> None:
    from inference import worker

    try:
        result = cli(
            "run",
            "smollm2-135m-instruct",
            "What is the capital of France? Answer in one word.",
            "--local",
            "--preset",
            "deterministic",
            "--max-tokens",
            "16",
        )
    finally:
        worker.stop_engine()

    assert result.code == 0, result.err
    assert "Paris" in result.out


def test_a_presets_system_prompt_has_its_placeholders_filled(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from datetime import date

    from mlxweb.cli.chat import ChatState, _use_preset
    from mlxweb.config import DEFAULT_CONFIG_DIR

    presets = tmp_path / "presets"
    shutil.copytree(DEFAULT_CONFIG_DIR / "presets", presets)
    (presets / "dated.yaml").write_text(
        "extends: balanced\nsystem: 'You are {model}. Today is {date}. Literal {{date}}.'\n"
    )
    monkeypatch.setenv("MLXWEB_CONFIG_DIR", str(tmp_path))
    state = ChatState(model="tiny")

    _use_preset(state, "dated", announce=False)

    assert state.system.startswith(f"You are tiny. Today is {date.today().isoformat()}")
    assert state.system.endswith("Literal {date}.")
