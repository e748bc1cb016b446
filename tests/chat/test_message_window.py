"""A long branch opens with its newest messages; earlier ones load in windows as the reader
scrolls up (chat.services.path_window, the `earlier` view)."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from chat import services
from chat.models import Conversation
from inference.schemas import ChatMessage

MODEL = "smollm2-135m-instruct"
EXCHANGES = 70  # 140 messages: a window of 60, then 60, then 20


@pytest.fixture
def long_chat(owner, models_root) -> tuple[Conversation, list[str]]:  # type: ignore[no-untyped-def]
    messages = []
    for i in range(EXCHANGES):
        messages.append(ChatMessage(role="user", content=f"Question {i}"))
        messages.append(ChatMessage(role="assistant", content=f"Answer {i}"))
    conversation = services.conversation_import(user=owner, model_id=MODEL, messages=messages)
    codes = [str(m.code) for m in services.conversation_path(conversation)]
    return conversation, codes


def _shown(body: str) -> list[str]:
    return re.findall(r'<article id="message-([0-9a-f-]{36})"', body)


def _marker(body: str) -> str | None:
    match = re.search(r'id="earlier-messages"[^>]*hx-get="([^"]+)"', body)
    return match.group(1).replace("&amp;", "&") if match else None


def test_a_long_branch_opens_with_its_newest_messages(owner_client: Client, long_chat) -> None:
    conversation, codes = long_chat
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()

    assert _shown(body) == codes[-services.MESSAGE_WINDOW :]
    assert "Show 80 earlier messages" in body
    assert _marker(body) == (
        reverse("chat:earlier", args=[conversation.code]) + f"?before={codes[80]}"
    )


def test_scrolling_up_loads_the_earlier_messages_window_by_window(
    owner_client: Client, long_chat
) -> None:
    conversation, codes = long_chat
    body = owner_client.get(reverse("chat:detail", args=[conversation.code])).content.decode()

    seen: list[str] = _shown(body)
    while (url := _marker(body)) is not None:
        body = owner_client.get(url).content.decode()
        seen = _shown(body) + seen

    assert seen == codes  # every message once, in order
    assert "Show 20 earlier messages" in owner_client.get(
        reverse("chat:earlier", args=[conversation.code]) + f"?before={codes[80]}"
    ).content.decode()


def test_without_javascript_the_whole_branch_shows(owner_client: Client, long_chat) -> None:
    conversation, codes = long_chat
    url = reverse("chat:detail", args=[conversation.code]) + "?all=1"
    body = owner_client.get(url).content.decode()
    assert _shown(body) == codes and _marker(body) is None


def test_a_link_to_an_early_message_shows_it(owner_client: Client, long_chat) -> None:
    conversation, codes = long_chat
    url = reverse("chat:detail", args=[conversation.code]) + f"?m={codes[5]}"
    body = owner_client.get(url).content.decode()
    assert _shown(body) == codes[3:]
    assert "Show 3 earlier messages" in body


def test_earlier_messages_are_the_owners_and_checked(
    owner_client: Client, stranger_client: Client, client: Client, long_chat
) -> None:
    conversation, codes = long_chat
    url = reverse("chat:earlier", args=[conversation.code])
    anonymous = client.get(f"{url}?before={codes[80]}")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    assert stranger_client.get(f"{url}?before={codes[80]}").status_code == 404
    assert owner_client.get(f"{url}?before=not-a-code").status_code == 400
    assert owner_client.get(url).status_code == 400
    other = "00000000-0000-0000-0000-000000000000"
    assert owner_client.get(f"{url}?before={other}").status_code == 404
    assert owner_client.post(f"{url}?before={codes[80]}").status_code == 405
