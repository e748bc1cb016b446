"""Search, export and import pages (issue 9). Thin: validate, call chat.search / chat.transfer."""

from __future__ import annotations

import tempfile
from uuid import UUID

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from chat import search as chat_search
from chat import transfer
from chat.models import Conversation
from chat.views import SignedInRequest

EXPORT_TYPES = {
    "md": ("text/markdown; charset=utf-8", "md"),
    "json": ("application/json", "json"),
}


class ImportForm(forms.Form):
    file = forms.FileField(
        label="Export file",
        help_text="An mlxweb export (.json or .zip) or ChatGPT's conversations.json (or its .zip).",
    )


@require_GET
@login_required
def search(request: SignedInRequest) -> HttpResponse:
    """Search results: the whole page, or (for the sidebar's box, through htmx) the list."""
    query = request.GET.get("q", "").strip()
    results = None
    error = ""
    if query:
        try:
            results = chat_search.search(user=request.user, query=query)
        except chat_search.SearchError as e:
            error = str(e)
    context = {"query": query, "results": results, "error": error}
    if request.htmx:
        return render(request, "chat/search_results.html", context)
    return render(request, "chat/search.html", context)


@require_GET
@login_required
def conversation_export(request: SignedInRequest, code: UUID, kind: str) -> HttpResponse:
    """One conversation as Markdown (the branch shown) or JSON (everything), as a download."""
    if kind not in EXPORT_TYPES:
        raise Http404("No such export format.")
    conversation = get_object_or_404(Conversation, code=code, user=request.user)
    content_type, extension = EXPORT_TYPES[kind]
    if kind == "md":
        body = transfer.conversation_markdown(conversation).encode()
    else:
        body = transfer.conversation_json(conversation)
    response = HttpResponse(body, content_type=content_type)
    filename = transfer.export_filename(conversation, extension)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = "private, no-store"
    return response


@require_GET
@login_required
def export_all(request: SignedInRequest) -> FileResponse:
    """All of the user's conversations as one zip archive."""
    spool = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)  # noqa: SIM115 - the response closes it
    transfer.archive_write(user=request.user, out=spool)
    spool.seek(0)
    response = FileResponse(
        spool,
        as_attachment=True,
        filename=f"mlxweb-conversations-{timezone.now():%Y-%m-%d}.zip",
        content_type="application/zip",
    )
    response["Cache-Control"] = "private, no-store"
    return response


@require_http_methods(["GET", "POST"])
@login_required
def transfer_page(request: SignedInRequest) -> HttpResponse:
    """Export everything, or import a file (ours or ChatGPT's): all of it, or nothing."""
    form = ImportForm()
    status = 200
    if request.method == "POST":
        form = ImportForm(request.POST, request.FILES)
        if form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                if upload.size > transfer.MAX_IMPORT_BYTES:
                    raise transfer.ImportRejected(
                        "The file is too big: at most "
                        f"{transfer.MAX_IMPORT_BYTES // (1024 * 1024)} MiB can be imported."
                    )
                report = transfer.import_file(user=request.user, data=upload.read())
            except transfer.ImportRejected as e:
                form.add_error("file", str(e))
            else:
                messages.success(request, transfer.imported_count(report))
                for note in report.notes:
                    messages.info(request, note)
                if len(report.conversations) == 1:
                    return redirect("chat:detail", code=report.conversations[0].code)
                return redirect("chat:transfer")
        status = 400
    count = Conversation.objects.filter(user=request.user).count()
    context = {
        "form": form,
        "conversation_count": count,
        "max_mib": transfer.MAX_IMPORT_BYTES // (1024 * 1024),
    }
    return render(request, "chat/import.html", context, status=status)
