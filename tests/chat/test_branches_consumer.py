"""The branch actions over the chat websocket (issue 9), with the scripted engine: every open
tab sees the result, bad input is an error frame that changes nothing, titles arrive by
themselves."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from chat import services
from chat.models import Conversation, Message
from inference.models import Generation
from tests.chat.conftest import connected_socket, frames_until

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "smollm2-135m-instruct"
# The scripted engine answers everything, the title too, with this.
ANSWER = "Hello there, friend."


@pytest.fixture
def conversation(owner, models_root) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation.objects.create(user=owner, model_id=MODEL)


def _action(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "HEADERS": {"HX-Request": "true"}, **fields})


async def _reply(conversation: Conversation) -> Message:
    """The newest reply."""
    reply = await (
        Message.objects.filter(conversation=conversation, role="assistant")
        .select_related("generation")
        .order_by("-id")
        .afirst()
    )
    assert reply is not None
    return reply


async def test_a_regenerated_reply_and_the_title_reach_every_tab(
    owner, conversation, fake_engine, running_worker
) -> None:
    first = await connected_socket(owner, conversation)
    second = await connected_socket(owner, conversation)
    await first.send_to(text_data=_action("send", text="Say hello"))
    await frames_until(second, 'class="body md"')

    # The title: generated once the reply has ended, shown in every tab's list, its tokens
    # never streamed into the page.
    title = "Hello there, friend"
    frames = await frames_until(first, f">{title}</a>")
    await frames_until(second, f">{title}</a>")
    generation = await Generation.objects.aget(notify_group=services.title_group(conversation))
    assert str(generation.code) not in frames
    await conversation.arefresh_from_db()
    assert (conversation.title, conversation.title_edited) == (title, False)

    old = await _reply(conversation)
    await second.send_to(text_data=_action("regenerate", message=str(old.code)))
    for tab in (first, second):
        frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
        assert "1/2" not in frames and "2/2" in frames
        await frames_until(tab, 'class="body md"')  # the new version's final render
    new = await _reply(conversation)
    assert new.pk != old.pk and new.parent_id == old.parent_id
    assert new.generation is not None and new.generation.text == ANSWER

    await first.send_to(text_data=_action("switch", message=str(old.code)))
    for tab in (first, second):
        frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
        assert "1/2" in frames
    await conversation.arefresh_from_db()
    assert conversation.leaf_id == old.pk
    await first.disconnect()
    await second.disconnect()


async def test_an_edit_makes_a_branch_with_its_reply(
    owner, conversation, fake_engine, running_worker
) -> None:
    tab = await connected_socket(owner, conversation)
    await tab.send_to(text_data=_action("send", text="Say hello"))
    await frames_until(tab, 'class="body md"')
    user = await Message.objects.aget(conversation=conversation, role="user")

    await tab.send_to(text_data=_action("edit", message=str(user.code), content="Say goodbye"))

    frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
    assert "Say goodbye" in frames and "2/2" in frames
    await frames_until(tab, 'class="body md"')
    reply = await _reply(conversation)
    assert reply.generation is not None
    assert await sync_to_async(reply.generation.prompt_messages)() == [
        {"role": "user", "content": "Say goodbye"}
    ]
    await tab.disconnect()


async def test_deleting_stops_the_running_reply_below(
    owner, conversation, fake_engine, running_worker
) -> None:
    fake_engine.pause_after = 1
    tab = await connected_socket(owner, conversation)
    await tab.send_to(text_data=_action("send", text="Tell me a long story"))
    await frames_until(tab, 'hx-swap-oob="beforeend:#reply-')
    reply = await _reply(conversation)
    user = await Message.objects.aget(conversation=conversation, role="user")

    await tab.send_to(text_data=_action("delete", message=str(user.code)))

    frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
    shown = frames.split("innerHTML:#messages")[-1]
    assert f'id="message-{user.code}"' not in shown
    assert f'id="message-{reply.code}"' not in shown
    assert reply.generation is not None
    assert str(reply.generation.code) in fake_engine.cancelled
    fake_engine.gate.set()
    assert not await Message.objects.filter(conversation=conversation).aexists()
    await tab.disconnect()


async def test_a_fork_opens_in_the_tab_that_asked_and_pins_show_everywhere(
    owner, conversation, fake_engine, running_worker
) -> None:
    first = await connected_socket(owner, conversation)
    second = await connected_socket(owner, conversation)
    await first.send_to(text_data=_action("send", text="Say hello"))
    await frames_until(first, 'class="body md"')
    reply = await _reply(conversation)

    await first.send_to(text_data=_action("fork", message=str(reply.code)))

    frames = await frames_until(first, "socket-navigate")
    fork = await Conversation.objects.exclude(pk=conversation.pk).aget()
    assert f'data-location="/c/{fork.code}/"' in frames
    assert await Message.objects.filter(conversation=fork).acount() == 2

    await second.send_to(text_data=_action("pin", pinned="on"))
    for tab in (first, second):
        frames = await frames_until(tab, "Unpin")
        assert ">Pinned</h2>" in frames
    await conversation.arefresh_from_db()
    assert conversation.pinned
    await second.send_to(text_data=_action("rename", title="  My   trip "))
    await frames_until(first, 'value="My trip"')
    await conversation.arefresh_from_db()
    assert (conversation.title, conversation.title_edited) == ("My trip", True)
    await first.disconnect()
    await second.disconnect()


async def test_a_title_due_while_no_tab_was_open_starts_when_one_opens(
    owner, conversation, fake_engine, running_worker
) -> None:
    def exchange_without_a_tab() -> None:
        _, reply = services.message_send(conversation=conversation, text="Say hello")
        assert reply.generation is not None
        reply.generation.finish("eos", text="Hi!", content="Hi!")

    await sync_to_async(exchange_without_a_tab)()
    tab = await connected_socket(owner, conversation)
    await frames_until(tab, ">Hello there, friend</a>")
    await conversation.arefresh_from_db()
    assert conversation.title == "Hello there, friend"
    await tab.disconnect()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (_action("regenerate", message="nope"), "message"),
        (_action("regenerate", message="0" * 32), "No such message"),
        (_action("switch"), "message"),
        (_action("edit", message="0" * 32), "content"),
        (_action("delete", message="0" * 32, extra=1), "extra"),
        (_action("fork", message="0" * 32), "No such message"),
        (_action("continue", message="0" * 32), "No such message"),
        (_action("pin", pinned="maybe"), "pinned"),
        (_action("rename", title=""), "title"),
        (_action("rename", title="x" * 201), "title"),
    ],
)
async def test_bad_branch_actions_are_errors_that_change_nothing(
    owner, conversation, payload, error
) -> None:
    tab = await connected_socket(owner, conversation)
    await tab.send_to(text_data=payload)
    frame = await tab.receive_from(timeout=5)
    assert 'id="socket-error"' in frame
    assert error in frame
    await conversation.arefresh_from_db()
    assert not conversation.pinned and conversation.title == "New chat"
    await tab.disconnect()


async def test_it_refuses_actions_on_another_conversations_messages(
    owner, stranger, conversation, models_root
) -> None:
    def strangers_exchange() -> Message:
        theirs = Conversation.objects.create(user=stranger, model_id=MODEL)
        _, reply = services.message_send(conversation=theirs, text="Private")
        assert reply.generation is not None
        reply.generation.finish("eos", text="Secret", content="Secret")
        return reply

    reply = await sync_to_async(strangers_exchange)()
    tab = await connected_socket(owner, conversation)
    for kind in ("regenerate", "delete", "fork", "switch"):
        await tab.send_to(text_data=_action(kind, message=str(reply.code)))
        frame = await tab.receive_from(timeout=5)
        assert "No such message in this conversation." in frame
        assert "Secret" not in frame
    assert await Message.objects.filter(conversation_id=reply.conversation_id).acount() == 2
    assert await Conversation.objects.acount() == 2
    await tab.disconnect()


@pytest.fixture
def tiny_conversation(owner, tiny, real_engine):  # type: ignore[no-untyped-def]
    """A conversation with the tiny model (a library entry) and a fresh real engine."""
    return Conversation.objects.create(user=owner, model_id=tiny)


@pytest.mark.timeout(300)
async def test_through_the_real_engine_a_greedy_regeneration_repeats_the_reply_and_a_title_comes(
    owner, tiny_conversation, running_worker
) -> None:
    conversation = tiny_conversation
    tab = await connected_socket(owner, conversation)
    await tab.send_to(text_data=_action("send", text="Hello", temperature=0, max_tokens=8))
    await frames_until(tab, 'class="body md"', limit=500)
    # The title's end refreshes the list (the reply's own frames came before it).
    await frames_until(tab, 'id="sidebar"', limit=500)
    title = await Generation.objects.aget(notify_group=services.title_group(conversation))
    assert title.state == Generation.State.COMPLETE
    await conversation.arefresh_from_db()
    expected = services.title_from_text(title.content or title.text) or "Hello"
    assert conversation.title == expected

    old = await _reply(conversation)
    await tab.send_to(text_data=_action("regenerate", message=str(old.code)))
    await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
    await frames_until(tab, 'class="body md"', limit=500)
    new = await _reply(conversation)
    assert new.pk != old.pk and new.generation is not None and old.generation is not None
    assert new.generation.prompt_id == old.generation.prompt_id
    assert new.generation.text == old.generation.text  # greedy, the same prompt
    await tab.disconnect()


async def test_forms_and_links_without_the_socket_update_the_open_tabs(
    owner, conversation, fake_engine, running_worker
) -> None:
    from django.test import Client

    tab = await connected_socket(owner, conversation)
    await tab.send_to(text_data=_action("send", text="Say hello"))
    await frames_until(tab, 'class="body md"')
    old = await _reply(conversation)
    client = Client()
    await sync_to_async(client.force_login)(owner)

    # Another window without the socket regenerates: this tab shows the new version.
    await sync_to_async(client.post)(f"/c/{conversation.code}/m/{old.code}/regenerate/")
    frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
    assert "2/2" in frames
    await frames_until(tab, 'class="body md"')
    # A search hit's link to the first version: the tab follows to that branch.
    await sync_to_async(client.get)(f"/c/{conversation.code}/", {"m": str(old.code)})
    frames = await frames_until(tab, 'hx-swap-oob="innerHTML:#messages"')
    assert "1/2" in frames
    await sync_to_async(client.post)(f"/c/{conversation.code}/pin/", {"pinned": "on"})
    await frames_until(tab, ">Pinned</h2>")
    await tab.disconnect()
