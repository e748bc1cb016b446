"""The HTTP side of the Prometheus metrics: requests by route, method and status.

The engine's metrics (tokens, TTFT, queue depth...) live in `inference.metrics`; both are in
prometheus-client's default registry, which `GET /metrics` serves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase
from prometheus_client import Counter

HTTP_REQUESTS = Counter(
    "mlxweb_http_requests",
    "HTTP requests answered, by route pattern, method and status.",
    ["route", "method", "status"],
)


def _route(request: HttpRequest) -> str:
    # The URL pattern, not the path: one series per route however many conversations exist.
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return "/" + str(match.route or "").lstrip("^")


class HttpMetricsMiddleware:
    """Counts every response in `mlxweb_http_requests_total`."""

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
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        self._count(request, response)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        result = await response
        self._count(request, result)
        return result

    @staticmethod
    def _count(request: HttpRequest, response: HttpResponseBase) -> None:
        HTTP_REQUESTS.labels(
            route=_route(request), method=request.method or "", status=str(response.status_code)
        ).inc()
