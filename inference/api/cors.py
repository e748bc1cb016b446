"""CORS for the APIs (/v1 and /api): origins from configs (`api.cors_origins`), nothing else.

Small on purpose: the APIs take a bearer key, never cookies, so credentials are not allowed and
one list of origins is all there is to configure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase

API_PREFIXES = ("/v1/", "/api/")
ALLOW_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-*"
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"


def _allowed_origin(request: HttpRequest) -> str | None:
    if not request.path.startswith(API_PREFIXES):
        return None
    origin = request.headers.get("Origin")
    if not origin:
        return None
    allowed = settings.MLXWEB_CONFIG.server.api.cors_origins
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def _decorate(response: HttpResponseBase, origin: str) -> HttpResponseBase:
    response["Access-Control-Allow-Origin"] = origin
    if origin != "*":
        response["Vary"] = "Origin"
    return response


def _preflight(request: HttpRequest, origin: str) -> HttpResponse:
    response = HttpResponse(status=204)
    _decorate(response, origin)
    response["Access-Control-Allow-Methods"] = ALLOW_METHODS
    response["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", ALLOW_HEADERS
    )
    response["Access-Control-Max-Age"] = "600"
    return response


class ApiCorsMiddleware:
    """Answers preflights and marks API responses for the configured origins."""

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        origin = _allowed_origin(request)
        if origin and request.method == "OPTIONS":
            return _preflight(request, origin)
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return _decorate(response, origin) if origin else response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        origin = _allowed_origin(request)
        if origin and request.method == "OPTIONS":
            return _preflight(request, origin)
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        result = await response
        return _decorate(result, origin) if origin else result
