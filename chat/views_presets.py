"""Presets pages, a conversation's settings panel and the composer's meter (issue 9).

Thin views over chat.presets and chat.meter: each user sees and changes only their own
presets and conversations (404 for anyone else's); forms post with CSRF; a bad value comes
back next to its field with the allowed range.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from chat import frames, meter
from chat import presets as chat_presets
from chat.forms import PresetForm, SettingsForm
from chat.models import Conversation
from chat.models import Preset as PresetRow
from chat.views import SignedInRequest, _get_conversation_for_user
from inference.presets import SAMPLING_FIELDS


def _get_preset_for_user(request: SignedInRequest, name: str) -> PresetRow:
    """The user's own preset by name, or 404 (built-ins are not edited here)."""
    return get_object_or_404(PresetRow, user=request.user, name=name)


# --- the presets page ------------------------------------------------------------------------


@require_GET
@login_required
def preset_list(request: SignedInRequest) -> HttpResponse:
    presets = chat_presets.Presets(request.user)
    return render(
        request,
        "chat/presets.html",
        {"listing": presets.listing(), "own": set(presets.rows), "problem": presets.problem},
    )


def _preset_form(
    request: SignedInRequest, row: PresetRow | None, data: Any = None, initial: Any = None
) -> PresetForm:
    presets = chat_presets.Presets(request.user)
    models = [(m["id"], m["name"]) for m in frames.model_choices()]
    return PresetForm(
        data,
        initial=initial,
        preset_names=presets.names(),
        builtin_names=list(presets.builtins),
        models=models,
        current_name=row.name if row is not None else "",
    )


def _row_initial(row: PresetRow) -> dict[str, Any]:
    initial: dict[str, Any] = {
        "name": row.name,
        "description": row.description,
        "extends": row.extends,
        "system_prompt": row.system_prompt,
        "model_id": row.model_id,
        "tools": "" if row.tools is None else ("on" if row.tools else "off"),
    }
    for name, value in (row.params or {}).items():
        initial[name] = "\n".join(value) if name == "stop" and isinstance(value, list) else value
    return initial


def _save_preset(request: SignedInRequest, row: PresetRow | None) -> HttpResponse:
    form = _preset_form(request, row, data=request.POST)
    if form.is_valid():
        values = {
            "name": form.cleaned_data["name"],
            "description": form.cleaned_data["description"],
            "extends": form.cleaned_data["extends"],
            "system_prompt": form.cleaned_data["system_prompt"],
            "params": form.cleaned_data["params"],
            "model_id": form.cleaned_data["model_id"],
            "tools": form.cleaned_data["tools"],
        }
        try:
            saved = chat_presets.preset_save(user=request.user, row=row, values=values)
        except chat_presets.SettingsError as e:
            form.add_error(e.field if e.field in form.fields else None, str(e))
        else:
            messages.success(request, f"Saved the preset “{saved.name}”.")
            return redirect("chat:presets")
    return render(request, "chat/presets_form.html", {"form": form, "row": row}, status=400)


@require_http_methods(["GET", "POST"])
@login_required
def preset_create(request: SignedInRequest) -> HttpResponse:
    """A new preset; `?extends=<name>` starts it from another (the list's "Extend")."""
    if request.method == "POST":
        return _save_preset(request, None)
    initial = {"extends": request.GET.get("extends", "")}
    form = _preset_form(request, None, initial=initial)
    return render(request, "chat/presets_form.html", {"form": form, "row": None})


@require_http_methods(["GET", "POST"])
@login_required
def preset_edit(request: SignedInRequest, name: str) -> HttpResponse:
    row = _get_preset_for_user(request, name)
    if request.method == "POST":
        return _save_preset(request, row)
    form = _preset_form(request, row, initial=_row_initial(row))
    return render(request, "chat/presets_form.html", {"form": form, "row": row})


@require_http_methods(["GET", "POST"])
@login_required
def preset_delete(request: SignedInRequest, name: str) -> HttpResponse:
    """GET asks for confirmation; POST deletes (unless another preset extends it)."""
    row = _get_preset_for_user(request, name)
    if request.method == "GET":
        return render(request, "chat/presets_delete.html", {"row": row})
    try:
        chat_presets.preset_delete(row=row)
    except chat_presets.SettingsError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"Deleted the preset “{name}”.")
    return redirect("chat:presets")


# --- a conversation's settings panel ---------------------------------------------------------


def settings_form(
    conversation: Conversation, data: Any = None
) -> tuple[SettingsForm, chat_presets.ConversationSettings]:
    """The side panel's form: the conversation's own values, and as placeholders what applies
    when a field is blank (the preset's value or the model's default)."""
    current = chat_presets.conversation_settings(conversation)
    initial: dict[str, Any] = {
        "preset": conversation.preset,
        "system_prompt": conversation.system_prompt,
        "tools": "on" if conversation.tools_enabled else "off",
    }
    for name, value in (conversation.params or {}).items():
        if name in SAMPLING_FIELDS:
            initial[name] = "\n".join(value) if isinstance(value, list) else value
    form = SettingsForm(
        data,
        # Prefixed: the composer on the same page has fields of the same names.
        prefix="settings",
        initial=initial,
        inherited={name: source.value for name, source in current.inherited.items()},
        preset_names=chat_presets.Presets(conversation.user).names(),
        system_placeholder=current.system_prompt if not conversation.system_prompt else "",
    )
    return form, current


def panel_context(conversation: Conversation, form: SettingsForm | None = None) -> dict[str, Any]:
    built, current = settings_form(conversation)
    return {
        "conversation": conversation,
        "settings_form": form or built,
        "settings": current,
    }


@require_http_methods(["GET", "POST"])
@login_required
def conversation_settings(request: SignedInRequest, code: UUID) -> HttpResponse:
    """The side panel: GET shows it alone (no-JS), POST saves it. htmx gets the panel back,
    with the reason next to each bad field; a plain form post is redirected to the chat."""
    conversation = _get_conversation_for_user(request, code)
    if request.method == "GET":
        if request.htmx:  # the page refreshes its panel after a send changed the values
            return render(request, "chat/parts/settings_panel.html", panel_context(conversation))
        return render(request, "chat/presets_settings.html", panel_context(conversation))
    form, _ = settings_form(conversation, data=request.POST)
    status = 200
    if form.is_valid():
        data = form.cleaned_data
        try:
            conversation = chat_presets.conversation_settings_save(
                conversation=conversation,
                preset=data["preset"],
                system_prompt=data["system_prompt"],
                params=data["params"],
                tools=data["tools_enabled"],
            )
        except chat_presets.SettingsError as e:
            form.add_error("preset", str(e))
            status = 400
        else:
            if not request.htmx:
                messages.success(request, "Settings saved.")
                return redirect("chat:detail", code=conversation.code)
            context = panel_context(conversation)
            # The composer's options show the saved values too (an out-of-band swap).
            context["saved"] = context["panel_open"] = context["options_oob"] = True
            return render(request, "chat/parts/settings_panel.html", context)
    else:
        status = 400
    context = {**panel_context(conversation, form), "panel_open": True}
    template = "chat/parts/settings_panel.html" if request.htmx else "chat/presets_settings.html"
    # htmx swaps 4xx answers only when told to; the panel with its errors is the answer.
    response = render(request, template, context, status=200 if request.htmx else status)
    return response


# --- the composer's meter --------------------------------------------------------------------


@require_POST
@login_required
async def conversation_meter(request: SignedInRequest, code: UUID) -> HttpResponse:
    """The context meter and what the prompt cache holds for the next turn, for the text
    typed so far (posted, debounced, by the composer; nothing is saved). Async: it may wait
    for the worker's exact counts (chat.meter.aconversation_meter)."""
    user = await request.auser()
    assert user.pk is not None  # @login_required
    conversation = await Conversation.objects.filter(code=code, user_id=user.pk).afirst()
    if conversation is None:
        raise Http404("No such conversation.")
    text = request.POST.get("text", "")[:100_000]
    model_id = request.POST.get("model", "")[:100]
    reading = await meter.aconversation_meter(conversation, text=text, model_id=model_id)
    html = render_to_string(
        "chat/parts/composer_meter.html", {"meter": reading, "conversation": conversation}
    )
    return HttpResponse(html)


def new_chat_settings(request: SignedInRequest, conversation: Conversation) -> None:
    """The new chat's composer: its preset and options stick to the conversation it starts
    (chat.views.conversation_create calls this before sending the first message). A bad
    value is reported; the message's own check then refuses to send it."""
    form = SettingsForm(
        request.POST,
        inherited={},
        preset_names=chat_presets.Presets(request.user).names(),
    )
    if not form.is_valid():
        for name, errors in form.errors.items():
            label = form.fields[name].label if name in form.fields else "Settings"
            messages.error(request, f"{label}: {' '.join(str(e) for e in errors)}")
        return
    try:
        chat_presets.conversation_start(
            conversation=conversation,
            preset=form.cleaned_data["preset"],
            params=form.cleaned_data["params"],
        )
    except chat_presets.SettingsError as e:
        messages.error(request, str(e))
