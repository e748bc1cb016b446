"""Pages and plain endpoints of the API app: the API keys page, /health and /metrics."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django import forms
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference import services as inference
from inference.api import services
from inference.api.models import ApiKey


class SignedInRequest(HttpRequest):
    user: User


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, strip=True)


def _get_key_for_user(request: SignedInRequest, code: UUID) -> ApiKey:
    return get_object_or_404(ApiKey, code=code, user=request.user)


@require_http_methods(["GET", "POST"])
@login_required
def keys(request: SignedInRequest) -> HttpResponse:
    """The signed-in person's API keys; POST makes one and shows its secret, once."""
    form = ApiKeyForm(request.POST or None)
    secret = None
    created = None
    if request.method == "POST" and form.is_valid():
        created, secret = services.api_key_create(user=request.user, name=form.cleaned_data["name"])
        form = ApiKeyForm()
    context = {
        "form": form,
        "keys": services.api_keys_for(user=request.user),
        "secret": secret,
        "created": created,
    }
    # The page with a secret on it must not linger in a cache.
    response = render(request, "api/keys.html", context, status=400 if form.errors else 200)
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@login_required
def key_revoke(request: SignedInRequest, code: UUID) -> HttpResponse:
    key = _get_key_for_user(request, code)
    services.api_key_revoke(key=key)
    return redirect("api:keys")


def _health() -> dict[str, Any]:
    worker_status = getattr(inference, "worker_status", None)
    if worker_status is None:
        return {"status": "ok", "worker": {"alive": None}, "models": []}
    state = worker_status()
    return {
        "status": "ok" if state.alive else "degraded",
        "worker": {
            "alive": state.alive,
            "id": state.worker_id,
            "queued": state.queued,
            "streaming": state.streaming,
        },
        "models": [
            {
                "id": model.model_id,
                "bytes": model.bytes,
                "loaded_at": model.loaded_at,
                "expires_at": model.expires_at,
            }
            for model in state.loaded
        ],
    }


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness: this process answers; whether the inference worker is alive; loaded models.

    200 while the web process is up (a load balancer's check), with `status` "degraded" when
    the worker's heartbeat is stale.
    """
    return JsonResponse(_health())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics (the default registry: HTTP, engine and embeddings)."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
