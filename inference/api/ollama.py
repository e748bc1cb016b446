"""The Ollama-compatible API under /api: chat, generate, tags, show, ps, embed, version.

Ollama's shapes on mlxweb's engine: NDJSON streams (one JSON object a line, the last with
`done: true` and the durations in nanoseconds), `format` as "json" or a JSON schema,
`options` as sampling parameters. `/api/pull` and `/api/delete` are model library jobs: they
live in `models_admin.api` and are mounted on the same API by `mlxweb.urls`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from channels.db import database_sync_to_async
from django.http import HttpRequest, StreamingHttpResponse
from ninja import NinjaAPI, Schema
from pydantic import ValidationError

from inference import services as inference
from inference.api.access import ApiKeyAuth, caller_of, install_error_handlers
from inference.api.errors import ApiError, describe_validation, from_service_error
from inference.api.openai import _Admission, _failed, _open
from inference.api.replies import ReplyStream, answer_of, reasoning_of, tool_calls_of
from inference.catalogue import ModelSpec, UnknownModel
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

logger = logging.getLogger(__name__)

# The Ollama API version this one follows (clients check it for features, not mlxweb's own).
OLLAMA_VERSION = "0.12.0"

api = NinjaAPI(
    title="mlxweb Ollama-compatible API",
    version="1",
    description="Ollama-compatible endpoints on mlxweb's engine. `Authorization: Bearer <key>`.",
    urls_namespace="ollama",
    auth=ApiKeyAuth(),
    docs_url=None,
    openapi_url="/openapi.json",
)
install_error_handlers(api, lambda error: {"error": error.message})

ERRORS = frozenset({400, 401, 403, 404, 413, 429, 503})


class OllamaError(Schema):
    error: str


class Options(Schema):
    """Ollama's `options`; the ones mlxweb has no use for (num_ctx, num_thread...) are ignored."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class FunctionCallIn(Schema):
    name: str
    arguments: dict[str, Any] = {}


class ToolCallIn(Schema):
    function: FunctionCallIn


class MessageIn(Schema):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class FunctionSpec(Schema):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(Schema):
    type: Literal["function"] = "function"
    function: FunctionSpec


KeepAlive = str | float | None
Format = Literal["json"] | dict[str, Any] | None


class ChatRequest(Schema):
    model: str
    messages: list[MessageIn] = []
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    tools: list[ToolIn] | None = None
    think: bool | None = None


class GenerateRequest(Schema):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    think: bool | None = None


class ModelRequest(Schema):
    model: str


class EmbedRequest(Schema):
    model: str
    input: str | list[str]
    truncate: bool = True
    keep_alive: KeepAlive = None


class LegacyEmbedRequest(Schema):
    model: str
    prompt: str
    keep_alive: KeepAlive = None


# --- parameters ------------------------------------------------------------------------------

_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _params(
    model_id: str, options: Options | None, form: Format, tools: list[ToolIn] | None = None
) -> GenerationParams:
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    if options is not None:
        for ollama_name, name in _OPTION_NAMES.items():
            value = getattr(options, ollama_name)
            if ollama_name == "num_predict" and value is not None and value < 0:
                value = None  # -1: as long as the model likes, up to the server's cap
            if value is not None:
                values[name] = value
                names[name] = f"options.{ollama_name}"
    if form == "json":
        values["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict):
        values["response_format"] = {"type": "json_schema", "json_schema": form, "strict": True}
    names["response_format"] = "format"
    if tools:
        values["tools"] = [
            {
                "name": tool.function.name,
                "description": tool.function.description or "",
                "parameters": tool.function.parameters or {},
            }
            for tool in tools
        ]
    try:
        return inference.generation_params(model_id=model_id, overrides=values)
    except UnknownModel as e:
        raise _unknown(model_id) from e
    except ValidationError as e:
        raise describe_validation(e, rename=names) from e


def _unknown(model_id: str) -> ApiError:
    return ApiError(404, f"model '{model_id}' not found", param="model")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Ollama's keep_alive ("5m", "1h30m", 300, -1: forever, 0: unload now) in seconds; None
    for forever or not given. Raises ApiError on a value it cannot read."""
    if value is None:
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ApiError(400, f"keep_alive: not a duration: {value!r}", param="keep_alive")
        return None if value < 0 else float(value)
    text = value.strip()
    if text.startswith("-"):
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ApiError(400, f"keep_alive: not a duration: {value!r}", param="keep_alive")
        return number
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, f"keep_alive: not a duration: {value!r}", param="keep_alive")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _default_keep_alive(model_id: str) -> float | None:
    """The keep-alive a model loads with: its config's, else the server's (None: kept)."""
    from django.conf import settings

    spec = inference.model_get(model_id=model_id)
    seconds = spec.keep_alive
    if seconds is None:
        seconds = settings.MLXWEB_CONFIG.server.keep_alive
    return None if seconds is None or seconds < 0 else seconds


async def _keep_alive(model_id: str, seconds: float | None) -> None:
    """Tell the worker how long to keep the model loaded once idle (0: unload it now or when
    its running requests end; None: keep it)."""
    try:
        await inference.amodel_unload_after(model_id=model_id, seconds=seconds)
    except UnknownModel as e:
        raise _unknown(model_id) from e
    except inference.ModelLoadFailed as e:
        raise ApiError(503, f"model '{model_id}': {e}") from e


async def _load_or_unload(model_id: str, value: KeepAlive, key: str) -> dict[str, Any]:
    """Ollama's request with a model and no prompt: load the model (with the keep_alive
    given, else its default), or with keep_alive 0 unload it."""
    if value is None:
        seconds = await database_sync_to_async(_default_keep_alive)(model_id)
    else:
        seconds = keep_alive_seconds(value)
    await _keep_alive(model_id, seconds)
    return _load_only(model_id, key, unloaded=seconds == 0)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(start: datetime | None, end: datetime | None) -> int:
    if start is None or end is None:
        return 0
    return max(0, int((end - start).total_seconds() * 1e9))


def _done_fields(row: Generation, started: float) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": "length"
        if row.finish_reason == Generation.FinishReason.MAX_TOKENS
        else "stop",
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": _ns(row.created_at, row.started_at),
        "prompt_eval_count": row.prompt_tokens,
        "prompt_eval_duration": _ns(row.started_at, row.first_token_at),
        "eval_count": row.completion_tokens,
        "eval_duration": _ns(row.first_token_at, row.finished_at),
    }


def _tool_calls_out(row: Generation) -> list[dict[str, Any]]:
    calls = []
    for call in tool_calls_of(row):
        try:
            arguments = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError:
            arguments = {}
        calls.append({"function": {"name": call["name"], "arguments": arguments}})
    return calls


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":")) + "\n"


def _ndjson(lines: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    return response


def _load_only(model_id: str, key: str, *, unloaded: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model_id, "created_at": _now(), "done": True}
    body["done_reason"] = "unload" if unloaded else "load"
    if key == "message":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return body


async def _run(
    request: HttpRequest,
    *,
    model_id: str,
    params: GenerationParams,
    messages: list[ChatMessage],
    prompt_text: str | None,
    stream_it: bool,
    key: Literal["message", "response"],
    keep_alive: KeepAlive = None,
) -> Any:
    caller = caller_of(request)
    # Read before the generation exists, so a bad value is a 400 with nothing started.
    keep_alive_s = keep_alive_seconds(keep_alive)
    started = time.monotonic()
    stream = ReplyStream(
        user=caller.user,
        model_id=model_id,
        params=params,
        messages=messages,
        prompt_text=prompt_text,
    )
    admission = _Admission(caller, 1)
    await _open(stream, admission)
    if keep_alive is not None:
        # After the generation is handed to the worker, so the keep-alive counts from the end
        # of this request (0: the model is unloaded once the reply is done), not from now.
        try:
            await _keep_alive(model_id, keep_alive_s)
        except ApiError as e:
            # The reply itself says what is wrong with the model; the keep-alive is advice.
            logger.warning("keep_alive for %s not applied: %s", model_id, e.message)

    def piece(text: str, thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": model_id, "created_at": _now()}
        if key == "message":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            body["message"] = message
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        return {**body, "done": False}

    def final(row: Generation, content: str = "", thinking: str = "") -> dict[str, Any]:
        body = piece(content, thinking)
        if key == "message":
            calls = _tool_calls_out(row)
            if calls:
                body["message"]["tool_calls"] = calls
        return {**body, **_done_fields(row, started)}

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in stream.events():
                if event.kind == "delta":
                    if event.channel == "reasoning":
                        yield _line(piece("", event.text))
                    else:
                        yield _line(piece(event.text))
                    continue
                row = event.generation
                assert row is not None
                error = _failed(row)
                if error is not None:
                    yield _line({"error": error.message})
                else:
                    yield _line(final(row))
        finally:
            await stream.close()
            admission.release()

    if stream_it:
        return _ndjson(lines())
    try:
        async for _event in stream.events():
            pass
    finally:
        await stream.close()
        admission.release()
    row = stream.done[0]
    error = _failed(row)
    if error is not None:
        raise error
    return final(row, answer_of(row), reasoning_of(row))


def _chat_messages(body: ChatRequest) -> list[ChatMessage]:
    messages = []
    for index, message in enumerate(body.messages):
        if message.images:
            raise ApiError(
                400, f"messages.{index}.images: images are not supported", param="messages"
            )
        values: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            values["tool_calls"] = [
                {
                    "id": f"call_{index}_{n}",
                    "name": call.function.name,
                    "arguments": json.dumps(call.function.arguments),
                }
                for n, call in enumerate(message.tool_calls)
            ]
        if message.role == "tool" and message.tool_name:
            values["name"] = message.tool_name
        try:
            messages.append(ChatMessage.model_validate(values))
        except ValidationError as e:
            error = describe_validation(e)
            raise ApiError(400, f"messages.{index}.{error.message}", param="messages") from e
    return messages


@api.post("/chat", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Chat")
async def chat(request: HttpRequest, body: ChatRequest) -> Any:
    messages = _chat_messages(body)
    params = await database_sync_to_async(_params)(
        body.model, body.options, body.format, body.tools
    )
    if not messages:
        return await _load_or_unload(body.model, body.keep_alive, "message")
    return await _run(
        request,
        model_id=body.model,
        params=params,
        messages=messages,
        prompt_text=None,
        stream_it=body.stream,
        key="message",
        keep_alive=body.keep_alive,
    )


@api.post("/generate", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Generate")
async def generate(request: HttpRequest, body: GenerateRequest) -> Any:
    if body.images:
        raise ApiError(400, "images: images are not supported", param="images")
    params = await database_sync_to_async(_params)(body.model, body.options, body.format)
    if not body.prompt:
        return await _load_or_unload(body.model, body.keep_alive, "response")
    if body.raw:
        messages: list[ChatMessage] = []
        prompt_text: str | None = body.prompt
    else:
        prompt_text = None
        messages = [ChatMessage(role="user", content=body.prompt)]
        if body.system:
            messages.insert(0, ChatMessage(role="system", content=body.system))
    return await _run(
        request,
        model_id=body.model,
        params=params,
        messages=messages,
        prompt_text=prompt_text,
        stream_it=body.stream,
        key="response",
        keep_alive=body.keep_alive,
    )


# --- models ----------------------------------------------------------------------------------


def _size(spec: ModelSpec) -> int:
    path = spec.local_path()
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _digest(spec: ModelSpec) -> str:
    # Ollama names a model's blob by its digest; mlxweb's ids are stable, so a digest of the id
    # is a stable stand-in.
    return hashlib.sha256(spec.id.encode()).hexdigest()


def _details(spec: ModelSpec) -> dict[str, Any]:
    return {
        "format": "gguf" if spec.kind == "gguf" else "mlx",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _modified(spec: ModelSpec) -> str:
    path = spec.local_path()
    if path is not None and path.exists():
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
    return _now()


def _tags() -> dict[str, Any]:
    return {
        "models": [
            {
                "name": spec.id,
                "model": spec.id,
                "modified_at": _modified(spec),
                "size": _size(spec),
                "digest": _digest(spec),
                "details": _details(spec),
            }
            for spec in inference.model_list(available_only=True)
        ]
    }


@api.get("/tags", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Local models")
async def tags(request: HttpRequest) -> Any:
    return await database_sync_to_async(_tags)()


def _show(model_id: str) -> dict[str, Any]:
    try:
        spec = inference.model_get(model_id=model_id)
    except UnknownModel as e:
        raise _unknown(model_id) from e
    task = getattr(spec, "task", "generate")
    parameters = "\n".join(f"{k} {v}" for k, v in sorted(spec.sampling.items()))
    return {
        "modelfile": f"# mlxweb model {spec.id}\nFROM {spec.id}\n",
        "parameters": parameters,
        "template": spec.chat_template or "",
        "details": _details(spec),
        "model_info": {"general.name": spec.name, "context_length": spec.context_length},
        "capabilities": ["embedding"] if task == "embed" else ["completion", "tools"],
        "modified_at": _modified(spec),
    }


@api.post("/show", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Show a model")
async def show(request: HttpRequest, body: ModelRequest) -> Any:
    return await database_sync_to_async(_show)(body.model)


def _ps() -> dict[str, Any]:
    worker_status = getattr(inference, "worker_status", None)
    if worker_status is None:
        return {"models": []}
    status = worker_status()
    models = []
    for loaded in status.loaded:
        try:
            spec = inference.model_get(model_id=loaded.model_id)
        except UnknownModel:
            continue
        expires = loaded.expires_at
        models.append(
            {
                "name": spec.id,
                "model": spec.id,
                "size": loaded.bytes,
                "digest": _digest(spec),
                "details": _details(spec),
                "expires_at": expires.isoformat() if expires else "0001-01-01T00:00:00Z",
                "size_vram": loaded.bytes,
            }
        )
    return {"models": models}


@api.get("/ps", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Loaded models")
async def ps(request: HttpRequest) -> Any:
    return await database_sync_to_async(_ps)()


@api.get("/version", auth=None, response={200: dict[str, str]}, summary="Version")
async def version(request: HttpRequest) -> Any:
    return {"version": OLLAMA_VERSION}


# --- embeddings ------------------------------------------------------------------------------


async def _embed(request: HttpRequest, model_id: str, texts: list[str]) -> Any:
    aembed = getattr(inference, "aembed", None)
    if aembed is None:
        raise ApiError(503, "Embeddings are not available on this server yet.")
    try:
        return await aembed(model_id=model_id, texts=texts, user=caller_of(request).user)
    except UnknownModel as e:
        raise _unknown(model_id) from e
    except Exception as e:
        mapped = from_service_error(e, model_id=model_id)
        if mapped is None and isinstance(e, ValueError):
            mapped = ApiError(400, f"input: {e}", param="input")
        if mapped is None:
            raise
        raise mapped from e


@api.post("/embed", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Embed")
async def embed(request: HttpRequest, body: EmbedRequest) -> Any:
    started = time.monotonic()
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await _embed(request, body.model, texts)
    if body.keep_alive is not None:
        await _keep_alive(body.model, keep_alive_seconds(body.keep_alive))
    return {
        "model": body.model,
        "embeddings": result.vectors,
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
    }


@api.post(
    "/embeddings", response={200: dict[str, Any], ERRORS: OllamaError}, summary="Embed (legacy)"
)
async def embeddings(request: HttpRequest, body: LegacyEmbedRequest) -> Any:
    result = await _embed(request, body.model, [body.prompt])
    if body.keep_alive is not None:
        await _keep_alive(body.model, keep_alive_seconds(body.keep_alive))
    return {"embedding": result.vectors[0]}
