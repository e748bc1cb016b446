"""The OpenAI-compatible API under /v1: chat completions, completions, models, embeddings.

Requests are validated into `inference.schemas` (one bounded set of generation options for the
chat, the APIs and the worker) and run on the shared engine through `inference.api.replies`.
Streams are server-sent events; a client that goes away stops its generations.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from channels.db import database_sync_to_async
from django.http import HttpRequest, StreamingHttpResponse
from ninja import NinjaAPI, Schema
from ninja.openapi.docs import Swagger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference import services as inference
from inference.api import server_tools, services
from inference.api.access import ApiKeyAuth, caller_of, install_error_handlers
from inference.api.errors import ApiError, describe_validation, from_service_error
from inference.api.replies import (
    ReplyEvent,
    ReplyStream,
    answer_of,
    reasoning_of,
    tool_calls_of,
)
from inference.catalogue import UnknownModel
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams


class ApiDocs(Swagger):
    """Swagger UI from django-ninja's own static files, with a script file only (strict CSP)."""

    template = "api/docs.html"


api = NinjaAPI(
    title="mlxweb OpenAI-compatible API",
    version="1",
    description=(
        "OpenAI-compatible endpoints on mlxweb's engine. Authenticate with "
        "`Authorization: Bearer <key>` (keys: /settings/keys/)."
    ),
    urls_namespace="openai",
    auth=ApiKeyAuth(),
    docs=ApiDocs(),
    docs_url="/docs",
    openapi_url="/openapi.json",
)
install_error_handlers(api, lambda error: error.openai_body())

ERRORS = frozenset({400, 401, 404, 413, 429, 503})


# --- schemas ---------------------------------------------------------------------------------


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Schema):
    error: ErrorDetail


class TextPart(Schema):
    type: Literal["text"]
    text: str


class FunctionCall(Schema):
    name: str
    arguments: str


class ToolCallIn(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageIn(Schema):
    """A message as OpenAI sends it: content a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionSpec(Schema):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(Schema):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(Schema):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormatIn(BaseModel):
    # A plain pydantic model: ninja's Schema has a `json_schema` attribute of its own.
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingIn(Schema):
    """Options shared by chat completions and completions; bounds are GenerationParams'."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingIn):
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # mlxweb's extension: tools the server runs itself (README, Tools, "Through the API").
    mlxweb_tools: list[str] | None = Field(
        None,
        max_length=64,
        description="Names of this server's tools (e.g. browser_fetch) that the server runs "
        "itself when the model calls them, continuing the reply with their results.",
    )
    mlxweb_allow_mutating: bool = Field(
        False,
        description="Let the server run tools in mlxweb_tools that change things (python, "
        "apply_patch); nobody approves API calls.",
    )


class CompletionRequest(SamplingIn):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ToolCallOut(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFileOut(Schema):
    name: str
    mime: str


class ToolStepOut(Schema):
    """A call the server ran for `mlxweb_tools` (mlxweb's extension)."""

    id: str
    name: str
    arguments: str
    ok: bool
    result: str
    data: dict[str, Any] = {}
    files: list[ToolFileOut] = []


class AssistantMessage(Schema):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    # Only with mlxweb_tools (left out otherwise: the route excludes unset fields).
    mlxweb_tool_steps: list[ToolStepOut] | None = None


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(Schema):
    content: list[TokenLogprob] | None = None


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(Schema):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(Schema):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(Schema):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelOut(Schema):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # mlxweb's additions: what the model does, its name and context length.
    task: str
    name: str
    context_length: int


class ModelList(Schema):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class EmbeddingRequest(Schema):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingOut(Schema):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Schema):
    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


_SSE_DOC = {
    "responses": {
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "string",
                        "description": "With `stream: true`: `data: <chunk JSON>` events, "
                        "then `data: [DONE]`.",
                    }
                }
            }
        }
    }
}


# --- parameters ------------------------------------------------------------------------------

_COPIED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _overrides(body: SamplingIn) -> tuple[dict[str, Any], dict[str, str]]:
    """GenerationParams overrides from the request, and the request's name of each one."""
    values: dict[str, Any] = {name: getattr(body, name) for name in _COPIED}
    names = {name: name for name in values}
    max_tokens = getattr(body, "max_completion_tokens", None)
    names["max_tokens"] = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    values["max_tokens"] = max_tokens if max_tokens is not None else body.max_tokens
    if body.stop is not None:
        values["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if body.logit_bias:
        try:
            values["logit_bias"] = {int(token): bias for token, bias in body.logit_bias.items()}
        except ValueError as e:
            raise ApiError(400, "logit_bias: keys must be token ids", param="logit_bias") from e
    return {k: v for k, v in values.items() if v is not None}, names


def _chat_overrides(body: ChatCompletionRequest) -> tuple[dict[str, Any], dict[str, str]]:
    values, names = _overrides(body)
    if body.logprobs:
        values["logprobs"] = True
        if body.top_logprobs:
            values["top_logprobs"] = body.top_logprobs
    elif body.top_logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    if body.response_format is not None and body.response_format.type != "text":
        form: dict[str, Any] = {"type": body.response_format.type}
        if body.response_format.type == "json_schema":
            spec = body.response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise ApiError(
                    400,
                    "response_format.json_schema.schema: required for type json_schema",
                    param="response_format",
                )
            form["json_schema"] = spec.schema_
            form["strict"] = bool(spec.strict)
        values["response_format"] = form
        names["response_format"] = "response_format"
    if body.tools:
        values["tools"] = [
            {
                "name": tool.function.name,
                "description": tool.function.description or "",
                "parameters": tool.function.parameters or {},
            }
            for tool in body.tools
        ]
        names["tools"] = "tools"
    if body.tool_choice is not None:
        choice = body.tool_choice
        values["tool_choice"] = choice if isinstance(choice, str) else choice.function.name
        names["tool_choice"] = "tool_choice"
    return values, names


def _params(model_id: str, values: dict[str, Any], names: dict[str, str]) -> GenerationParams:
    try:
        return inference.generation_params(model_id=model_id, overrides=values)
    except UnknownModel as e:
        raise from_service_error(e, model_id=model_id) or ApiError(404, str(e)) from e
    except ValidationError as e:
        raise describe_validation(e, rename=names) from e


def _text_of(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    messages = []
    for index, message in enumerate(body.messages):
        values: dict[str, Any] = {"role": message.role, "content": _text_of(message.content)}
        if message.tool_calls:
            values["tool_calls"] = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in message.tool_calls
            ]
        if message.tool_call_id is not None:
            values["tool_call_id"] = message.tool_call_id
        if message.name is not None and message.role != "tool":
            values["name"] = message.name
        try:
            messages.append(ChatMessage.model_validate(values))
        except ValidationError as e:
            error = describe_validation(e)
            raise ApiError(
                400, f"messages.{index}.{error.message}", param=f"messages.{index}"
            ) from e
    return messages


def _choices(n: int) -> int:
    limit = services._api_settings().max_choices
    if not 1 <= n <= limit:
        raise ApiError(400, f"n: must be between 1 and {limit}", param="n")
    return n


# --- results ---------------------------------------------------------------------------------

FINISH_REASONS = {
    Generation.FinishReason.MAX_TOKENS: "length",
    "tool_calls": "tool_calls",
}


def finish_reason_of(generation: Generation) -> str:
    return FINISH_REASONS.get(generation.finish_reason, "stop")


def _usage(generations: list[Generation]) -> dict[str, Any]:
    prompt = generations[0].prompt_tokens if generations else 0
    cached = generations[0].cached_tokens if generations else 0
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _tool_calls_out(generation: Generation) -> list[dict[str, Any]] | None:
    calls = tool_calls_of(generation)
    if not calls:
        return None
    return [
        {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]},
        }
        for call in calls
    ]


def _failed(generation: Generation) -> ApiError | None:
    """The error of a generation that failed, or None if it ended well."""
    if generation.state != Generation.State.ERROR:
        return None
    # Refused at admission (nothing written): the request was at fault; later: the server.
    status = 400 if generation.completion_tokens == 0 else 500
    return ApiError(status, generation.error or "The generation failed.")


def _start_error(error: Exception, model_id: str) -> ApiError:
    mapped = from_service_error(error, model_id=model_id)
    if mapped is not None:
        return mapped
    if isinstance(error, ValidationError):
        return describe_validation(error)
    if isinstance(error, ValueError):
        return ApiError(400, str(error))
    raise error


class _Admission:
    """The key's share of concurrent generations, held for the life of a response."""

    def __init__(self, caller: services.ApiCaller, count: int) -> None:
        self.caller = caller
        self.count = count
        self.held = False

    def acquire(self) -> None:
        if not services.streams_acquire(caller=self.caller, count=self.count):
            limit = services._api_settings().max_concurrent_streams
            raise ApiError(
                429,
                f"This API key already has {limit} generations running; wait for one to end.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.held = True

    def release(self) -> None:
        if self.held:
            services.streams_release(caller=self.caller, count=self.count)
            self.held = False


async def _open(stream: ReplyStream, admission: _Admission) -> ReplyStream:
    admission.acquire()
    try:
        return await stream.__aenter__()
    except ApiError:
        admission.release()
        raise
    except Exception as e:
        admission.release()
        raise _start_error(e, stream.model_id) from e


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse_response(events: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _logprobs_out(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "token": item.get("token", ""),
            "logprob": item.get("logprob", 0.0),
            "bytes": item.get("bytes"),
            "top_logprobs": list(item.get("top_logprobs") or []),
        }
        for item in items
    ]


# --- chat completions ------------------------------------------------------------------------


@api.post(
    "/chat/completions",
    response={200: ChatCompletion, ERRORS: ErrorResponse},
    openapi_extra=_SSE_DOC,
    summary="Create a chat completion",
    exclude_unset=True,
)
async def chat_completions(request: HttpRequest, body: ChatCompletionRequest) -> Any:
    caller = caller_of(request)
    n = _choices(body.n)
    messages = _messages(body)
    values, names = _chat_overrides(body)
    if body.mlxweb_tools is not None:
        return await _chat_with_server_tools(body, caller, messages, values, names)
    params = await database_sync_to_async(_params)(body.model, values, names)
    stream = ReplyStream(
        user=caller.user, model_id=body.model, params=params, messages=messages, n=n
    )
    admission = _Admission(caller, n)
    await _open(stream, admission)
    created = int(time.time())
    completion_id = f"chatcmpl-{stream.generations[0].code.hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(
            _chat_chunks(stream, admission, completion_id, created, body.model, include_usage)
        )
    try:
        logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(n)}
        async for event in stream.events():
            if event.kind == "delta" and event.logprobs:
                logprobs[event.index] += _logprobs_out(event.logprobs)
    finally:
        await stream.close()
        admission.release()
    rows = [stream.done[i] for i in range(n)]
    for row in rows:
        error = _failed(row)
        if error is not None:
            raise error
    choices = []
    for index, row in enumerate(rows):
        tool_calls = _tool_calls_out(row)
        content = answer_of(row)
        choices.append(
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": content if content or not tool_calls else None,
                    "reasoning_content": reasoning_of(row) or None,
                    "tool_calls": tool_calls,
                },
                "logprobs": {"content": logprobs[index]} if body.logprobs else None,
                "finish_reason": finish_reason_of(row),
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(rows),
    }


def _server_tool_params(
    body: ChatCompletionRequest, values: dict[str, Any], names: dict[str, str]
) -> tuple[server_tools.ToolRound, list[GenerationParams]]:
    """The request's server-side tools, and the parameters of its first, later and last rounds.

    A forcing `tool_choice` ("required" or a name) holds for the first round only, or the model
    could never answer; the last round (after `tools.max_rounds`) offers only the client's tools.
    """
    if body.n != 1:
        raise ApiError(400, "n: a request with mlxweb_tools answers one choice", param="n")
    client_names = [tool.function.name for tool in body.tools or []]
    chosen = server_tools.select(
        body.mlxweb_tools or [],
        allow_mutating=body.mlxweb_allow_mutating,
        client_names=client_names,
    )
    client_specs = list(values.get("tools", []))
    first = {**values, "tools": [*client_specs, *server_tools.specs(chosen)]}
    later = dict(first)
    if later.get("tool_choice") not in (None, "auto", "none"):
        later["tool_choice"] = "auto"
    last = {k: v for k, v in later.items() if k not in ("tools", "tool_choice")}
    if client_specs:
        last["tools"] = client_specs
        if "tool_choice" in later:
            last["tool_choice"] = later["tool_choice"]
    names = {**names, "tools": "tools"}
    rounds = [_params(body.model, v, names) for v in (first, later, last)]
    return server_tools.ToolRound(tools=chosen), rounds


async def _open_round(stream: ReplyStream) -> None:
    """Open a later round's stream (the request's admission is already held)."""
    try:
        await stream.__aenter__()
    except ApiError:
        raise
    except Exception as e:
        raise _start_error(e, stream.model_id) from e


def _continues(row: Generation, tool_round: server_tools.ToolRound) -> bool:
    """Whether this round ended in calls that the server runs (so another round follows)."""
    return finish_reason_of(row) == "tool_calls" and tool_round.handles(tool_calls_of(row))


async def _tool_rounds(
    stream: ReplyStream,
    tool_round: server_tools.ToolRound,
    messages: list[ChatMessage],
    later: GenerationParams,
    last: GenerationParams,
) -> AsyncGenerator[ReplyEvent | list[dict[str, Any]]]:
    """Every round's events, and after a round whose calls ran, the list of their steps.
    `stream` is the first round, already open; later rounds open here."""
    rounds = 0
    while True:
        try:
            async for event in stream.events():
                yield event
        finally:
            await stream.close()
        rounds += 1
        row = stream.done[0]
        if _failed(row) is not None or not _continues(row, tool_round):
            return
        steps = await asyncio.to_thread(tool_round.run, tool_calls_of(row))
        yield steps
        messages = [*messages, *server_tools.continuation(answer_of(row), steps)]
        params = later if rounds < server_tools.max_rounds() else last
        stream = ReplyStream(
            user=stream.user, model_id=stream.model_id, params=params, messages=messages
        )
        await _open_round(stream)


def _usage_of_rounds(rows: list[Generation]) -> dict[str, Any]:
    """Each round read its whole prompt again (less what the prompt cache had)."""
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in rows)},
    }


async def _chat_with_server_tools(
    body: ChatCompletionRequest,
    caller: services.ApiCaller,
    messages: list[ChatMessage],
    values: dict[str, Any],
    names: dict[str, str],
) -> Any:
    """A chat completion whose calls of the server's own tools run here: each round's calls run,
    their results go back as `tool` messages, and the model continues, in one response."""
    tool_round, (first, later, last) = await database_sync_to_async(_server_tool_params)(
        body, values, names
    )
    admission = _Admission(caller, 1)
    stream = ReplyStream(user=caller.user, model_id=body.model, params=first, messages=messages)
    try:
        await _open(stream, admission)
    except BaseException:
        tool_round.close()
        raise
    created = int(time.time())
    completion_id = f"chatcmpl-{stream.generations[0].code.hex}"
    rounds = _tool_rounds(stream, tool_round, messages, later, last)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(
            _server_tool_chunks(
                rounds, tool_round, admission, completion_id, created, body.model, include_usage
            )
        )
    rows: list[Generation] = []
    logprobs: list[dict[str, Any]] = []
    try:
        async for item in rounds:
            if isinstance(item, list):
                continue
            if item.kind == "delta" and item.logprobs:
                logprobs += _logprobs_out(item.logprobs)
            elif item.kind == "done" and item.generation is not None:
                rows.append(item.generation)
                error = _failed(item.generation)
                if error is not None:
                    raise error
    finally:
        await rounds.aclose()
        tool_round.close()
        admission.release()
    row = rows[-1]
    tool_calls = _tool_calls_out(row)
    content = answer_of(row)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content if content or not tool_calls else None,
                    "reasoning_content": reasoning_of(row) or None,
                    "tool_calls": tool_calls,
                    "mlxweb_tool_steps": tool_round.steps,
                },
                "logprobs": {"content": logprobs} if body.logprobs else None,
                "finish_reason": finish_reason_of(row),
            }
        ],
        "usage": _usage_of_rounds(rows),
    }


async def _server_tool_chunks(
    rounds: AsyncGenerator[ReplyEvent | list[dict[str, Any]]],
    tool_round: server_tools.ToolRound,
    admission: _Admission,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The rounds as one stream of chunks: each round's text, a chunk with the steps of the
    calls the server ran (`delta.mlxweb_tool_steps`), and the last round's end."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    base["model"] = model
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], **choice: Any) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **choice}
        return _sse({**base, "choices": [choice], **extra})

    rows: list[Generation] = []
    try:
        yield chunk(0, {"role": "assistant", "content": ""})
        try:
            async for item in rounds:
                if isinstance(item, list):
                    yield chunk(0, {"mlxweb_tool_steps": item})
                    continue
                if item.kind == "delta":
                    yield _chat_delta(chunk, item)
                    continue
                row = item.generation
                assert row is not None
                rows.append(row)
                error = _failed(row)
                if error is not None:
                    yield _sse(error.openai_body())
                    continue
                if _continues(row, tool_round):
                    continue
                calls = _tool_calls_out(row)
                if calls:
                    yield chunk(0, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                yield chunk(0, {}, finish_reason=finish_reason_of(row))
        except ApiError as e:  # a later round refused at its start
            yield _sse(e.openai_body())
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage_of_rounds(rows)})
        yield "data: [DONE]\n\n"
    finally:
        await rounds.aclose()
        tool_round.close()
        admission.release()


async def _chat_chunks(
    stream: ReplyStream,
    admission: _Admission,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    base["model"] = model
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], **choice: Any) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **choice}
        return _sse({**base, "choices": [choice], **extra})

    try:
        for index in range(stream.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for event in stream.events():
            if event.kind == "delta":
                yield _chat_delta(chunk, event)
                continue
            row = event.generation
            assert row is not None
            error = _failed(row)
            if error is not None:
                yield _sse(error.openai_body())
                continue
            calls = _tool_calls_out(row)
            if calls:
                deltas = [{"index": i, **call} for i, call in enumerate(calls)]
                yield chunk(event.index, {"tool_calls": deltas})
            yield chunk(event.index, {}, finish_reason=finish_reason_of(row))
        if include_usage:
            rows = [stream.done[i] for i in range(stream.n)]
            yield _sse({**base, "choices": [], "usage": _usage(rows)})
        yield "data: [DONE]\n\n"
    finally:
        await stream.close()
        admission.release()


def _chat_delta(chunk: Any, event: ReplyEvent) -> str:
    key = "reasoning_content" if event.channel == "reasoning" else "content"
    logprobs = {"content": _logprobs_out(event.logprobs)} if event.logprobs else None
    return str(chunk(event.index, {key: event.text}, logprobs=logprobs))


# --- completions -----------------------------------------------------------------------------


def _completion_logprobs(items: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for item in items:
        tokens.append(item.get("token", ""))
        values.append(item.get("logprob", 0.0))
        tops.append({t["token"]: t["logprob"] for t in item.get("top_logprobs") or []})
        offsets.append(offset)
        offset += len(item.get("token", ""))
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


@api.post(
    "/completions",
    response={200: Completion, ERRORS: ErrorResponse},
    openapi_extra=_SSE_DOC,
    summary="Create a completion from a raw prompt",
)
async def completions(request: HttpRequest, body: CompletionRequest) -> Any:
    caller = caller_of(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    choices_each = _choices(body.n)
    prompts = [p for p in prompts for _ in range(choices_each)]
    _choices(len(prompts))
    values, names = _overrides(body)
    if body.logprobs is not None:
        values["logprobs"] = True
        values["top_logprobs"] = body.logprobs
        names["top_logprobs"] = "logprobs"
    params = await database_sync_to_async(_params)(body.model, values, names)
    stream = ReplyStream(user=caller.user, model_id=body.model, params=params, prompts=prompts)
    admission = _Admission(caller, len(prompts))
    await _open(stream, admission)
    created = int(time.time())
    completion_id = f"cmpl-{stream.generations[0].code.hex}"
    base = {"id": completion_id, "object": "text_completion", "created": created}
    base["model"] = body.model
    if body.stream:
        return _sse_response(_completion_chunks(stream, admission, base, body, prompts))
    texts = {i: (prompts[i] if body.echo else "") for i in range(len(prompts))}
    logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(prompts))}
    try:
        async for event in stream.events():
            if event.kind == "delta" and event.channel == "content":
                texts[event.index] += event.text
                logprobs[event.index] += event.logprobs
    finally:
        await stream.close()
        admission.release()
    rows = [stream.done[i] for i in range(len(prompts))]
    for row in rows:
        error = _failed(row)
        if error is not None:
            raise error
    return {
        **base,
        "choices": [
            {
                "index": i,
                "text": texts[i],
                "logprobs": _completion_logprobs(logprobs[i], 0)
                if body.logprobs is not None
                else None,
                "finish_reason": finish_reason_of(row),
            }
            for i, row in enumerate(rows)
        ],
        "usage": _usage(rows),
    }


async def _completion_chunks(
    stream: ReplyStream,
    admission: _Admission,
    base: dict[str, Any],
    body: CompletionRequest,
    prompts: list[str],
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    offsets = dict.fromkeys(range(len(prompts)), 0)

    def chunk(index: int, text: str, logprobs: Any = None, finish_reason: Any = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs}
        return _sse({**base, "choices": [{**choice, "finish_reason": finish_reason}], **extra})

    try:
        if body.echo:
            for index, prompt in enumerate(prompts):
                yield chunk(index, prompt)
        async for event in stream.events():
            if event.kind == "delta":
                if event.channel != "content":
                    continue
                logprobs = None
                if body.logprobs is not None and event.logprobs:
                    logprobs = _completion_logprobs(event.logprobs, offsets[event.index])
                offsets[event.index] += len(event.text)
                yield chunk(event.index, event.text, logprobs)
                continue
            row = event.generation
            assert row is not None
            error = _failed(row)
            if error is not None:
                yield _sse(error.openai_body())
                continue
            yield chunk(event.index, "", finish_reason=finish_reason_of(row))
        if include_usage:
            rows = [stream.done[i] for i in range(len(prompts))]
            yield _sse({**base, "choices": [], "usage": _usage(rows)})
        yield "data: [DONE]\n\n"
    finally:
        await stream.close()
        admission.release()


# --- models ----------------------------------------------------------------------------------


def _model_out(spec: Any) -> dict[str, Any]:
    return {
        "id": spec.id,
        "object": "model",
        "created": 0,
        "owned_by": "mlxweb",
        "task": getattr(spec, "task", "generate"),
        "name": spec.name,
        "context_length": spec.context_length,
    }


@api.get("/models", response={200: ModelList, ERRORS: ErrorResponse}, summary="List models")
async def models(request: HttpRequest) -> Any:
    specs = await database_sync_to_async(inference.model_list)(available_only=True)
    return {"object": "list", "data": [_model_out(spec) for spec in specs]}


@api.get(
    "/models/{model_id}",
    response={200: ModelOut, ERRORS: ErrorResponse},
    summary="Retrieve a model",
)
async def model(request: HttpRequest, model_id: str) -> Any:
    try:
        spec = await database_sync_to_async(inference.model_get)(model_id=model_id)
    except UnknownModel as e:
        raise from_service_error(e, model_id=model_id) or ApiError(404, str(e)) from e
    return _model_out(spec)


# --- embeddings ------------------------------------------------------------------------------


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@api.post(
    "/embeddings",
    response={200: EmbeddingList, ERRORS: ErrorResponse},
    summary="Create embeddings",
)
async def embeddings(request: HttpRequest, body: EmbeddingRequest) -> Any:
    caller = caller_of(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input: give at least one text", param="input")
    if not all(isinstance(text, str) for text in texts):
        raise ApiError(400, "input: token arrays are not supported; send text", param="input")
    if body.dimensions is not None:
        raise ApiError(400, "dimensions: this server's models have fixed sizes", param="dimensions")
    aembed = getattr(inference, "aembed", None)
    if aembed is None:
        raise ApiError(503, "Embeddings are not available on this server yet.")
    try:
        result = await aembed(model_id=body.model, texts=list(texts), user=caller.user)
    except Exception as e:
        mapped = from_service_error(e, model_id=body.model)
        if mapped is None and isinstance(e, ValueError):
            mapped = ApiError(400, f"input: {e}", param="input")
        if mapped is None:
            raise
        raise mapped from e
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)
        ],
        "model": result.model_id,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
