"""A reply's details (provenance, exact prompt, token trace), replay, compare and the token-level
fork (issue 9). Thin: look the reply up for its owner (404 for anyone else), call
chat.provenance, render or redirect. Each GET page has a partial that the details popover
loads with htmx; without JavaScript the links open the pages themselves."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from chat import provenance
from chat.models import Conversation, Message
from chat.services import ChatError
from chat.views import SignedInRequest
from inference.provenance import rendered_prompt

MAX_CHOICE_INDEX = 10**6


def _reply_for_user(request: SignedInRequest, code: UUID, reply: UUID) -> Message:
    """The user's own finished-or-not reply (an assistant message with a generation), or 404."""
    conversation = get_object_or_404(Conversation, code=code, user=request.user)
    message = get_object_or_404(
        Message.objects.select_related("generation", "conversation"),
        conversation=conversation,
        code=reply,
        role=Message.Role.ASSISTANT,
    )
    if message.generation is None:
        raise Http404("This reply has no record left.")
    return message


def _render(request: SignedInRequest, template: str, context: dict[str, Any]) -> HttpResponse:
    """The page, or only its panel for the popover's htmx request."""
    if request.htmx:
        template = f"{template}#panel"
    return render(request, template, context)


def _back(request: SignedInRequest, conversation: Conversation) -> HttpResponse:
    if request.htmx:
        url = reverse("chat:detail", kwargs={"code": conversation.code})
        return HttpResponseClientRedirect(url)
    return redirect("chat:detail", code=conversation.code)


@require_GET
@login_required
def reply_prompt(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """The exact prompt of a reply, rendered again from the model's tokenizer."""
    message = _reply_for_user(request, code, reply)
    assert message.generation is not None
    context = {
        "conversation": message.conversation,
        "message": message,
        "prompt": rendered_prompt(message.generation),
    }
    return _render(request, "chat/reply_prompt.html", context)


def _int_param(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ChatError(f"{name} must be a whole number.") from None
    if not 0 <= number < MAX_CHOICE_INDEX:
        raise ChatError(f"{name} is out of range.")
    return number


@require_GET
@login_required
def reply_tokens(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """A finished reply as its tokens; `?at=N` shows token N's alternatives, each a button
    that forks the reply there."""
    message = _reply_for_user(request, code, reply)
    generation = message.generation
    assert generation is not None
    tokens = provenance.trace_tokens(generation)
    try:
        at = _int_param(request.GET.get("at"), "at")
    except ChatError as e:
        return HttpResponse(str(e), status=400, content_type="text/plain; charset=utf-8")
    if at is not None and at >= len(tokens):
        return HttpResponse(
            "That token is not in this reply.", status=400, content_type="text/plain; charset=utf-8"
        )
    selected = tokens[at] if at is not None else None
    context = {
        "conversation": message.conversation,
        "message": message,
        "generation": generation,
        "tokens": tokens,
        "selected": selected,
        "can_fork": not generation.is_active,
    }
    if request.htmx and request.GET.get("part") == "alternatives":
        return render(request, "chat/reply_tokens.html#alternatives", context)
    return _render(request, "chat/reply_tokens.html", context)


@require_POST
@login_required
def reply_fork(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """Fork at a token: POST `index` (the token) and `choice` (its alternative)."""
    message = _reply_for_user(request, code, reply)
    conversation = message.conversation
    try:
        index = _int_param(request.POST.get("index"), "index")
        choice = _int_param(request.POST.get("choice"), "choice")
        if index is None or choice is None:
            raise ChatError("Choose a token and one of its alternatives.")
        provenance.reply_fork(
            conversation=conversation, message_code=str(reply), index=index, choice=choice
        )
    except ChatError as e:
        messages.error(request, str(e))
    return _back(request, conversation)


@require_GET
@login_required
def reply_replay_form(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """The "replay with..." form: a model and/or a preset."""
    message = _reply_for_user(request, code, reply)
    models, presets = provenance.replay_choices(message.conversation)
    context = {
        "conversation": message.conversation,
        "message": message,
        "models": models,
        "presets": presets,
    }
    return _render(request, "chat/reply_replay.html", context)


@require_POST
@login_required
def reply_replay(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """Replay the turn with POST `model` and/or `preset`, as a new version."""
    message = _reply_for_user(request, code, reply)
    conversation = message.conversation
    model_id = request.POST.get("model", "").strip()[:100]
    preset = request.POST.get("preset", "").strip()[:100]
    try:
        provenance.reply_replay(
            conversation=conversation, message_code=str(reply), model_id=model_id, preset=preset
        )
    except ChatError as e:
        messages.error(request, str(e))
    return _back(request, conversation)


@require_GET
@login_required
def reply_compare(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    """Two versions of a turn side by side: this reply and `?with=<code>` (another version;
    default: the one before it, or after it for the first)."""
    message = _reply_for_user(request, code, reply)
    conversation = message.conversation
    try:
        versions = provenance.versions_of(conversation, str(reply))
    except ChatError as e:
        raise Http404(str(e)) from e
    codes = [str(v.code) for v in versions]
    here = codes.index(str(message.code))
    other_code = request.GET.get("with", "")
    if other_code:
        if other_code not in codes or other_code == str(message.code):
            return HttpResponse(
                "Compare with another version of the same turn.",
                status=400,
                content_type="text/plain; charset=utf-8",
            )
        other = versions[codes.index(other_code)]
    elif len(versions) > 1:
        other = versions[here - 1] if here > 0 else versions[1]
    else:
        other = None
    left, right = (message, other) if other is None or other.pk > message.pk else (other, message)
    columns = [
        {
            "message": m,
            "number": codes.index(str(m.code)) + 1,
            "rows": provenance.provenance_rows(m.generation) if m.generation else [],
        }
        for m in (left, right)
        if m is not None
    ]
    context = {
        "conversation": conversation,
        "message": message,
        "versions": versions,
        "columns": columns,
    }
    return render(request, "chat/reply_compare.html", context)
