"""Branch bookkeeping (issue 9): regenerate, continue, switch, edit, delete, fork, titles, the
sidebar's groups and the HTTP fallbacks. Replies are finished by hand; nothing runs a model."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from chat import services
from chat.models import Conversation, Message
from chat.templatetags.branch_tags import group_label, sidebar_groups
from inference.models import Generation

MODEL = "smollm2-135m-instruct"

pytestmark = [pytest.mark.django_db]


@pytest.fixture(autouse=True)
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """What the services ask of the worker (start, stop), recorded instead of sent."""
    messages: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr("inference.services._send", lambda ch, msg: messages.append((ch, msg)))
    return messages


@pytest.fixture
def conversation(owner, models_root) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation.objects.create(user=owner, model_id=MODEL)


def _finish(reply: Message, text: str, reason: str = "eos") -> Message:
    assert reply.generation is not None
    reply.generation.finish(reason, text=text, content=text, completion_tokens=3)
    return reply


def _turn(conversation: Conversation, text: str, answer: str) -> tuple[Message, Message]:
    conversation.refresh_from_db()
    user, reply = services.message_send(conversation=conversation, text=text)
    return user, _finish(reply, answer)


def _leaf(conversation: Conversation) -> Message | None:
    conversation.refresh_from_db()
    return conversation.leaf


def _prompt_turns(reply: Message) -> list[tuple[str, str]]:
    assert reply.generation is not None
    # The conversation's system prompt (chat.presets) leads the prompt, outside the tree.
    return [
        (m["role"], m["content"])
        for m in reply.generation.prompt_messages()
        if m["role"] != "system"
    ]


def _path_turns(conversation: Conversation, reply: Message) -> list[tuple[str, str]]:
    path = services.conversation_path(conversation, leaf=reply)[:-1]
    return [(m.role, m.text) for m in path]


def _path(conversation: Conversation) -> list[Message]:
    conversation.refresh_from_db()
    return services.conversation_path(conversation)


def _three_turns(conversation: Conversation) -> dict[str, Message]:
    u1, a1 = _turn(conversation, "Capital of France?", "Paris.")
    u2, a2 = _turn(conversation, "And of Italy?", "Rome.")
    return {"u1": u1, "a1": a1, "u2": u2, "a2": a2}


def test_it_regenerates_a_reply_as_a_sibling_answering_the_same_prompt(conversation) -> None:
    turns = _three_turns(conversation)
    old = turns["a2"]
    new = services.message_regenerate(conversation=conversation, message_code=str(old.code))

    assert new.parent_id == old.parent_id == turns["u2"].pk
    assert new.generation is not None and old.generation is not None
    assert new.generation.pk != old.generation.pk
    assert new.generation.prompt_id == old.generation.prompt_id
    assert _leaf(conversation) == new
    path = _path(conversation)
    assert [m.pk for m in path] == [turns["u1"].pk, turns["a1"].pk, turns["u2"].pk, new.pk]
    assert path[-1].siblings == [old.code, new.code]  # type: ignore[attr-defined]
    assert path[-1].sibling_index == 2  # type: ignore[attr-defined]


def test_a_regenerated_reply_keeps_the_settings_but_not_the_seed(conversation) -> None:
    conversation.refresh_from_db()
    _, reply = services.message_send(
        conversation=conversation, text="Hi", params={"temperature": 0.3, "seed": 7}
    )
    _finish(reply, "Hello")
    new = services.message_regenerate(conversation=conversation, message_code=str(reply.code))
    assert new.generation is not None
    assert new.generation.params["temperature"] == 0.3
    # A seed of its own, picked and recorded so that the new version can be replayed.
    assert new.generation.params["seed"] not in (None, 7)
    assert new.generation.provenance["seed_source"] == "picked"


def test_it_refuses_to_regenerate_a_user_message_or_while_a_reply_runs(conversation) -> None:
    turns = _three_turns(conversation)
    with pytest.raises(services.ChatError, match="Only a reply"):
        services.message_regenerate(conversation=conversation, message_code=str(turns["u1"].code))
    services.message_send(conversation=conversation, text="Still going")
    with pytest.raises(services.ChatError, match="Wait for the reply"):
        services.message_regenerate(conversation=conversation, message_code=str(turns["a1"].code))


def test_it_refuses_codes_that_are_not_messages_of_the_conversation(
    conversation, owner, models_root
) -> None:
    _three_turns(conversation)
    other = Conversation.objects.create(user=owner, model_id=MODEL)
    _, elsewhere = _turn(other, "Elsewhere", "There.")
    for code in ("not-a-uuid", str(elsewhere.code)):
        with pytest.raises(services.ChatError, match="No such message"):
            services.branch_switch(conversation=conversation, message_code=code)
        with pytest.raises(services.ChatError, match="No such message"):
            services.message_delete(conversation=conversation, message_code=code)
    assert Message.objects.filter(conversation=other).count() == 2


def test_switching_a_version_shows_its_branch_down_to_the_newest_message(conversation) -> None:
    turns = _three_turns(conversation)
    a1b = _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a1"].code)),
        "Paris, of course.",
    )
    assert [m.text for m in _path(conversation)] == [
        "Capital of France?",
        "Paris, of course.",
    ]
    # Back to the first version: its branch goes on down to the second exchange.
    services.branch_switch(conversation=conversation, message_code=str(turns["a1"].code))
    assert _leaf(conversation) == turns["a2"]
    path = _path(conversation)
    assert [m.text for m in path] == ["Capital of France?", "Paris.", "And of Italy?", "Rome."]
    assert path[1].sibling_index == 1  # type: ignore[attr-defined]
    services.branch_switch(conversation=conversation, message_code=str(a1b.code))
    assert _leaf(conversation) == a1b
    # While a reply streams, the branch shown stays (its tokens go to its place on the page).
    conversation.refresh_from_db()
    _, running = services.message_send(conversation=conversation, text="And Spain?")
    with pytest.raises(services.ChatError, match="before switching versions"):
        services.branch_switch(conversation=conversation, message_code=str(turns["a1"].code))
    services.branch_switch(conversation=conversation, message_code=str(running.code))
    assert _leaf(conversation) == running


def test_editing_a_message_makes_a_new_branch_with_a_new_reply(conversation) -> None:
    turns = _three_turns(conversation)
    user, reply = services.message_edit(
        conversation=conversation, message_code=str(turns["u2"].code), text="And of Spain?"
    )
    assert user.parent_id == turns["a1"].pk and user.role == "user"
    assert reply.parent_id == user.pk
    assert _leaf(conversation) == reply
    assert _prompt_turns(reply) == [
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Spain?"),
    ]
    # The old version and its reply are still there, one arrow away.
    path = _path(conversation)
    assert path[2].siblings == [turns["u2"].code, user.code]  # type: ignore[attr-defined]
    with pytest.raises(services.ChatError, match="Write a message"):
        services.message_edit(conversation=conversation, message_code=str(user.code), text="  ")


def test_editing_the_first_message_starts_a_new_root(conversation) -> None:
    turns = _three_turns(conversation)
    _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a2"].code)),
        "x",
    )
    user, reply = services.message_edit(
        conversation=conversation, message_code=str(turns["u1"].code), text="Capital of Peru?"
    )
    assert user.parent_id is None
    assert _prompt_turns(reply) == [("user", "Capital of Peru?")]
    assert [m.code for m in _path(conversation)][0] == user.code


def test_the_prompt_of_every_reply_is_its_path_from_the_root(conversation) -> None:
    turns = _three_turns(conversation)
    _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a1"].code)),
        "Paris!",
    )
    _turn(conversation, "And Germany?", "Berlin.")
    user, reply = services.message_edit(
        conversation=conversation, message_code=str(turns["u2"].code), text="And Spain?"
    )
    _finish(reply, "Madrid.")
    _turn(conversation, "Portugal?", "Lisbon.")
    services.branch_switch(conversation=conversation, message_code=str(turns["a2"].code))
    _turn(conversation, "Greece?", "Athens.")

    replies = list(conversation.messages.filter(role="assistant").select_related("generation"))
    assert len(replies) == 7
    for reply in replies:
        assert _prompt_turns(reply) == _path_turns(conversation, reply), reply.text


def test_deleting_a_message_takes_what_hangs_below_and_moves_the_leaf(conversation) -> None:
    turns = _three_turns(conversation)
    a1b = _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a1"].code)),
        "Paris!",
    )
    services.branch_switch(conversation=conversation, message_code=str(turns["a1"].code))
    assert _leaf(conversation) == turns["a2"]

    gone = services.message_delete(conversation=conversation, message_code=str(turns["a1"].code))

    assert gone == 3
    assert set(conversation.messages.values_list("pk", flat=True)) == {turns["u1"].pk, a1b.pk}
    assert _leaf(conversation) == a1b  # the branch that is left
    services.message_delete(conversation=conversation, message_code=str(turns["u1"].code))
    assert conversation.messages.count() == 0
    assert _leaf(conversation) is None


def test_deleting_keeps_the_leaf_when_another_branch_goes(conversation) -> None:
    turns = _three_turns(conversation)
    new = _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a2"].code)),
        "Rome!",
    )
    services.message_delete(conversation=conversation, message_code=str(turns["a2"].code))
    assert _leaf(conversation) == new


def test_deleting_stops_a_reply_running_below(conversation, sent) -> None:
    turns = _three_turns(conversation)
    conversation.refresh_from_db()
    _, running = services.message_send(conversation=conversation, text="Long story?")
    assert running.generation is not None
    code = str(running.generation.code)

    services.message_delete(conversation=conversation, message_code=str(turns["u2"].code))

    assert {"type": "generation.stop", "code": code} in [msg for _, msg in sent]
    assert not Message.objects.filter(pk=running.pk).exists()
    assert _leaf(conversation) == turns["a1"]


def test_a_fork_carries_the_path_and_leaves_the_original_untouched(conversation, owner) -> None:
    conversation.title = "Capitals"
    conversation.system_prompt = "Be brief."
    conversation.save()
    turns = _three_turns(conversation)
    _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a2"].code)),
        "Rome!",
    )
    before = list(conversation.messages.values_list("pk", "parent_id", "content"))

    fork = services.conversation_fork(conversation=conversation, message_code=str(turns["a2"].code))

    assert fork.pk != conversation.pk and fork.user == owner
    assert fork.title == "Capitals (fork)" and fork.title_edited
    assert fork.system_prompt == "Be brief."
    path = _path(fork)
    assert [(m.role, m.text) for m in path] == [
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    ]
    assert fork.messages.count() == 4  # the path only, not the other version
    old_generations = {turns["a1"].generation_id, turns["a2"].generation_id}
    assert not old_generations & {m.generation_id for m in path}
    assert path[-1].generation is not None and turns["a2"].generation is not None
    assert path[-1].generation.prompt_id == turns["a2"].generation.prompt_id
    assert list(conversation.messages.values_list("pk", "parent_id", "content")) == before
    # The fork goes on by itself, and its next prompt is its own path.
    _, reply = _turn(fork, "And of Spain?", "Madrid.")
    assert _prompt_turns(reply) == _path_turns(fork, reply)


def test_a_fork_at_a_user_message_starts_its_reply(conversation) -> None:
    turns = _three_turns(conversation)
    fork = services.conversation_fork(conversation=conversation, message_code=str(turns["u2"].code))
    path = _path(fork)
    assert [m.role for m in path] == ["user", "assistant", "user", "assistant"]
    assert path[-1].generation is not None and path[-1].generation.is_active
    assert _prompt_turns(path[-1]) == _path_turns(fork, path[-1])


def test_it_refuses_to_fork_through_a_running_reply(conversation) -> None:
    _three_turns(conversation)
    conversation.refresh_from_db()
    _, running = services.message_send(conversation=conversation, text="More?")
    with pytest.raises(services.ChatError, match="Wait for the reply"):
        services.conversation_fork(conversation=conversation, message_code=str(running.code))
    assert Conversation.objects.count() == 1


def test_it_continues_a_reply_that_hit_the_token_limit_as_a_new_version(conversation) -> None:
    user, reply = _turn(conversation, "Count to ten", "one two three")
    with pytest.raises(services.ChatError, match="token limit"):
        services.message_continue(conversation=conversation, message_code=str(reply.code))
    assert reply.generation is not None
    reply.generation.finish("max_tokens")

    continued = services.message_continue(conversation=conversation, message_code=str(reply.code))

    assert continued.parent_id == user.pk
    assert continued.generation is not None
    assert continued.generation.text == "one two three"  # the new tokens follow it
    assert continued.generation.prompt_id == reply.generation.prompt_id
    assert continued.generation.details["continues"] == str(reply.generation.code)
    assert _leaf(conversation) == continued


# --- titles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        ("Paris Trip Planning", "Paris Trip Planning"),
        ('"Capital of France."', "Capital of France"),
        ("Title: **French capitals**\nMore text", "French capitals"),
        ("<think>hmm</think>\n\n  The Big Question!  ", "The Big Question"),
        ("", ""),
        ("word " * 40, ("word " * 12).strip() + "…"),
    ],
)
def test_it_cleans_a_generated_title(answer: str, title: str) -> None:
    assert services.title_from_text(answer) == title


def test_the_title_starts_after_the_first_reply_ends_once(conversation, sent) -> None:
    conversation.refresh_from_db()
    _, reply = services.message_send(conversation=conversation, text="Plan a trip to Paris")
    assert services.title_start(conversation=conversation) is None  # the reply still runs
    _finish(reply, "Day 1: the Louvre.")

    generation = services.title_start(conversation=conversation)

    assert generation is not None
    assert generation.notify_group == services.title_group(conversation)
    prompt = generation.prompt_messages()
    assert prompt[-1]["role"] == "user"
    assert "Plan a trip to Paris" in prompt[-1]["content"]
    assert "Day 1: the Louvre." in prompt[-1]["content"]
    assert generation.params["max_tokens"] == services.TITLE_MAX_TOKENS
    assert services.title_start(conversation=conversation) == generation
    assert Generation.objects.filter(notify_group=generation.notify_group).count() == 1
    # The first reply's title (its first line) stays until the generated one ends.
    conversation.refresh_from_db()
    assert conversation.title == "Plan a trip to Paris"


def test_a_title_is_applied_unless_the_user_set_one(conversation) -> None:
    _turn(conversation, "Plan a trip to Paris", "Day 1: the Louvre.")
    generation = services.title_start(conversation=conversation)
    assert generation is not None
    assert not services.title_apply(conversation=conversation)  # not finished yet
    generation.finish("eos", text="Paris Trip Itinerary", content="Paris Trip Itinerary")

    assert services.title_apply(conversation=conversation)
    conversation.refresh_from_db()
    assert conversation.title == "Paris Trip Itinerary"
    assert not services.title_apply(conversation=conversation)  # already there

    services.conversation_rename(conversation=conversation, title="My trip")
    generation.finish("eos", text="Another Title", content="Another Title")
    assert not services.title_apply(conversation=conversation)
    conversation.refresh_from_db()
    assert (conversation.title, conversation.title_edited) == ("My trip", True)
    assert services.title_start(conversation=conversation) is None


def test_a_title_that_ended_with_no_tab_open_shows_on_the_next_page(
    owner_client: Client, conversation
) -> None:
    _turn(conversation, "Plan a trip to Paris", "Day 1: the Louvre.")
    generation = services.title_start(conversation=conversation)
    assert generation is not None
    generation.finish("eos", text="Paris In Three Days", content="Paris In Three Days")

    body = owner_client.get(reverse("chat:index")).content.decode()

    assert "Paris In Three Days" in body
    conversation.refresh_from_db()
    assert conversation.title == "Paris In Three Days"


def test_a_title_from_elsewhere_is_kept(owner, models_root) -> None:
    from inference.schemas import ChatMessage

    imported = services.conversation_import(
        user=owner,
        model_id=MODEL,
        messages=[
            ChatMessage(role="user", content="Plan a trip"),
            ChatMessage(role="assistant", content="Sure."),
        ],
        title="Holiday ideas",
    )
    assert services.title_start(conversation=imported) is None
    assert not Generation.objects.filter(notify_group=services.title_group(imported)).exists()


def test_an_interrupted_title_is_tried_again(conversation) -> None:
    _turn(conversation, "Plan a trip to Paris", "Day 1.")
    first = services.title_start(conversation=conversation)
    assert first is not None
    first.finish("interrupted")
    second = services.title_start(conversation=conversation)
    assert second is not None and second.pk != first.pk


# --- the sidebar ---------------------------------------------------------------------------


def test_it_labels_dates_like_the_chat_apps_do() -> None:
    today = datetime.date(2026, 11, 27)
    days = [0, 1, 2, 7, 8, 30, 31, 400]
    labels = [group_label(today - datetime.timedelta(days=d), today) for d in days]
    assert labels == [
        "Today",
        "Yesterday",
        "Previous 7 days",
        "Previous 7 days",
        "Previous 30 days",
        "Previous 30 days",
        "October 2026",
        "October 2025",
    ]


def test_pinned_conversations_come_first_then_the_date_groups(owner, models_root) -> None:
    now = timezone.now()
    make = Conversation.objects.create
    make(user=owner, model_id=MODEL, title="old", updated_at=now - datetime.timedelta(days=3))
    make(user=owner, model_id=MODEL, title="new", updated_at=now)
    make(
        user=owner,
        model_id=MODEL,
        title="pin",
        pinned=True,
        updated_at=now - datetime.timedelta(days=90),
    )

    groups = sidebar_groups(Conversation.objects.filter(user=owner))

    assert [(g.label, [c.title for c in g.items]) for g in groups] == [
        ("Pinned", ["pin"]),
        ("Today", ["new"]),
        ("Previous 7 days", ["old"]),
    ]


# --- the forms without the socket ------------------------------------------------------------


def test_the_forms_work_without_the_socket(owner_client: Client, conversation) -> None:
    turns = _three_turns(conversation)
    code = conversation.code

    response = owner_client.post(reverse("chat:regenerate", args=[code, turns["a2"].code]))
    assert response.status_code == 302 and response["Location"] == f"/c/{code}/"
    new = _leaf(conversation)
    assert new is not None and new.parent_id == turns["u2"].pk
    _finish(new, "Rome!")

    page = owner_client.get(reverse("chat:detail", args=[code])).content.decode()
    assert "2/2" in page and "Regenerate" in page and "Copy" in page

    owner_client.post(reverse("chat:switch", args=[code, turns["a2"].code]))
    assert _leaf(conversation) == turns["a2"]
    owner_client.post(
        reverse("chat:edit", args=[code, turns["u2"].code]), {"content": "And of Spain?"}
    )
    leaf = _leaf(conversation)
    assert leaf is not None and leaf.parent is not None and leaf.parent.content == "And of Spain?"
    _finish(leaf, "Madrid.")

    response = owner_client.post(reverse("chat:fork", args=[code, turns["a1"].code]))
    fork = Conversation.objects.exclude(pk=conversation.pk).get()
    assert response["Location"] == f"/c/{fork.code}/"

    owner_client.post(reverse("chat:delete_message", args=[code, turns["u2"].code]))
    assert not Message.objects.filter(pk=turns["u2"].pk).exists()

    owner_client.post(reverse("chat:pin", args=[code]), {"pinned": "on"})
    conversation.refresh_from_db()
    assert conversation.pinned
    page = owner_client.get(reverse("chat:index")).content.decode()
    assert "Pinned" in page


def test_bad_form_input_says_why_and_changes_nothing(owner_client: Client, conversation) -> None:
    turns = _three_turns(conversation)
    code = conversation.code
    response = owner_client.post(
        reverse("chat:edit", args=[code, turns["u2"].code]), {"content": "x" * 100_001}, follow=True
    )
    assert "Invalid request: content" in response.content.decode()
    response = owner_client.post(reverse("chat:pin", args=[code]), {"pinned": "maybe"}, follow=True)
    assert "Invalid request: pinned" in response.content.decode()
    response = owner_client.post(
        reverse("chat:regenerate", args=[code, turns["u1"].code]), follow=True
    )
    assert "Only a reply can be regenerated" in response.content.decode()
    assert conversation.messages.count() == 4
    conversation.refresh_from_db()
    assert not conversation.pinned


@pytest.mark.parametrize(
    "name", ["regenerate", "continue", "switch", "edit", "delete_message", "fork"]
)
def test_strangers_anonymous_and_gets_are_refused(
    name: str, client: Client, owner_client: Client, stranger_client: Client, conversation
) -> None:
    turns = _three_turns(conversation)
    url = reverse(f"chat:{name}", args=[conversation.code, turns["a1"].code])
    assert stranger_client.post(url, {"text": "x"}).status_code == 404
    anonymous = client.post(url, {"text": "x"})
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    assert owner_client.get(url).status_code == 405
    assert conversation.messages.count() == 4
    assert Conversation.objects.count() == 1
    pin = reverse("chat:pin", args=[conversation.code])
    assert stranger_client.post(pin, {"pinned": "on"}).status_code == 404


def test_a_link_to_a_message_shows_its_branch_and_marks_it(
    owner_client: Client, conversation
) -> None:
    turns = _three_turns(conversation)
    other = _finish(
        services.message_regenerate(conversation=conversation, message_code=str(turns["a1"].code)),
        "Paris!",
    )
    assert _leaf(conversation) == other

    url = reverse("chat:detail", args=[conversation.code])
    body = owner_client.get(url, {"m": str(turns["u2"].code)}).content.decode()

    assert "And of Italy?" in body and "Rome." in body
    assert f'data-scroll-target="message-{turns["u2"].code}"' in body
    assert _leaf(conversation) == turns["a2"]
    body = owner_client.get(url, {"m": "nonsense"}).content.decode()
    assert "No such message in this conversation." in body
