"""A conversation's sticky settings (issue 9): the side panel saves them, each value checked
against its bounds; sends use them (the preset's values, the conversation's own on top, the
system prompt as the prompt's root, rebuilt when it changes); and the composer's meter."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from chat import meter, services
from chat import presets as chat_presets
from chat.models import Conversation, Message
from chat.models import Preset as PresetRow
from inference.models import Generation
from inference.schemas import ChatMessage

MODEL = "smollm2-135m-instruct"
OTHER = "tinyllama-1.1b"


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):  # type: ignore[no-untyped-def]
    """Sends only record and enqueue; nothing runs."""
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr("inference.services._send", lambda ch, msg: sent.append((ch, msg)))
    return sent


@pytest.fixture
def conversation(owner: User, models_root: Path) -> Conversation:
    return Conversation.objects.create(user=owner, model_id=MODEL, title="Trip")


def _settings_post(**values: str) -> dict[str, str]:
    """The side panel's fields (prefixed: the composer has fields of the same names)."""
    fields = {"preset": "", "system_prompt": "", "tools": "off", **values}
    return {f"settings-{name}": value for name, value in fields.items()}


def _finish(
    reply: Message,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    text: str = "Ok.",
    trimmed: int = 0,
    prefill_s: float = 0.5,
    cached: int = 0,
) -> Generation:
    """The worker's part, written as it would: counts, timestamps, the end."""
    generation = reply.generation
    assert generation is not None
    started = timezone.now() - timedelta(seconds=5)
    generation.mark_streaming(
        started_at=started,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        trimmed_messages=trimmed,
    )
    Generation.objects.filter(pk=generation.pk).update(
        first_token_at=started + timedelta(seconds=prefill_s)
    )
    generation.finish("eos", text=text, content=text, completion_tokens=completion_tokens)
    generation.refresh_from_db()
    return generation


# --- the side panel ---------------------------------------------------------------------------


def test_the_page_shows_the_panel_with_the_models_defaults_as_placeholders(
    owner_client: Client, conversation: Conversation
) -> None:
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert 'id="settings-panel"' in body
    # SmolLM2's config: temperature 0.2, top_p 0.9, max_tokens 512 (its authors' values).
    assert 'name="temperature"' in body and 'placeholder="0.2"' in body
    assert 'placeholder="0.9"' in body and 'placeholder="512"' in body
    assert f"{MODEL} default" in body


def test_it_saves_the_settings_and_they_stick(
    owner_client: Client, conversation: Conversation
) -> None:
    response = owner_client.post(
        reverse("chat:settings", args=[conversation.code]),
        _settings_post(
            preset="",
            system_prompt="Answer as {user}'s guide.",
            temperature="0.4",
            seed="7",
            tools="on",
        ),
    )
    assert response.status_code == 302
    conversation.refresh_from_db()
    assert conversation.system_prompt == "Answer as {user}'s guide."
    assert conversation.params == {"temperature": 0.4, "seed": 7}
    assert conversation.tools_enabled is True
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert 'value="0.4"' in body and "Answer as {user}&#x27;s guide." in body


def test_choosing_a_preset_replaces_the_conversations_own_values(
    owner_client: Client, conversation: Conversation
) -> None:
    conversation.params = {"temperature": 1.5}
    conversation.save()
    response = owner_client.post(
        reverse("chat:settings", args=[conversation.code]),
        _settings_post(preset="creative", temperature="1.5"),
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert conversation.preset == "creative" and conversation.params == {}
    body = response.content.decode()
    assert "preset creative" in body and 'placeholder="1.0"' in body  # creative's temperature


def test_a_bad_value_comes_back_next_to_its_field_and_nothing_is_saved(
    owner_client: Client, conversation: Conversation
) -> None:
    response = owner_client.post(
        reverse("chat:settings", args=[conversation.code]),
        _settings_post(temperature="3", max_tokens="0", system_prompt="{nope}"),
        headers={"HX-Request": "true"},
    )
    body = response.content.decode()
    assert 'id="id_settings-temperature-error"' in body
    assert "Temperature goes from 0 to 2; 3 is out of range." in body
    assert "Max tokens goes from 1 to 131072; 0 is out of range." in body
    assert "unknown placeholder {nope}" in body
    conversation.refresh_from_db()
    assert conversation.params == {} and conversation.system_prompt == ""


def test_strangers_and_anonymous_users_cannot_touch_the_settings(
    client: Client, stranger_client: Client, conversation: Conversation
) -> None:
    url = reverse("chat:settings", args=[conversation.code])
    assert stranger_client.get(url).status_code == 404
    assert stranger_client.post(url, _settings_post(temperature="1")).status_code == 404
    assert client.post(url, _settings_post(temperature="1")).status_code == 302
    meter_url = reverse("chat:meter", args=[conversation.code])
    assert stranger_client.post(meter_url, {"text": "hi"}).status_code == 404
    conversation.refresh_from_db()
    assert conversation.params == {}


def test_the_meter_refuses_get(owner_client: Client, conversation: Conversation) -> None:
    assert owner_client.get(reverse("chat:meter", args=[conversation.code])).status_code == 405


def test_a_new_chat_keeps_its_composers_preset_and_options(
    owner_client: Client, owner: User, models_root: Path
) -> None:
    response = owner_client.post(
        reverse("chat:create"),
        {
            "model": MODEL,
            "preset": "deterministic",
            "max_tokens": "64",
            "text": "Hello",
            "type": "send",
            "tools": "off",
        },
    )
    assert response.status_code == 302
    conversation = Conversation.objects.get(user=owner)
    assert conversation.preset == "deterministic"
    assert conversation.params == {"max_tokens": 64}
    reply = conversation.messages.get(role="assistant")
    assert reply.generation is not None
    assert reply.generation.params["temperature"] == 0.0
    assert reply.generation.params["max_tokens"] == 64


# --- what a send uses -------------------------------------------------------------------------


def test_a_send_uses_the_preset_then_the_conversation_then_the_message(
    owner: User, conversation: Conversation
) -> None:
    PresetRow.objects.create(
        user=owner, name="mine", extends="creative", params={"top_k": 20, "seed": 3}
    )
    conversation.preset = "mine"
    conversation.params = {"seed": 11}
    conversation.save()
    _, reply = services.message_send(
        conversation=conversation, text="Hi", params={"max_tokens": 33}
    )
    params = reply.generation.params  # type: ignore[union-attr]
    assert params["temperature"] == 1.0 and params["min_p"] == 0.05  # creative
    assert params["top_k"] == 20  # mine
    assert params["seed"] == 11  # the conversation's own
    assert params["max_tokens"] == 33  # this message's


def test_without_settings_the_models_recommended_defaults_apply(
    conversation: Conversation,
) -> None:
    _, reply = services.message_send(conversation=conversation, text="Capital of France?")
    params = reply.generation.params  # type: ignore[union-attr]
    assert params["temperature"] == 0.2 and params["top_p"] == 0.9


def test_the_system_prompt_is_the_prompts_root_with_placeholders_filled(
    owner: User, conversation: Conversation
) -> None:
    conversation.system_prompt = "You help {user} and you are {model}. Today: {date}."
    conversation.save()
    _, reply = services.message_send(conversation=conversation, text="Hi")
    prompt = reply.generation.prompt_messages()  # type: ignore[union-attr]
    assert prompt[0]["role"] == "system"
    today = timezone.localtime().strftime("%Y-%m-%d")
    assert prompt[0]["content"].startswith(f"You help alice and you are {MODEL}. Today: {today}")
    assert [m["role"] for m in prompt] == ["system", "user"]


def _root_id(generation: Generation | None) -> int:
    assert generation is not None and generation.prompt is not None
    node = generation.prompt
    while node.parent is not None:
        node = node.parent
    return node.pk


def test_an_unchanged_system_prompt_goes_on_from_the_last_reply(
    conversation: Conversation,
) -> None:
    conversation.system_prompt = "It is {time} on {date}."
    conversation.save()
    _, first = services.message_send(conversation=conversation, text="One")
    _finish(first, prompt_tokens=20, completion_tokens=5)
    # As if the first message had been sent at another time: {time} renders differently now.
    node = first.generation.prompt_messages()  # type: ignore[union-attr]
    assert node[0]["role"] == "system"
    from inference.models import PromptMessage

    PromptMessage.objects.filter(pk=_root_id(first.generation)).update(
        content="It is 03:00 UTC on 2001-01-01 (Monday)."
    )
    _, second = services.message_send(conversation=conversation, text="Two")
    chain = second.generation.prompt_messages()  # type: ignore[union-attr]
    assert [m["role"] for m in chain] == ["system", "user", "assistant", "user"]
    assert chain[0]["content"] == "It is 03:00 UTC on 2001-01-01 (Monday)."
    # The same prompt nodes: the new prompt extends the old one (its cache still applies).
    assert _root_id(second.generation) == _root_id(first.generation)


def test_a_changed_system_prompt_rebuilds_the_prompt_from_the_path(
    conversation: Conversation,
) -> None:
    conversation.system_prompt = "Be brief."
    conversation.save()
    _, first = services.message_send(conversation=conversation, text="One")
    _finish(first, prompt_tokens=20, completion_tokens=5, text="Uno.")
    Conversation.objects.filter(pk=conversation.pk).update(system_prompt="Be verbose.")
    conversation.refresh_from_db()
    _, second = services.message_send(conversation=conversation, text="Two")
    chain = second.generation.prompt_messages()  # type: ignore[union-attr]
    assert chain == [
        {"role": "system", "content": "Be verbose."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Uno."},
        {"role": "user", "content": "Two"},
    ]


def test_a_preset_that_no_longer_resolves_leaves_the_chat_working(
    owner: User, conversation: Conversation
) -> None:
    conversation.preset = "gone"
    conversation.save()
    _, reply = services.message_send(conversation=conversation, text="Hi")
    assert reply.generation is not None and reply.generation.params["temperature"] == 0.2
    shown = chat_presets.conversation_settings(conversation)
    assert "no preset 'gone'" in shown.preset_problem


def test_an_imported_chat_keeps_its_system_prompt(owner: User, models_root: Path) -> None:
    imported = services.conversation_import(
        user=owner,
        model_id=MODEL,
        messages=[
            ChatMessage(role="system", content="Speak like a pirate."),
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Arr."),
        ],
    )
    assert imported.system_prompt == "Speak like a pirate."
    _, reply = services.message_send(conversation=imported, text="Again")
    chain = reply.generation.prompt_messages()  # type: ignore[union-attr]
    assert chain[0] == {"role": "system", "content": "Speak like a pirate."}
    assert len(chain) == 4


# --- the meter --------------------------------------------------------------------------------


def _meter(owner_client: Client, conversation: Conversation, **data: Any) -> str:
    response = owner_client.post(reverse("chat:meter", args=[conversation.code]), data)
    assert response.status_code == 200
    return response.content.decode()


def test_the_meter_shows_measured_use_cache_and_wait(
    owner_client: Client, conversation: Conversation
) -> None:
    _, reply = services.message_send(conversation=conversation, text="One")
    # 1,000 prompt tokens prefilled in 0.5 s: 2,000 tokens/s measured.
    _finish(reply, prompt_tokens=1000, completion_tokens=200)
    conversation.refresh_from_db()
    reading = meter.conversation_meter(conversation, text="x" * 400)
    assert reading.used == 1200 and reading.context == 8192
    assert reading.new_tokens == 100
    assert reading.next_prompt == 1200 + 100 + meter.TURN_OVERHEAD_TOKENS
    assert reading.cached == 1200
    assert reading.speed is not None and reading.speed.tokens_per_second == pytest.approx(2000)
    assert reading.wait_seconds == pytest.approx((100 + meter.TURN_OVERHEAD_TOKENS) / 2000)
    body = _meter(owner_client, conversation, text="x" * 400, model=MODEL)
    assert "1,200 of 8,192 tokens" in body
    assert "Up to 1,200 of about 1,308 prompt tokens are in the prompt cache" in body
    assert "2000 tokens/s" in body and "recomputes all 1,308 tokens" in body


def test_switching_model_caches_nothing(owner_client: Client, conversation: Conversation) -> None:
    _, reply = services.message_send(conversation=conversation, text="One")
    _finish(reply, prompt_tokens=300, completion_tokens=20)
    conversation.refresh_from_db()
    reading = meter.conversation_meter(conversation, text="Hi", model_id=OTHER)
    assert reading.cached == 0
    assert "switching model recomputes" in reading.no_cache_reason


def test_a_changed_system_prompt_caches_nothing(conversation: Conversation) -> None:
    _, reply = services.message_send(conversation=conversation, text="One")
    _finish(reply, prompt_tokens=300, completion_tokens=20)
    Conversation.objects.filter(pk=conversation.pk).update(system_prompt="New rules.")
    conversation.refresh_from_db()
    reading = meter.conversation_meter(conversation, text="Hi")
    assert reading.cached == 0 and "system prompt changed" in reading.no_cache_reason


def test_the_meter_warns_when_the_next_turn_trims(
    owner_client: Client, conversation: Conversation
) -> None:
    _, reply = services.message_send(conversation=conversation, text="One")
    _finish(reply, prompt_tokens=7500, completion_tokens=100, trimmed=2)
    conversation.refresh_from_db()
    more = "more " * 100  # about 125 tokens: 7,600 + 125 + the turn's markers > 7,680
    reading = meter.conversation_meter(conversation, text=more)
    # 8,192 context - 512 max tokens = 7,680 for the prompt.
    assert reading.prompt_limit == 7680 and reading.trims_next
    body = _meter(owner_client, conversation, text=more)
    assert "The last reply left out 2 earlier messages." in body
    assert "it leaves out the oldest messages" in body


def test_the_meter_of_a_new_conversation_says_nothing_is_cached(
    owner_client: Client, conversation: Conversation
) -> None:
    body = _meter(owner_client, conversation, text="Hello there")
    assert "nothing yet of 8,192 tokens" in body
    assert "Nothing cached (no reply yet in this conversation)" in body
    assert "No prefill speed measured yet" in body


# --- the composer's options stick -------------------------------------------------------------


def test_the_composers_options_stick_and_a_blank_one_clears(
    owner_client: Client, conversation: Conversation
) -> None:
    url = reverse("chat:send", args=[conversation.code])
    owner_client.post(url, {"text": "One", "temperature": "0.3", "seed": "5", "tools": "off"})
    conversation.refresh_from_db()
    assert conversation.params == {"temperature": 0.3, "seed": 5}
    page = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert '<input type="number" name="temperature" value="0.3"' in page
    # The reply is still queued (no worker): end it so the next send is allowed.
    Generation.objects.filter(state="queued").update(state="complete")
    owner_client.post(url, {"text": "Two", "temperature": "", "seed": "5", "tools": "off"})
    conversation.refresh_from_db()
    assert conversation.params == {"seed": 5}


def test_a_message_without_options_leaves_the_conversations_values(
    conversation: Conversation,
) -> None:
    from chat.schemas import parse_message

    conversation.params = {"temperature": 0.9}
    conversation.save()
    message = parse_message({"type": "send", "text": "hi"})
    chat_presets.conversation_keep_options(conversation=conversation, message=message)
    conversation.refresh_from_db()
    assert conversation.params == {"temperature": 0.9}


def test_a_saved_panel_updates_the_composers_options_too(
    owner_client: Client, conversation: Conversation
) -> None:
    url = reverse("chat:settings", args=[conversation.code])
    response = owner_client.post(
        url, _settings_post(temperature="1.1"), headers={"HX-Request": "true"}
    )
    body = response.content.decode()
    assert 'id="composer-options" class="option-grid" hx-swap-oob="true"' in body
    assert 'name="temperature" value="1.1"' in body
    panel = owner_client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert 'id="settings-panel"' in panel and "<html" not in panel
