"""What goes wrong in an API request, said once and rendered in each API's own error shape."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from inference import services as inference
from inference.catalogue import ModelUnavailable, UnknownModel

# OpenAI's error types by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request that gets `status` with `message`; `param` names the parameter at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


class _NeverRaised(Exception):
    pass


# Raised by inference.services once the engine's and the embedding work land (issue 8 contract);
# until then nothing raises them.
GenerationQueueFull: type[Exception] = getattr(inference, "GenerationQueueFull", _NeverRaised)
NotAGenerationModel: type[Exception] = getattr(inference, "NotAGenerationModel", _NeverRaised)
NotAnEmbeddingModel: type[Exception] = getattr(inference, "NotAnEmbeddingModel", _NeverRaised)
EmbeddingInputTooLarge: type[Exception] = getattr(inference, "EmbeddingInputTooLarge", _NeverRaised)
EmbeddingFailed: type[Exception] = getattr(inference, "EmbeddingFailed", _NeverRaised)


def describe_validation(
    error: ValidationError, *, rename: dict[str, str] | None = None
) -> ApiError:
    """A 400 naming the first bad parameter of a pydantic error (as the request spelled it)."""
    rename = rename or {}
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    param = ".".join(loc) if loc else None
    if loc and loc[0] in rename:
        param = ".".join([rename[loc[0]], *loc[1:]])
    message = str(first["msg"])
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def from_service_error(error: Exception, *, model_id: str) -> ApiError | None:
    """The ApiError for an exception of inference.services, or None if it is not one of them."""
    if isinstance(error, UnknownModel):
        return ApiError(
            404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found"
        )
    if isinstance(error, inference.GenerationLimitReached):
        return ApiError(429, str(error), code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(error, GenerationQueueFull):
        return ApiError(
            503,
            str(error) or "The server is busy.",
            code="overloaded",
            headers={"Retry-After": "5"},
        )
    if isinstance(error, NotAGenerationModel | NotAnEmbeddingModel):
        return ApiError(400, str(error), param="model")
    if isinstance(error, EmbeddingInputTooLarge):
        return ApiError(400, str(error), param="input")
    if isinstance(error, ModelUnavailable):
        return ApiError(503, str(error), param="model", headers={"Retry-After": "30"})
    if isinstance(error, EmbeddingFailed):
        return ApiError(503, str(error) or "The embedding failed.", headers={"Retry-After": "5"})
    return None
