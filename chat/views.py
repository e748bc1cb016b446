"""Chat pages. Thin: validate, call chat.services, render or redirect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login as auth_login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.db import transaction
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseBase,
    HttpResponseForbidden,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect
from django_htmx.middleware import HtmxDetails
from pydantic import ValidationError

from chat import branch_frames, frames, services
from chat import presets as chat_presets
from chat.branches import branch_action
from chat.forms import RenameForm, SignupForm
from chat.models import Conversation, ToolStep
from chat.schemas import BranchAction, SendMessage, describe_error, parse_message
from inference import services as inference
from inference.catalogue import UnknownModel


class SignedInRequest(HttpRequest):
    """What a view behind @login_required gets: a signed-in user, and django-htmx's details."""

    user: User
    htmx: HtmxDetails


def _get_conversation_for_user(request: SignedInRequest, code: UUID) -> Conversation:
    """The user's own conversation, or 404 for anyone else's."""
    return get_object_or_404(Conversation, code=code, user=request.user)


def _page_context(request: SignedInRequest, conversation: Conversation | None) -> dict[str, Any]:
    # Titles that finished while no tab of their conversation was open.
    services.titles_apply_pending(user=request.user)
    if conversation is not None:
        conversation.refresh_from_db(fields=["title", "leaf"])
    conversations = Conversation.objects.filter(user=request.user)
    path = services.conversation_path(conversation) if conversation is not None else []
    showing = _message_code(request.GET.get("m"))
    if request.GET.get("all"):
        chat_messages, earlier = path, 0
    else:
        chat_messages, earlier = services.path_window(path, showing=showing)
    return {
        "conversation": conversation,
        "conversations": conversations,
        "chat_messages": chat_messages,
        "earlier_count": earlier,
        "models": frames.model_choices(),
        "selected_model": conversation.model_id if conversation else inference.default_model_id(),
        "ws_max_message_bytes": settings.MLXWEB_CONFIG.server.limits.ws_max_message_bytes,
    }


@require_GET
@login_required
def index(request: SignedInRequest) -> HttpResponse:
    """A new chat: the first message creates the conversation."""
    return render(request, "chat/conversation.html", _page_context(request, None))


@require_GET
@login_required
def conversation_detail(request: SignedInRequest, code: UUID) -> HttpResponse:
    """The conversation; `?m=<message code>` (a search hit's link) shows the branch that holds
    that message and marks it to scroll to."""
    conversation = _get_conversation_for_user(request, code)
    scroll_to = None
    if "m" in request.GET:
        try:
            # The branch shown is the conversation's, so the next turn goes where it is seen.
            leaf_before = conversation.leaf_id
            leaf = services.branch_switch(
                conversation=conversation, message_code=request.GET["m"]
            )
            scroll_to = UUID(request.GET["m"])
            if leaf.pk != leaf_before:
                branch_frames.branch_broadcast(conversation=conversation)
        except services.ChatError as e:
            messages.error(request, str(e))
    context = _page_context(request, conversation)
    context["scroll_to"] = scroll_to
    inference.generation_warm(replies=[m.generation for m in context["chat_messages"]])
    return render(request, "chat/conversation.html", context)


def _message_code(value: str | None) -> UUID | None:
    try:
        return UUID(value) if value else None
    except ValueError:
        return None


@require_GET
@login_required
def conversation_earlier(request: SignedInRequest, code: UUID) -> HttpResponse:
    """The messages of the branch shown before `?before=<message code>` (a page asks as its
    reader scrolls up), with the marker that loads the ones before those."""
    conversation = _get_conversation_for_user(request, code)
    before = _message_code(request.GET.get("before"))
    if before is None:
        return HttpResponseBadRequest("?before= takes a message code")
    path = services.conversation_path(conversation)
    try:
        chat_messages, earlier = services.path_window(path, before=before)
    except services.ChatError as e:
        raise Http404(str(e)) from e
    return render(
        request,
        "chat/parts/earlier_messages.html",
        {"conversation": conversation, "chat_messages": chat_messages, "earlier_count": earlier},
    )


def _send(request: SignedInRequest, conversation: Conversation) -> bool:
    """Send the posted composer, the same fields and checks as over the websocket."""
    try:
        # "preset" is the new chat's, already applied (chat.views_presets.new_chat_settings).
        fields = {k: v for k, v in request.POST.dict().items() if k != "preset"}
        message = parse_message({**fields, "type": "send"})
        assert isinstance(message, SendMessage)
        services.message_send(
            conversation=conversation,
            text=message.text,
            model_id=message.model,
            params=message.sampling(),
            tools=message.tools_enabled,
        )
        # The composer's options stick to the conversation (chat.presets).
        chat_presets.conversation_keep_options(conversation=conversation, message=message)
    except ValidationError as e:
        messages.error(request, f"Invalid message: {describe_error(e)}")
    except services.ChatError as e:
        messages.error(request, str(e))
    except UnknownModel:
        messages.error(request, f"Unknown model {request.POST.get('model')!r}.")
    else:
        return True
    return False


@require_POST
@login_required
def conversation_create(request: SignedInRequest) -> HttpResponse:
    """Start a conversation; with text, its first message is sent at once."""
    model = request.POST.get("model") or None
    try:
        with transaction.atomic():
            conversation = services.conversation_create(user=request.user, model_id=model)
    except UnknownModel:
        messages.error(request, f"Unknown model {model!r}.")
        return redirect("chat:index")
    # The composer's preset and options stick to the new conversation. (chat.views_presets
    # imports this module, hence the import here.)
    from chat import views_presets

    views_presets.new_chat_settings(request, conversation)
    if request.POST.get("text", "").strip():
        _send(request, conversation)
    return redirect("chat:detail", code=conversation.code)


@require_POST
@login_required
def conversation_send(request: SignedInRequest, code: UUID) -> HttpResponse:
    """The composer without websockets: send, then show the page (the reply streams there)."""
    conversation = _get_conversation_for_user(request, code)
    _send(request, conversation)
    return redirect("chat:detail", code=conversation.code)


@require_POST
@login_required
def reply_stop(request: SignedInRequest, code: UUID, reply: UUID) -> HttpResponse:
    conversation = _get_conversation_for_user(request, code)
    try:
        services.reply_stop(conversation=conversation, reply_code=str(reply))
    except services.ChatError as e:
        messages.error(request, str(e))
    return redirect("chat:detail", code=conversation.code)


@require_POST
@login_required
def tool_decide(request: SignedInRequest, code: UUID, step: UUID) -> HttpResponse:
    """Approve / Deny without the socket; the call runs when the page's socket connects."""
    conversation = _get_conversation_for_user(request, code)
    decision = request.POST.get("decision", "")
    if decision not in ("approve", "deny", "always"):
        messages.error(request, "Choose approve, deny or always.")
    else:
        try:
            services.tool_step_decide(
                conversation=conversation, step_code=str(step), decision=decision
            )
        except services.ChatError as e:
            messages.error(request, str(e))
    return redirect("chat:detail", code=conversation.code)


# Shown inline: raster formats only (an SVG can carry script). Keep in step with the
# tool-steps partial, which shows these as <img>.
INLINE_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def _tool_step_file(step: ToolStep, index: int) -> tuple[Path, str, str]:
    """The step's `index`th file as (path, name, mime), or 404 unless it is a regular file
    inside the conversation's workspace once links are resolved (sandboxed code writes there,
    so a file may be a symlink pointing anywhere)."""
    files = step.files if isinstance(step.files, list) else []
    if not 0 <= index < len(files) or not isinstance(files[index], dict):
        raise Http404("No such file.")
    record = files[index]
    workspace = services.workspace_for(step.message.conversation).resolve()
    try:
        path = Path(str(record.get("path", ""))).resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise Http404("No such file.") from e
    if not path.is_relative_to(workspace) or not path.is_file():
        raise Http404("No such file.")
    name = Path(str(record.get("name") or path.name)).name or "file"
    return path, name, str(record.get("mime", ""))


@require_GET
@login_required
def tool_file(request: SignedInRequest, code: UUID, step: UUID, index: int) -> FileResponse:
    """A file a tool call made (a screenshot, a plot), addressed by its step and its place in
    the step's list, never by a path. Raster images show inline; anything else downloads."""
    conversation = _get_conversation_for_user(request, code)
    tool_step = get_object_or_404(ToolStep, code=step, message__conversation=conversation)
    path, name, mime = _tool_step_file(tool_step, index)
    inline = mime in INLINE_IMAGE_TYPES
    response = FileResponse(
        path.open("rb"),
        as_attachment=not inline,
        filename=name,
        content_type=mime if inline else "application/octet-stream",
    )
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, max-age=3600"
    return response


@require_POST
@login_required
def conversation_rename(request: SignedInRequest, code: UUID) -> HttpResponse:
    conversation = _get_conversation_for_user(request, code)
    form = RenameForm(request.POST)
    if form.is_valid():
        services.conversation_rename(conversation=conversation, title=form.cleaned_data["title"])
    else:
        messages.error(request, "A title needs 1 to 200 characters.")
    if request.htmx:
        context = _page_context(request, conversation)
        return render(request, "chat/conversation.html#sidebar", context)
    return redirect("chat:detail", code=conversation.code)


@require_http_methods(["GET", "POST"])
@login_required
def conversation_delete(request: SignedInRequest, code: UUID) -> HttpResponse:
    """GET asks for confirmation; POST deletes."""
    conversation = _get_conversation_for_user(request, code)
    if request.method == "GET":
        return render(
            request,
            "chat/conversation_delete.html",
            {"conversation": conversation, "message_count": conversation.messages.count()},
        )
    services.conversation_delete(conversation=conversation)
    messages.success(request, f"Deleted “{conversation.title}”.")
    if request.htmx:
        return HttpResponseClientRedirect("/")
    return redirect("chat:index")


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """Create an account. The first account becomes the admin; later ones need allow_signup
    (off by default: the admin creates accounts)."""
    first = not User.objects.exists()
    if not first and not settings.MLXWEB_ALLOW_SIGNUP:
        return HttpResponseForbidden(render(request, "registration/signup_closed.html").content)
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            user = form.save(commit=False)
            # Decided inside the transaction so two racing first sign-ups can't both be admin.
            if not User.objects.select_for_update().exists():
                user.is_staff = user.is_superuser = True
            user.save()
        # The password was just set, so no backend authenticated this user: name the one that
        # will load it on later requests (axes' backend only counts failures).
        auth_login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat:index")
    return render(request, "registration/signup.html", {"form": form, "first": first})


def login(request: HttpRequest) -> HttpResponseBase:
    """Sign in; on a fresh install there is nobody to sign in as, so go create the admin."""
    if not User.objects.exists():
        return redirect("signup")
    return auth_views.LoginView.as_view(
        extra_context={"allow_signup": settings.MLXWEB_ALLOW_SIGNUP}
    )(request)


def _branch_post(request: SignedInRequest, code: UUID, fields: dict[str, str]) -> HttpResponse:
    """A branch action's form without the socket: the same schema and service as over it,
    then the conversation (or the fork) is shown; a bad value is a message on the page."""
    conversation = _get_conversation_for_user(request, code)
    values: dict[str, Any] = {**request.POST.dict(), **fields}
    try:
        action = cast("BranchAction", parse_message(values))  # `fields` name the type
        outcome = branch_action(conversation=conversation, action=action)
    except ValidationError as e:
        messages.error(request, f"Invalid request: {describe_error(e)}")
    except services.ChatError as e:
        messages.error(request, str(e))
    except UnknownModel:
        messages.error(request, f"Unknown model {request.POST.get('model')!r}.")
    else:
        # Tabs with a socket open on this conversation follow, as they do for socket actions.
        branch_frames.branch_broadcast(
            conversation=conversation, messages=outcome.kind == "messages"
        )
        if outcome.location:
            return redirect(outcome.location)
    return redirect("chat:detail", code=conversation.code)


def _message_action(kind: str) -> Callable[..., HttpResponse]:
    """The form view of the branch action `kind` ("regenerate", "edit", ...) on the message in
    the URL: `_branch_post` with the action's type and the message's code."""

    @require_POST
    @login_required
    def view(request: SignedInRequest, code: UUID, message: UUID) -> HttpResponse:
        return _branch_post(request, code, {"type": kind, "message": str(message)})

    return view


message_regenerate = _message_action("regenerate")
message_continue = _message_action("continue")
branch_switch = _message_action("switch")
message_edit = _message_action("edit")
# The delete form is inside a disclosure that asks first; without it nothing is sent.
message_delete = _message_action("delete")
conversation_fork = _message_action("fork")


@require_POST
@login_required
def conversation_pin(request: SignedInRequest, code: UUID) -> HttpResponse:
    return _branch_post(request, code, {"type": "pin"})
