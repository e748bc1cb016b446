"""Authentication and errors shared by the OpenAI and Ollama APIs (django-ninja)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.security import HttpBearer
from pydantic import ValidationError

from inference.api import services
from inference.api.errors import ApiError, describe_validation

logger = logging.getLogger(__name__)

ErrorRenderer = Callable[[ApiError], dict[str, Any]]


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer <key>`: the key's owner is who the request acts as.

    Also counts the request against the key's requests per minute (429 past it). The browser
    session is never looked at.
    """

    async def __call__(self, request: HttpRequest) -> services.ApiCaller | None:  # type: ignore[override]
        caller = await database_sync_to_async(services.api_caller)(request)
        if caller is None:
            return None
        retry_after = services.request_admit(caller=caller)
        if retry_after is not None:
            raise ApiError(
                429,
                "Too many requests for this API key; try again in a minute.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        return caller

    def authenticate(self, request: HttpRequest, token: str) -> Any:  # pragma: no cover
        raise NotImplementedError("ApiKeyAuth authenticates in __call__")


def caller_of(request: HttpRequest) -> services.ApiCaller:
    caller = getattr(request, "auth", None)
    assert isinstance(caller, services.ApiCaller), "the view is not behind ApiKeyAuth"
    return caller


def error_response(error: ApiError, body: dict[str, Any]) -> HttpResponse:
    response = JsonResponse(body, status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def _param_of_loc(loc: list[Any]) -> list[str]:
    # ninja's locations start with where the value came from and the view's argument name:
    # ["body", "body", "temperature"] is the request's `temperature`.
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        return parts[2:]
    return parts[1:]


def install_error_handlers(api: NinjaAPI, render: ErrorRenderer) -> None:
    """Every failure of `api`'s views answered with `render`'s body and the right status."""

    def on_api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
        return error_response(exc, render(exc))

    def on_validation(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
        first = exc.errors[0] if exc.errors else {"loc": [], "msg": "invalid request"}
        parts = _param_of_loc(list(first.get("loc", [])))
        param = ".".join(parts) or None
        message = str(first.get("msg", "invalid value"))
        text = f"{param}: {message}" if param else f"Invalid request: {message}"
        return on_api_error(request, ApiError(400, text, param=param))

    def on_pydantic(request: HttpRequest, exc: ValidationError) -> HttpResponse:
        return on_api_error(request, describe_validation(exc))

    def on_auth(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
        error = ApiError(
            401,
            "A valid API key is needed: send `Authorization: Bearer <key>` "
            "(keys are made on the settings page, /settings/keys/).",
            code="invalid_api_key",
        )
        return on_api_error(request, error)

    def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
        return on_api_error(request, ApiError(exc.status_code, str(exc.message)))

    def on_other(request: HttpRequest, exc: Exception) -> HttpResponse:
        logger.exception("API request to %s failed", request.path)
        return on_api_error(request, ApiError(500, "The server failed to answer the request."))

    handlers: list[tuple[type[Exception], Any]] = [
        (ApiError, on_api_error),
        (NinjaValidationError, on_validation),
        (ValidationError, on_pydantic),
        (AuthenticationError, on_auth),
        (HttpError, on_http_error),
        (Exception, on_other),
    ]
    for exception, handler in handlers:
        api.add_exception_handler(exception, handler)
