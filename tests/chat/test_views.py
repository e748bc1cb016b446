"""Chat pages over HTTP: ownership, anonymous, methods, bad input, and the no-JS fallbacks."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as settings_module
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from chat.models import Conversation, Message, ToolStep
from inference.models import Generation

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def conversation(owner, models_root) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation.objects.create(user=owner, model_id=MODEL, title="Paris trip")


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):  # type: ignore[no-untyped-def]
    """Views only record and enqueue; what they send the worker is checked, not run."""
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr("inference.services._send", lambda ch, msg: sent.append((ch, msg)))
    return sent


def test_it_redirects_anonymous_users_to_sign_in(client: Client, conversation) -> None:
    for url in [reverse("chat:index"), reverse("chat:detail", args=[conversation.code])]:
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/")


def test_it_shows_the_owner_their_conversation(owner_client: Client, conversation) -> None:
    response = owner_client.get(reverse("chat:detail", args=[conversation.code]))
    assert response.status_code == 200
    body = response.content.decode()
    assert "Paris trip" in body
    assert f'ws-connect="/ws/conversations/{conversation.code}/"' in body
    assert 'name="model"' in body


def test_it_hides_other_users_conversations(stranger_client: Client, conversation) -> None:
    assert stranger_client.get(reverse("chat:detail", args=[conversation.code])).status_code == 404
    response = stranger_client.get(reverse("chat:index"))
    assert "Paris trip" not in response.content.decode()
    for name in ["chat:send", "chat:rename", "chat:delete"]:
        url = reverse(name, args=[conversation.code])
        assert stranger_client.post(url, {"text": "x", "title": "x"}).status_code == 404
    assert Conversation.objects.filter(pk=conversation.pk, title="Paris trip").exists()


def test_it_lists_conversations_newest_first(owner_client: Client, owner, models_root) -> None:
    from django.utils import timezone

    old = Conversation.objects.create(user=owner, model_id=MODEL, title="Chat about owls")
    Conversation.objects.filter(pk=old.pk).update(updated_at=timezone.now() - timedelta(1))
    Conversation.objects.create(user=owner, model_id=MODEL, title="Chat about bats")
    body = owner_client.get(reverse("chat:index")).content.decode()
    assert body.index("Chat about bats") < body.index("Chat about owls")


def test_it_creates_a_conversation_with_its_first_message(
    owner_client: Client, owner, models_root, no_worker, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(
            reverse("chat:create"), {"text": "Hello there", "model": MODEL}
        )
    conversation = Conversation.objects.get(user=owner)
    assert response.status_code == 302
    assert response["Location"] == reverse("chat:detail", args=[conversation.code])
    assert conversation.title == "Hello there"
    user_message, reply = conversation.messages.all()
    assert user_message.content == "Hello there"
    generation = reply.generation
    assert generation is not None
    assert generation.state == Generation.State.QUEUED
    assert generation.notify_group == conversation.group_name
    assert no_worker == [("inference", {"type": "generation.start", "code": str(generation.code)})]


def test_it_refuses_an_unknown_model(owner_client: Client, owner, models_root) -> None:
    response = owner_client.post(
        reverse("chat:create"), {"text": "hi", "model": "/etc/passwd"}, follow=True
    )
    assert "Unknown model" in response.content.decode()
    assert not Conversation.objects.filter(user=owner).exists()


def test_it_sends_without_websockets(
    owner_client: Client, conversation, no_worker, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(reverse("chat:send", args=[conversation.code]), {"text": "Go"})
    assert response.status_code == 302
    assert conversation.messages.filter(role=Message.Role.USER, content="Go").exists()
    assert len(no_worker) == 1


def test_it_refuses_an_empty_message(owner_client: Client, conversation, no_worker) -> None:
    response = owner_client.post(
        reverse("chat:send", args=[conversation.code]), {"text": "   "}, follow=True
    )
    assert "Write a message first" in response.content.decode()
    assert not conversation.messages.exists()
    assert no_worker == []


def test_it_stops_a_reply_without_websockets(owner_client: Client, conversation, no_worker) -> None:
    owner_client.post(reverse("chat:send", args=[conversation.code]), {"text": "Go"})
    reply = conversation.messages.get(role=Message.Role.ASSISTANT)
    url = reverse("chat:stop", args=[conversation.code, reply.code])
    assert owner_client.post(url).status_code == 302
    assert no_worker[-1] == (
        "inference",
        {"type": "generation.stop", "code": str(reply.generation.code)},
    )


@pytest.mark.parametrize(
    ("name", "method"),
    [("chat:send", "get"), ("chat:rename", "get"), ("chat:delete", "put"), ("chat:detail", "post")],
)
def test_it_refuses_the_wrong_method(owner_client: Client, conversation, name, method) -> None:
    response = getattr(owner_client, method)(reverse(name, args=[conversation.code]))
    assert response.status_code == 405


def test_it_renames_a_conversation(owner_client: Client, conversation) -> None:
    url = reverse("chat:rename", args=[conversation.code])
    response = owner_client.post(url, {"title": "  Rome   trip "}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert 'id="sidebar"' in response.content.decode()
    conversation.refresh_from_db()
    assert conversation.title == "Rome trip"


def test_it_refuses_an_empty_title(owner_client: Client, conversation) -> None:
    owner_client.post(reverse("chat:rename", args=[conversation.code]), {"title": ""})
    conversation.refresh_from_db()
    assert conversation.title == "Paris trip"


def test_it_asks_before_deleting(owner_client: Client, conversation) -> None:
    url = reverse("chat:delete", args=[conversation.code])
    response = owner_client.get(url)
    assert "Delete this conversation?" in response.content.decode()
    assert Conversation.objects.filter(pk=conversation.pk).exists()
    response = owner_client.post(url)
    assert response.status_code == 302
    assert not Conversation.objects.filter(pk=conversation.pk).exists()


def test_it_renders_replies_as_safe_markdown(owner_client: Client, conversation) -> None:
    generation = Generation.objects.create(
        model_id=MODEL,
        state=Generation.State.COMPLETE,
        text=(
            "**bold** <img src=x onerror=alert(1)> [x](javascript:alert(1))"
            "\n\n```python\nx = 1\n```"
        ),
        completion_tokens=12,
    )
    Message.objects.create(conversation=conversation, role="assistant", generation=generation)
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert "<strong>bold</strong>" in body
    assert "<img src=x" not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    assert 'href="javascript' not in body
    assert '<span class="n">x</span>' in body  # pygments highlighted the code block
    assert "12 tokens" in body


def test_it_shows_stopped_and_trimmed_replies(owner_client: Client, conversation) -> None:
    generation = Generation.objects.create(
        model_id=MODEL,
        state=Generation.State.STOPPED,
        finish_reason="stopped",
        text="Half a",
        trimmed_messages=3,
    )
    Message.objects.create(conversation=conversation, role="assistant", generation=generation)
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert "Stopped" in body and "Half a" in body
    assert "3 earlier messages left out to fit the model's context" in body


def test_it_makes_the_first_account_the_admin(client: Client, db, settings) -> None:
    settings.MLXWEB_ALLOW_SIGNUP = True  # the second sign-up below needs it open
    assert client.get(reverse("login"))["Location"] == reverse("signup")
    response = client.post(
        reverse("signup"),
        {"username": "first", "password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"},
    )
    assert response.status_code == 302
    first = User.objects.get(username="first")
    assert first.is_staff and first.is_superuser
    second_client = Client()
    second_client.post(
        reverse("signup"),
        {
            "username": "second",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    second = User.objects.get(username="second")
    assert not second.is_staff and not second.is_superuser


def test_it_closes_sign_up_when_configured(client: Client, owner, settings) -> None:
    settings.MLXWEB_ALLOW_SIGNUP = False
    response = client.post(
        reverse("signup"),
        {"username": "late", "password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"},
    )
    assert response.status_code == 403
    assert not User.objects.filter(username="late").exists()


def test_it_closes_sign_up_after_the_first_account_by_default(client: Client, db) -> None:
    assert settings_module.MLXWEB_ALLOW_SIGNUP is False
    form = {"password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"}
    assert client.post(reverse("signup"), {"username": "first", **form}).status_code == 302
    assert User.objects.get(username="first").is_superuser
    late = Client()
    response = late.post(reverse("signup"), {"username": "late", **form})
    assert response.status_code == 403
    assert "Sign-up is closed" in response.content.decode()
    assert not User.objects.filter(username="late").exists()
    assert "Create one" not in late.get(reverse("login")).content.decode()


def test_it_shows_signup_errors(client: Client, db) -> None:
    response = client.post(reverse("signup"), {"username": "x", "password1": "a", "password2": "b"})
    assert response.status_code == 200
    assert "errorlist" in response.content.decode()
    assert not User.objects.exists()


def test_it_applies_the_composers_options_without_websockets(
    owner_client: Client, conversation
) -> None:
    url = reverse("chat:send", args=[conversation.code])
    owner_client.post(url, {"text": "Go", "max_tokens": "5", "seed": "7", "stop": "END\nSTOP"})
    generation = Generation.objects.get()
    assert generation.params["max_tokens"] == 5
    assert generation.params["seed"] == 7
    assert generation.params["stop"] == ["END", "STOP"]


def test_it_refuses_bad_options_without_websockets(owner_client: Client, conversation) -> None:
    url = reverse("chat:send", args=[conversation.code])
    response = owner_client.post(url, {"text": "Go", "temperature": "9"}, follow=True)
    assert "Invalid" in response.content.decode() and "temperature" in response.content.decode()
    assert not Generation.objects.exists()
    assert not conversation.messages.exists()


@pytest.fixture
def waiting_step(conversation) -> ToolStep:  # type: ignore[no-untyped-def]
    """A reply that called a mutating tool, the call waiting for the user."""
    generation = Generation.objects.create(
        model_id=MODEL,
        state=Generation.State.COMPLETE,
        finish_reason=Generation.FinishReason.TOOL_CALLS,
        text='<tool_call>{"name": "python"}</tool_call>',
    )
    reply = Message.objects.create(
        conversation=conversation, role="assistant", generation=generation
    )
    return ToolStep.objects.create(
        message=reply,
        call_id="call_1",
        name="python",
        arguments={"code": "print('<b>hi</b>')"},
        mutating=True,
        state=ToolStep.State.WAITING,
    )


def test_it_shows_a_waiting_tool_call_with_its_choices(
    owner_client: Client, conversation, waiting_step
) -> None:
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()
    assert 'class="tool-step waiting"' in body
    assert "&lt;b&gt;hi&lt;/b&gt;" in body and "<b>hi</b>" not in body
    assert reverse("chat:tool", args=[conversation.code, waiting_step.code]) in body
    assert "Approve" in body and "Deny" in body and "Always allow python here" in body


@pytest.mark.parametrize(
    ("decision", "state"), [("approve", "queued"), ("deny", "denied"), ("always", "queued")]
)
def test_it_decides_a_tool_call_without_websockets(
    owner_client: Client, conversation, waiting_step, decision, state
) -> None:
    url = reverse("chat:tool", args=[conversation.code, waiting_step.code])
    response = owner_client.post(url, {"decision": decision})
    assert response.status_code == 302
    waiting_step.refresh_from_db()
    conversation.refresh_from_db()
    assert waiting_step.state == state
    assert conversation.allowed_tools == (["python"] if decision == "always" else [])


def test_it_refuses_a_bad_or_late_tool_decision(
    owner_client: Client, conversation, waiting_step
) -> None:
    url = reverse("chat:tool", args=[conversation.code, waiting_step.code])
    response = owner_client.post(url, {"decision": "maybe"}, follow=True)
    assert "Choose approve, deny or always." in response.content.decode()
    owner_client.post(url, {"decision": "deny"})
    response = owner_client.post(url, {"decision": "approve"}, follow=True)
    assert "no longer waits for a decision" in response.content.decode()
    waiting_step.refresh_from_db()
    assert waiting_step.state == ToolStep.State.DENIED


def test_it_refuses_a_tool_decision_by_get(
    owner_client: Client, conversation, waiting_step
) -> None:
    url = reverse("chat:tool", args=[conversation.code, waiting_step.code])
    assert owner_client.get(url).status_code == 405


def test_it_hides_tool_calls_from_strangers_and_anonymous_users(
    client: Client, stranger_client: Client, conversation, waiting_step
) -> None:
    url = reverse("chat:tool", args=[conversation.code, waiting_step.code])
    assert stranger_client.post(url, {"decision": "approve"}).status_code == 404
    response = client.post(url, {"decision": "approve"})
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    waiting_step.refresh_from_db()
    assert waiting_step.state == ToolStep.State.WAITING
