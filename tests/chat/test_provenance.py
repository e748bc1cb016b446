"""A reply's details (provenance, exact prompt, tokens), replay with another model or preset,
two versions side by side and the token-level fork (issue 9): over HTTP with the worker's
messages recorded, and one fork end to end through the real worker on the tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.test import Client
from django.urls import reverse

from chat import provenance
from chat.models import Conversation, Message
from inference import services
from inference.models import Generation
from inference.provenance import rendered_prompt, template_hash, trace_text
from inference.schemas import ChatMessage, GenerationParams
from tests.support.worker import in_process_worker

QUESTION = "What is the capital of France?"


@pytest.fixture
def tiny(tiny: str, models_root: Path, tiny_model_dir: Path) -> str:
    """The shared tiny model, and a second copy of it to switch to."""
    shutil.copytree(tiny_model_dir, models_root / "tiny-two")
    return tiny


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the services send the worker (nothing runs it in these tests)."""
    messages: list[dict[str, Any]] = []
    monkeypatch.setattr("inference.services._send", lambda channel, msg: messages.append(msg))
    return messages


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)


def _trace(tokenizer: Any, text: str) -> list[dict[str, Any]]:
    """A token trace of `text` as the worker records one: each token with three alternatives
    (itself first), ids included."""
    entries = []
    alternatives = tokenizer.encode(" Lyon Marseille", add_special_tokens=False)
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        piece = tokenizer.decode([token_id])
        top = [{"token": piece, "id": token_id, "logprob": -0.1}]
        top += [
            {"token": tokenizer.decode([a]), "id": a, "logprob": -2.5 - i}
            for i, a in enumerate(alternatives[:2])
        ]
        entries.append({"token": piece, "id": token_id, "logprob": -0.1, "top": top})
    return entries


@pytest.fixture
def conversation(owner: Any, tiny: str) -> Conversation:
    return Conversation.objects.create(user=owner, model_id=tiny, title="France")


@pytest.fixture
def reply(conversation: Conversation, tokenizer: Any) -> Message:
    """A finished reply with the provenance and token trace the worker writes."""
    generation = services.generation_record(
        model_id="tiny",
        messages=[ChatMessage(role="user", content=QUESTION)],
        text="The capital of France is Paris.",
        params=GenerationParams(temperature=0.7, seed=1234, max_tokens=64),
        completion_tokens=8,
    )
    generation.provenance = {
        "model_id": "tiny",
        "kind": "mlx",
        "source": "tiny",
        "weights_fingerprint": "ab" * 32,
        "quantization": {"method": "affine", "bits": 4, "group_size": 32},
        "chat_template_sha256": template_hash(tokenizer.chat_template),
        "compute_dtype": "float32",
        "device": "Device(cpu, 0)",
        "versions": {"mlx": "0.32.4", "mlx_lm": "0.32.2", "transformers": "4.0"},
        "sampler": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "stop": []},
        "seed": 1234,
        "seed_source": "picked",
    }
    generation.token_trace = _trace(tokenizer, generation.text)
    generation.details = {"trace": True}
    generation.save()
    user_message = Message.objects.create(conversation=conversation, role="user", content=QUESTION)
    message = Message.objects.create(
        conversation=conversation, role="assistant", generation=generation, parent=user_message
    )
    Conversation.objects.filter(pk=conversation.pk).update(leaf=message)
    return message


def _url(name: str, reply: Message, query: str = "") -> str:
    return reverse(f"chat:{name}", args=[reply.conversation.code, reply.code]) + query


def test_the_details_popover_shows_the_replys_provenance(
    owner_client: Client, reply: Message
) -> None:
    body = owner_client.get(reverse("chat:detail", args=[reply.conversation.code])).content
    page = body.decode()
    assert 'class="reply-details"' in page
    for shown in (
        "Weights fingerprint",
        "abababababab",
        "affine 4-bit, group 32",
        "float32 on Device(cpu, 0)",
        "temperature 0.7",
        "1234 (picked for this reply)",
        "mlx 0.32.4",
        "mlx-lm 0.32.2",
    ):
        assert shown in page, shown
    assert _url("reply_prompt", reply) in page
    assert _url("reply_tokens", reply) in page
    assert _url("reply_compare", reply) in page
    # A reply that kept no trace offers no tokens to fork from.
    Generation.objects.filter(pk=reply.generation.pk).update(details={})  # type: ignore[union-attr]
    again = owner_client.get(reverse("chat:detail", args=[reply.conversation.code]))
    assert _url("reply_tokens", reply) not in again.content.decode()


def test_the_exact_prompt_is_rendered_with_the_models_template(
    owner_client: Client, reply: Message
) -> None:
    response = owner_client.get(_url("reply_prompt", reply), HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    page = response.content.decode()
    assert "<html" not in page  # the panel alone, for the popover
    assert "&lt;|im_start|&gt;user\n" + QUESTION in page
    assert page.count("&lt;|im_start|&gt;assistant") == 1
    assert "template changed" not in page
    full = owner_client.get(_url("reply_prompt", reply)).content.decode()
    assert "<html" in full and "&lt;|im_start|&gt;user" in full


def test_the_prompt_says_when_the_template_changed_since(
    owner_client: Client, reply: Message
) -> None:
    generation = reply.generation
    assert generation is not None
    generation.provenance = {**generation.provenance, "chat_template_sha256": "0" * 64}
    generation.save()
    page = owner_client.get(_url("reply_prompt", reply)).content.decode()
    assert "chat template changed since this reply" in page


def test_a_continued_replys_prompt_ends_with_its_prefix(reply: Message, sent: list) -> None:
    assert reply.generation is not None
    continued = services.generation_continue(generation=reply.generation, prefix="The capital")
    rendered = rendered_prompt(continued)
    assert rendered.text.endswith("<|im_start|>assistant\nThe capital")
    assert continued.details["prefix_tokens"] == 2  # "The", " capital" from the trace


def test_the_token_view_lists_tokens_and_a_tokens_alternatives(
    owner_client: Client, reply: Message
) -> None:
    page = owner_client.get(_url("reply_tokens", reply)).content.decode()
    assert page.count('role="listitem" class="token') == len(reply.generation.token_trace)  # type: ignore[union-attr]
    assert "?at=3" in page
    response = owner_client.get(
        _url("reply_tokens", reply, "?at=3&part=alternatives"), HTTP_HX_REQUEST="true"
    )
    fragment = response.content.decode()
    assert "Token 4" in fragment
    assert "90%" in fragment  # exp(-0.1)
    assert "as written" in fragment
    assert fragment.count('name="choice"') == 3
    assert "Lyon" in fragment
    bad = owner_client.get(_url("reply_tokens", reply, "?at=999"))
    assert bad.status_code == 400
    assert owner_client.get(_url("reply_tokens", reply, "?at=x")).status_code == 400


def test_a_token_fork_is_a_new_version_starting_with_the_chosen_token(
    owner_client: Client, reply: Message, sent: list, django_capture_on_commit_callbacks: Any
) -> None:
    generation = reply.generation
    assert generation is not None
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(_url("reply_fork", reply), {"index": "4", "choice": "1"})
    assert response.status_code == 302
    forked = Message.objects.exclude(pk=reply.pk).get(role="assistant")
    assert forked.parent_id == reply.parent_id  # a sibling: another version of the turn
    conversation = Conversation.objects.get(pk=reply.conversation.pk)
    assert conversation.leaf_id == forked.pk
    new = forked.generation
    assert new is not None
    expected = trace_text(generation.token_trace[:4]) + " Lyon"
    assert new.text == expected and new.text.startswith("The capital of France")
    assert new.prompt_id == generation.prompt_id
    assert new.details["prefix_chars"] == len(expected)
    assert new.details["prefix_tokens"] == 5
    assert new.token_trace[:4] == generation.token_trace[:4]
    assert new.token_trace[4]["token"] == " Lyon"
    assert new.provenance["continues"] == str(generation.code)
    assert sent[-1] == {"type": "generation.start", "code": str(new.code)}


@pytest.mark.parametrize(
    "data",
    [
        {"index": "99", "choice": "0"},
        {"index": "1", "choice": "7"},
        {"index": "x", "choice": "0"},
        {},
    ],
)
def test_a_bad_fork_says_why_and_changes_nothing(
    owner_client: Client, reply: Message, sent: list, data: dict[str, str]
) -> None:
    response = owner_client.post(_url("reply_fork", reply), data, follow=True)
    assert response.status_code == 200
    assert Message.objects.filter(role="assistant").count() == 1
    page = response.content.decode()
    assert any(
        why in page
        for why in ("not in this reply", "not offered", "whole number", "Choose a token")
    )
    assert Generation.objects.count() == 1


def test_a_reply_without_a_trace_cannot_be_forked(
    owner_client: Client, reply: Message, sent: list
) -> None:
    assert reply.generation is not None
    Generation.objects.filter(pk=reply.generation.pk).update(token_trace=[])
    response = owner_client.post(
        _url("reply_fork", reply), {"index": "0", "choice": "0"}, follow=True
    )
    assert "no token trace" in response.content.decode()
    assert Message.objects.filter(role="assistant").count() == 1


def test_replay_with_another_model_is_a_new_version_of_the_turn(
    owner_client: Client, reply: Message, sent: list
) -> None:
    form = owner_client.get(_url("reply_replay_form", reply)).content.decode()
    assert 'value="tiny-two"' in form and 'value="deterministic"' in form
    response = owner_client.post(_url("reply_replay", reply), {"model": "tiny-two"})
    assert response.status_code == 302
    replayed = Message.objects.exclude(pk=reply.pk).get(role="assistant")
    assert replayed.parent_id == reply.parent_id
    assert replayed.generation is not None and reply.generation is not None
    assert replayed.generation.model_id == "tiny-two"
    assert replayed.generation.prompt_id == reply.generation.prompt_id


def test_replay_with_a_preset_uses_its_settings(
    owner_client: Client, reply: Message, sent: list
) -> None:
    from chat.presets import Presets

    preset = Presets(reply.conversation.user).get("deterministic")
    owner_client.post(_url("reply_replay", reply), {"preset": "deterministic"})
    replayed = Message.objects.exclude(pk=reply.pk).get(role="assistant")
    assert replayed.generation is not None
    for name, value in preset.sampling.items():
        assert replayed.generation.params[name] == value, name


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({}, "Choose a model or a preset"),
        ({"model": "nope"}, "Unknown model"),
        ({"preset": "nope"}, "cannot be used"),
    ],
)
def test_a_bad_replay_says_why(
    owner_client: Client, reply: Message, sent: list, data: dict[str, str], why: str
) -> None:
    response = owner_client.post(_url("reply_replay", reply), data, follow=True)
    assert why in response.content.decode()
    assert Message.objects.filter(role="assistant").count() == 1


def test_two_versions_show_side_by_side(owner_client: Client, reply: Message, sent: list) -> None:
    single = owner_client.get(_url("reply_compare", reply)).content.decode()
    assert "only one version" in single
    owner_client.post(_url("reply_replay", reply), {"model": "tiny-two"})
    other = Message.objects.exclude(pk=reply.pk).get(role="assistant")
    page = owner_client.get(_url("reply_compare", reply)).content.decode()
    assert page.count('class="compare-column"') == 2
    assert "Version 1 · tiny" in page and "Version 2 · tiny-two" in page
    assert "The capital of France is Paris." in page
    chosen = owner_client.get(_url("reply_compare", other, f"?with={reply.code}"))
    assert chosen.status_code == 200
    assert owner_client.get(_url("reply_compare", reply, f"?with={reply.code}")).status_code == 400


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("reply_prompt", "get"),
        ("reply_tokens", "get"),
        ("reply_replay_form", "get"),
        ("reply_compare", "get"),
        ("reply_fork", "post"),
        ("reply_replay", "post"),
    ],
)
def test_strangers_get_404_anonymous_sign_in_and_the_wrong_method_405(
    client: Client,
    stranger_client: Client,
    owner_client: Client,
    reply: Message,
    sent: list,
    name: str,
    method: str,
) -> None:
    url = _url(name, reply)
    data = {"index": "0", "choice": "1", "model": "tiny-two"}
    response = getattr(stranger_client, method)(url, data)
    assert response.status_code == 404
    anonymous = getattr(client, method)(url, data)
    assert anonymous.status_code == 302 and "login" in anonymous["Location"]
    wrong = "post" if method == "get" else "get"
    assert getattr(owner_client, wrong)(url).status_code == 405
    assert Message.objects.filter(role="assistant").count() == 1


def test_a_user_message_is_no_reply(owner_client: Client, reply: Message) -> None:
    question = Message.objects.get(role="user")
    url = reverse("chat:reply_prompt", args=[reply.conversation.code, question.code])
    assert owner_client.get(url).status_code == 404


def test_a_reply_from_before_provenance_says_so(reply: Message) -> None:
    assert reply.generation is not None
    reply.generation.provenance = {}
    rows = provenance.provenance_rows(reply.generation)
    assert [r.label for r in rows][-1] == "Recorded"


# --- end to end through the worker ---------------------------------------------------------


@pytest.fixture
async def worker(tiny: str) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


async def _until_done(channel: str, code: str) -> None:
    layer = get_channel_layer()
    assert layer is not None
    async with asyncio.timeout(200):
        while True:
            message = await layer.receive(channel)
            if message["type"] == "generation.done" and message["code"] == code:
                return


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
async def test_a_fork_streams_from_the_chosen_token_through_the_worker(
    worker: None, owner: Any
) -> None:
    conversation = await Conversation.objects.acreate(user=owner, model_id="tiny")
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    await layer.group_add(conversation.group_name, channel)
    first = await sync_to_async(services.generation_create)(
        model_id="tiny",
        messages=[ChatMessage(role="user", content=QUESTION)],
        params=GenerationParams(temperature=0.8, max_tokens=16),
        notify_group=conversation.group_name,
        replayable=True,
    )
    question = await Message.objects.acreate(
        conversation=conversation, role="user", content=QUESTION
    )
    message = await Message.objects.acreate(
        conversation=conversation, role="assistant", generation=first, parent=question
    )
    await _until_done(channel, str(first.code))
    first = await Generation.objects.aget(pk=first.pk)
    assert len(first.token_trace) == 16
    assert first.provenance["seed_source"] == "picked"
    assert first.provenance["model_id"] == "tiny"
    choice = 2
    forked = await sync_to_async(provenance.reply_fork)(
        conversation=conversation, message_code=str(message.code), index=5, choice=choice
    )
    assert forked.generation is not None
    await _until_done(channel, str(forked.generation.code))
    new = await Generation.objects.aget(pk=forked.generation.pk)
    prefix = trace_text([*first.token_trace[:5], first.token_trace[5]["top"][choice]])
    if trace_text(first.token_trace[:1]).startswith(" ") and not first.text.startswith(" "):
        prefix = prefix.removeprefix(" ")  # detokenizers trim the reply's leading space
    assert new.state == Generation.State.COMPLETE
    assert new.text.startswith(prefix) and len(new.text) > len(prefix)
    assert new.token_trace[5]["token"] == first.token_trace[5]["top"][choice]["token"]
    assert len(new.token_trace) == 6 + new.completion_tokens
    assert new.provenance["weights_fingerprint"] == first.provenance["weights_fingerprint"]
    assert json.dumps(new.provenance)  # plain JSON all through
