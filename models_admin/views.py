"""The Models page (staff only). Thin: validate, call models_admin.services, render or redirect."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import F
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRefresh
from django_htmx.middleware import HtmxDetails

from inference import services as inference
from models_admin import services
from models_admin.forms import (
    ConvertForm,
    DeleteForm,
    ExportGGUFForm,
    ImportGGUFForm,
    PullForm,
    QuantizeForm,
    ValidateForm,
)
from models_admin.models import LibraryModel, ModelJob
from models_admin.uploads import GGUFUploadHandler

View = Callable[..., HttpResponse]
RECENT_JOBS = 5
# A multipart body is a little larger than the file in it (boundaries, the other fields).
UPLOAD_OVERHEAD_BYTES = 64 * 1024

SORTS: dict[str, tuple[str, Any]] = {
    "name": ("name", F("name").asc()),
    "size": ("largest first", F("size_bytes").desc()),
    "-size": ("smallest first", F("size_bytes").asc()),
    "last_used": ("recently used first", F("last_used_at").desc(nulls_last=True)),
    "-last_used": ("least recently used first", F("last_used_at").asc(nulls_first=True)),
}


class HtmxRequest(HttpRequest):
    """A request that went through django-htmx's middleware."""

    htmx: HtmxDetails


def staff_required(view: View) -> View:
    """Anonymous people go to the login page; signed-in people who are not staff get 403."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not (request.user.is_active and request.user.is_staff):
            raise PermissionDenied("The model library is for staff.")
        return view(request, *args, **kwargs)

    return wrapper


def _get_library_model(code: UUID) -> LibraryModel:
    return get_object_or_404(LibraryModel, code=code)


def _get_job(code: UUID) -> ModelJob:
    return get_object_or_404(ModelJob, code=code)


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """Every model on the machine, filterable and sortable, with the jobs and a pull form; for
    people who are not staff, the models they may chat with and why one is unavailable."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if not (request.user.is_active and request.user.is_staff):
        return _catalogue(request)
    services.job_reap_dead()
    services.library_scan()
    everything = LibraryModel.objects.all()
    query = request.GET.get("q", "").strip()[:200]
    sort = request.GET.get("sort", "name")
    if sort not in SORTS:
        sort = "name"
    shown = everything
    if query:
        shown = shown.filter(name__icontains=query) | shown.filter(path__icontains=query)
        shown = shown | everything.filter(architecture__icontains=query)
        shown = shown | everything.filter(model_id__icontains=query)
    entries = list(shown.distinct().order_by(SORTS[sort][1], "name"))
    validations = services.library_validations(entries=entries)
    rows = [
        (
            m,
            validations.get(m.path),
            m.is_mlx and services.library_source_record(path=m.path) is not None,
        )
        for m in entries
    ]
    # Every unfinished job, then the latest few that ended; the admin lists them all.
    active = list(ModelJob.objects.filter(state__in=ModelJob.ACTIVE_STATES))
    ended = list(ModelJob.objects.exclude(state__in=ModelJob.ACTIVE_STATES)[:RECENT_JOBS])
    jobs = active + ended
    context = {
        "models": entries,
        "rows": rows,
        "query": query,
        "sort": sort,
        "sorts": [(key, label) for key, (label, _) in SORTS.items()],
        "total_bytes": sum(m.size_bytes for m in everything),
        "total_count": everything.count(),
        "shown_bytes": sum(m.size_bytes for m in entries),
        "jobs": jobs,
        "pull_form": PullForm(),
        "import_form": ImportGGUFForm(),
        "exportable_types": services.EXPORTABLE_MODEL_TYPES,
        "import_roots": services.import_roots(),
        "max_upload_bytes": settings.MLXWEB_MAX_UPLOAD_BYTES,
        # What the inference workers hold in memory, and the jobs sharing the budget.
        "memory": services.memory_overview(),
        "adapters": services.adapter_list(),
    }
    return render(request, "models_admin/index.html", context)


def _catalogue(request: HttpRequest) -> HttpResponse:
    """The models of this server as anyone signed in sees them: read-only, each with what it
    is for and, when it cannot answer, why; the library's actions stay with staff."""
    rows = [
        {
            "id": spec.id,
            "name": spec.name,
            "task": "embeddings" if spec.task == "embed" else "chat",
            "context_length": spec.context_length,
            "base_id": spec.base_id,
            "reason": spec.unavailable_reason(),
        }
        for spec in inference.model_list()
    ]
    return render(request, "models_admin/catalogue.html", {"rows": rows})


def _start(request: HttpRequest, kind: str, params: dict[str, Any]) -> HttpResponse:
    job = services.job_create(kind=kind, params=params, user=request.user)
    messages.success(request, f"Started: {job.title}.")
    return redirect("models_admin:job_detail", code=job.code)


def _form_page(
    request: HttpRequest,
    form: Any,
    *,
    title: str,
    action: str,
    entry: LibraryModel | None,
    status: int | None = None,
    **extra: Any,
) -> HttpResponse:
    if status is None:
        status = 400 if form.is_bound else 200
    context = {"form": form, "title": title, "action": action, "entry": entry, **extra}
    return render(request, "models_admin/job_form.html", context, status=status)


@require_http_methods(["GET", "POST"])
@staff_required
def pull(request: HttpRequest) -> HttpResponse:
    form = PullForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        return _start(request, "pull", form.job_params())
    return _form_page(
        request, form, title="Pull from the Hugging Face hub", action=request.path, entry=None
    )


@require_http_methods(["GET", "POST"])
@staff_required
def convert(request: HttpRequest, code: UUID) -> HttpResponse:
    entry = _get_library_model(code)
    data = {**request.POST.dict(), "source": str(entry.code)} if request.method == "POST" else None
    form = ConvertForm(data, initial={"source": str(entry.code)})
    if data is not None and form.is_valid():
        return _start(request, "convert", form.job_params())
    return _form_page(
        request, form, title=f"Convert {entry.name} to MLX", action=request.path, entry=entry
    )


@require_http_methods(["GET", "POST"])
@staff_required
def quantize(request: HttpRequest, code: UUID) -> HttpResponse:
    entry = _get_library_model(code)
    data = {**request.POST.dict(), "source": str(entry.code)} if request.method == "POST" else None
    form = QuantizeForm(data, initial={"source": str(entry.code)})
    if data is not None and form.is_valid():
        return _start(request, "quantize", form.job_params())
    return _form_page(
        request, form, title=f"Quantize {entry.name}", action=request.path, entry=entry
    )


@csrf_exempt
@require_http_methods(["GET", "POST"])
@staff_required
def import_gguf(request: HttpRequest) -> HttpResponse:
    """GET: the import form (`?path=` fills the path in); POST: start the import of a path or
    of an upload.

    CSRF-exempt only until the upload handler is installed: `_import_gguf` checks CSRF itself,
    since the check reads the body and the handler must be in place before that.
    """
    if request.method != "POST":
        form = ImportGGUFForm(initial={"path": request.GET.get("path", "")[:1000]})
        return _import_page(request, form, status=200)
    limit = settings.MLXWEB_MAX_UPLOAD_BYTES
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + UPLOAD_OVERHEAD_BYTES:
        # Refused before the body is parsed: nothing is written.
        problem = (
            f"The upload is {filesizeformat(length)}, larger than the upload limit "
            f"({filesizeformat(limit)}, library.max_upload_bytes in configs/server.yaml): "
            "put the file in a folder GGUF files may be imported from and give its path."
        )
        return _import_page(request, ImportGGUFForm(), status=413, problems=[problem])
    handler = GGUFUploadHandler(request, directory=services.upload_dir(), max_bytes=limit)
    request.upload_handlers = [handler]
    try:
        return _import_gguf(request, handler)
    finally:
        handler.discard()


@csrf_protect
def _import_gguf(request: HttpRequest, handler: GGUFUploadHandler) -> HttpResponse:
    form = ImportGGUFForm(request.POST, request.FILES)
    valid = form.is_valid()
    if handler.problem:
        code = "too_large" if handler.too_large else "invalid"
        form.add_error("upload", ValidationError(handler.problem, code=code))
        valid = False
    if not valid:
        status = 413 if form.has_error("upload", "too_large") else 400
        return _import_page(request, form, status=status)
    upload = form.cleaned_data["upload"]
    if upload is None:
        params = form.job_params()
    else:
        upload.close()
        source, uploaded_as = services.upload_accept(
            path=upload.path, file_name=upload.name, keep=form.cleaned_data["keep_upload"]
        )
        handler.claim()
        params = form.job_params(source=source, uploaded_as=uploaded_as)
    return _start(request, "import_gguf", params)


def _import_page(
    request: HttpRequest, form: ImportGGUFForm, *, status: int, problems: list[str] | None = None
) -> HttpResponse:
    return _form_page(
        request,
        form,
        title="Import a GGUF",
        action=request.path,
        entry=None,
        status=status,
        multipart=True,
        import_roots=services.import_roots(),
        max_upload_bytes=settings.MLXWEB_MAX_UPLOAD_BYTES,
        problems=problems or [],
    )


@require_http_methods(["GET", "POST"])
@staff_required
def validate(request: HttpRequest, code: UUID) -> HttpResponse:
    entry = _get_library_model(code)
    data = {**request.POST.dict(), "source": str(entry.code)} if request.method == "POST" else None
    form = ValidateForm(data, initial={"source": str(entry.code)})
    if data is not None and form.is_valid():
        return _start(request, "validate", form.job_params())
    record = services.library_source_record(path=entry.path)
    return _form_page(
        request,
        form,
        title=f"Validate {entry.name}",
        action=request.path,
        entry=entry,
        record=record,
    )


@require_http_methods(["GET", "POST"])
@staff_required
def export_gguf(request: HttpRequest, code: UUID) -> HttpResponse:
    """GET: the export form (type and file name); POST: start the export job."""
    entry = _get_library_model(code)
    data = {**request.POST.dict(), "source": str(entry.code)} if request.method == "POST" else None
    initial = {
        "source": str(entry.code),
        "path": services.gguf_export_default_name(entry.name, "q8_0"),
    }
    form = ExportGGUFForm(data, initial=initial)
    if data is not None and form.is_valid():
        return _start(request, "export_gguf", form.job_params())
    return _form_page(
        request, form, title=f"Export {entry.name} to GGUF", action=request.path, entry=entry
    )


@require_http_methods(["GET", "POST"])
@staff_required
def delete(request: HttpRequest, code: UUID) -> HttpResponse:
    """GET: what deleting would free, and a confirmation; POST: start the delete job."""
    entry = _get_library_model(code)
    if request.method == "POST":
        form = DeleteForm({"source": str(entry.code)})
        if form.is_valid():
            return _start(request, "delete", form.job_params())
        errors = form.errors.get("source") or ["Cannot delete this model."]
        messages.error(request, " ".join(str(e) for e in errors))
        return redirect("models_admin:index")
    try:
        preview = services.library_delete_preview(entry=entry)
    except services.PathRefused as e:
        messages.error(request, str(e))
        return redirect("models_admin:index")
    return render(request, "models_admin/delete_confirm.html", {"entry": entry, "preview": preview})


@require_GET
@staff_required
def job_detail(request: HttpRequest, code: UUID) -> HttpResponse:
    job = _get_job(code)
    if job.state == ModelJob.State.RUNNING:
        services.job_reap_dead()
        job.refresh_from_db()
    return render(request, "models_admin/job_detail.html", {"job": job, "detail": True})


@require_GET
@staff_required
def memory_panel(request: HttpRequest) -> HttpResponse:
    """The "In memory" fragment of the Models page; htmx polls it every 5 s."""
    context = {"memory": services.memory_overview()}
    return render(request, "models_admin/index.html#memory-panel", context)


@require_GET
@staff_required
def job_progress(request: HtmxRequest, code: UUID) -> HttpResponse:
    """The job's progress fragment; htmx polls it every second until the job ends."""
    job = _get_job(code)
    if job.state == ModelJob.State.RUNNING:
        services.job_reap_dead()
        job.refresh_from_db()
    # ?detail=1: the job page's fragment, with the log and without the title.
    detail = request.GET.get("detail") == "1"
    if detail and not job.is_active and request.htmx:
        # The job page shows the outcome (result, quality card) outside this fragment: the
        # poll that sees the job end reloads the page once.
        return HttpResponseClientRefresh()
    context = {"job": job, "detail": detail}
    return render(request, "models_admin/job_detail.html#job-progress", context)


@require_POST
@staff_required
def job_cancel(request: HttpRequest, code: UUID) -> HttpResponse:
    job = services.job_cancel(job=_get_job(code))
    return redirect("models_admin:job_detail", code=job.code)


@require_POST
@staff_required
def job_retry(request: HttpRequest, code: UUID) -> HttpResponse:
    job = _get_job(code)
    try:
        retry = services.job_retry(job=job, user=request.user)
    except services.JobStateError as e:
        messages.error(request, str(e))
        return redirect("models_admin:job_detail", code=job.code)
    messages.success(request, f"Retrying: {retry.title}.")
    return redirect("models_admin:job_detail", code=retry.code)
