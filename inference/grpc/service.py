"""The calls of mlxweb's gRPC service, on the engine the browser and the HTTP APIs share.

Callers authenticate as on HTTP: an API key in `authorization: Bearer <key>` metadata, counted
against the key's requests per minute and concurrent generations (`inference.api.services`).
A reply runs like an HTTP API request's (`inference.api.replies.ReplyStream`): the call joins a
channel-layer group of its own, creates the generation with that group to notify, relays the
worker's deltas and reads the finished row at the end; a client that goes away (a cancelled call,
a closed connection) stops the generation. Errors are the HTTP APIs' (`inference.api.errors`),
mapped to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn, cast

import grpc
from asgiref.sync import ThreadSensitiveContext
from channels.db import database_sync_to_async
from django.conf import settings
from pydantic import ValidationError

from inference import services as inference
from inference.api import services as api
from inference.api.errors import describe_validation, from_service_error
from inference.api.replies import ReplyStream
from inference.grpc import mlxweb_pb2 as pb
from inference.grpc import mlxweb_pb2_grpc as pb_grpc
from inference.grpc.options import SCALAR_OPTIONS
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mlxweb"].full_name

# The HTTP APIs' statuses as gRPC codes (the usual mapping: gRPC's statuscodes.md).
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
NO_KEY = (
    "A valid API key is needed: send `authorization: Bearer <key>` metadata (keys are made on "
    "the settings page, /settings/keys/, or with `manage.py api_keys create`)."
)
_TASKS = ("generate", "embed")


class CallFailed(Exception):
    """What a call answers instead of its response: a status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(error: Exception, *, model_id: str) -> CallFailed | None:
    """The CallFailed for an exception of inference.services, or None if it is none of them."""
    api_error = from_service_error(error, model_id=model_id)
    if api_error is not None:
        return CallFailed(
            STATUS_CODES.get(api_error.status, grpc.StatusCode.UNKNOWN), str(api_error)
        )
    if isinstance(error, ValidationError):
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(describe_validation(error)))
    if isinstance(error, ValueError):
        return CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return None


# --- who is calling ---------------------------------------------------------------------------


# Every gRPC peer is local (a Unix socket or 127.0.0.1), but the peer is checked anyway in case
# a listener is ever added elsewhere.
_LOCAL_PEERS = ("unix:", "ipv4:127.0.0.1:", "ipv6:[::1]:")


async def authenticate(context: Any) -> api.ApiCaller:
    """Who the call acts as, from its bearer key (as on HTTP: `inference.api.services.
    caller_for`), admitted against the key's requests per minute; raises CallFailed
    (UNAUTHENTICATED, RESOURCE_EXHAUSTED) otherwise."""
    metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
    caller = await database_sync_to_async(api.caller_for)(
        authorization=metadata.get("authorization"),
        local=str(context.peer() or "").startswith(_LOCAL_PEERS),
    )
    if caller is None:
        raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, NO_KEY)
    retry_after = await database_sync_to_async(api.request_admit)(caller=caller)
    if retry_after is not None:
        raise CallFailed(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Too many requests for this API key; try again in {retry_after} s.",
        )
    return caller


# --- requests into the engine's terms ---------------------------------------------------------


def _overrides(options: pb.GenerationOptions) -> dict[str, Any]:
    """The GenerationParams overrides a request set (unset fields keep the model's defaults)."""
    values: dict[str, Any] = {
        name: getattr(options, name) for name in SCALAR_OPTIONS if options.HasField(cast(Any, name))
    }
    if options.stop:
        values["stop"] = list(options.stop)
    if options.logit_bias:
        values["logit_bias"] = dict(options.logit_bias)
    if options.HasField("response_format"):
        form = options.response_format
        values["response_format"] = {"type": form.type or "text", "strict": form.strict}
        if form.json_schema:
            try:
                values["response_format"]["json_schema"] = json.loads(form.json_schema)
            except ValueError as e:
                raise CallFailed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"response_format.json_schema: not valid JSON ({e})",
                ) from e
    return values


def _params(model_id: str, options: pb.GenerationOptions) -> GenerationParams:
    """The model's sampling with the request's options on top, validated and capped (sync)."""
    try:
        return inference.generation_params(model_id=model_id, overrides=_overrides(options))
    except Exception as e:
        failed = status_of(e, model_id=model_id)
        if failed is None:
            raise
        raise failed from e


def _model_of(request_model: str) -> str:
    # The CLI may leave the model to the server: its default, as the chat's picker starts with.
    return request_model or inference.default_model_id()


def _messages(request: pb.ChatRequest) -> list[ChatMessage]:
    if not request.messages:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "messages: give at least one message")
    messages = []
    for index, message in enumerate(request.messages):
        values: dict[str, Any] = {"role": message.role, "content": message.content}
        for name in ("name", "tool_call_id"):
            if message.HasField(name):
                values[name] = getattr(message, name)
        try:
            messages.append(ChatMessage.model_validate(values))
        except ValidationError as e:
            raise CallFailed(
                grpc.StatusCode.INVALID_ARGUMENT, f"messages.{index}.{describe_validation(e)}"
            ) from e
    return messages


# --- replies ----------------------------------------------------------------------------------


def _counts(generation: Generation) -> tuple[int, int]:
    row = (
        Generation.objects.filter(pk=generation.pk)
        .values_list("prompt_tokens", "cached_tokens")
        .first()
    )
    return row or (0, 0)


async def _relay(context: Any, caller: api.ApiCaller, stream: ReplyStream) -> None:
    """Run one generation and write its events to the call: Started, Deltas, Finished.

    Started comes with the first event from the worker (the row then has its prompt's token
    counts). Leaving early (the client cancelled the call or went away, which cancels this
    task) stops the generation, as on HTTP.
    """
    acquired = await database_sync_to_async(api.streams_acquire)(caller=caller)
    if not acquired:
        limit = settings.MLXWEB_CONFIG.server.api.max_concurrent_streams
        raise CallFailed(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"This API key already has {limit} generations running; wait for one to end.",
        )
    try:
        try:
            await stream.__aenter__()
        except CallFailed:
            raise
        except Exception as e:
            failed = status_of(e, model_id=stream.model_id)
            if failed is None:
                raise
            raise failed from e
        try:
            started = False
            async for event in stream.events():
                if not started:
                    started = True
                    generation = stream.generations[0]
                    prompt, cached = await database_sync_to_async(_counts)(generation)
                    await context.write(
                        pb.GenerationEvent(
                            started=pb.Started(
                                code=str(generation.code),
                                prompt_tokens=prompt,
                                cached_tokens=cached,
                            )
                        )
                    )
                if event.kind == "delta":
                    if event.text:
                        delta = pb.Delta(text=event.text, channel=event.channel)
                        await context.write(pb.GenerationEvent(delta=delta))
                    continue
                row = event.generation
                assert row is not None
                finished = pb.Finished(
                    finish_reason=row.finish_reason,
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=row.completion_tokens,
                    error=row.error,
                )
                await context.write(pb.GenerationEvent(finished=finished))
        finally:
            await stream.close()
    finally:
        await database_sync_to_async(api.streams_release)(caller=caller)


def _get_generation_for_caller(caller: api.ApiCaller, code: str) -> Generation:
    """The caller's generation with this code; CallFailed NOT_FOUND for anyone else's."""
    not_found = CallFailed(grpc.StatusCode.NOT_FOUND, f"You have no generation {code!r}.")
    try:
        parsed = uuid.UUID(code)
    except ValueError:
        raise not_found from None
    rows = Generation.objects.filter(code=parsed)
    if caller.user is not None:
        rows = rows.filter(user=caller.user)
    else:  # a keyless local caller (api.open_on_loopback) owns what belongs to nobody
        rows = rows.filter(user__isnull=True)
    generation = rows.first()
    if generation is None:
        raise not_found
    return generation


def _cancel(caller: api.ApiCaller, code: str) -> bool:
    generation = _get_generation_for_caller(caller, code)
    if not generation.is_active:
        return False
    logger.info("gRPC Cancel: stopping generation %s", generation.code)
    inference.generation_stop(generation=generation)
    return True


def _models(available_only: bool, task: str) -> list[pb.Model]:
    if task and task not in _TASKS:
        raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "task: must be generate, embed or empty")
    specs = inference.model_list(available_only=available_only, task=task or None)
    return [
        pb.Model(
            id=spec.id,
            name=spec.name,
            task=spec.task,
            available=spec.is_available,
            context_length=spec.context_length,
        )
        for spec in specs
    ]


def _status() -> pb.StatusResponse:
    state = inference.worker_status()
    return pb.StatusResponse(
        worker_alive=state.alive,
        loaded=[
            pb.LoadedModel(
                model_id=model.model_id, bytes=model.bytes, loaded_at=model.loaded_at.isoformat()
            )
            for model in state.loaded
        ],
        queued=state.queued,
        streaming=state.streaming,
    )


# --- the servicer -----------------------------------------------------------------------------


async def _fail(context: Any, failed: CallFailed) -> NoReturn:
    await context.abort(failed.code, failed.message)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


class MlxwebService(pb_grpc.MlxwebServicer):
    """The Mlxweb service of mlxweb.proto.

    Each call runs in a ThreadSensitiveContext of its own, as Django's ASGI handler runs each
    request: its database work gets a thread of its own instead of queueing behind every other
    call's (and the in-process worker's) in the one shared thread. The calls in flight are
    known, so that stopping the server can wait for their clean-up (`wait_for_calls`).
    """

    def __init__(self) -> None:
        self.calls: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            async with ThreadSensitiveContext():
                yield
        finally:
            self.calls.discard(task)

    async def wait_for_calls(self, timeout: float) -> None:
        """Wait until the calls in flight have ended (cancelled ones included: a cancelled
        call still stops its generation, which needs the event loop to be running)."""
        if self.calls:
            await asyncio.wait(list(self.calls), timeout=timeout)

    # The streaming calls write through context.write rather than being async generators: a
    # coroutine is cancelled where it waits when the client goes away, so its clean-up (stopping
    # the generation) always runs then, not whenever a suspended generator is collected.
    async def Chat(self, request: pb.ChatRequest, context: Any) -> None:  # type: ignore[override]
        async with self._call():
            try:
                caller = await authenticate(context)
                model_id = await database_sync_to_async(_model_of)(request.model)
                messages = _messages(request)
                params = await database_sync_to_async(_params)(model_id, request.options)
                stream = ReplyStream(
                    user=caller.user, model_id=model_id, params=params, messages=messages
                )
                await _relay(context, caller, stream)
            except CallFailed as failed:
                await _fail(context, failed)

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:  # type: ignore[override]
        async with self._call():
            try:
                caller = await authenticate(context)
                if not request.prompt:
                    raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
                model_id = await database_sync_to_async(_model_of)(request.model)
                params = await database_sync_to_async(_params)(model_id, request.options)
                if request.raw:
                    stream = ReplyStream(
                        user=caller.user,
                        model_id=model_id,
                        params=params,
                        prompt_text=request.prompt,
                    )
                else:
                    messages = [ChatMessage(role="user", content=request.prompt)]
                    if request.system:
                        messages.insert(0, ChatMessage(role="system", content=request.system))
                    stream = ReplyStream(
                        user=caller.user, model_id=model_id, params=params, messages=messages
                    )
                await _relay(context, caller, stream)
            except ValidationError as e:
                await _fail(context, CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            except CallFailed as failed:
                await _fail(context, failed)

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        async with self._call():
            try:
                caller = await authenticate(context)
                if not request.model:
                    raise CallFailed(
                        grpc.StatusCode.INVALID_ARGUMENT, "model: name an embedding model"
                    )
                try:
                    result = await inference.aembed(
                        model_id=request.model, texts=list(request.texts), user=caller.user
                    )
                except Exception as e:
                    failed = status_of(e, model_id=request.model)
                    if failed is None:
                        raise
                    raise failed from e
            except CallFailed as failed:
                await _fail(context, failed)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=vector) for vector in result.vectors],
            prompt_tokens=result.prompt_tokens,
            model=result.model_id,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        async with self._call():
            try:
                await authenticate(context)
                models = await database_sync_to_async(_models)(request.available_only, request.task)
            except CallFailed as failed:
                await _fail(context, failed)
        return pb.ListModelsResponse(models=models)

    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        async with self._call():
            try:
                caller = await authenticate(context)
                stopped = await database_sync_to_async(_cancel)(caller, request.code)
            except CallFailed as failed:
                await _fail(context, failed)
        return pb.CancelResponse(stopped=stopped)

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        # Like GET /health: no key, nothing about anyone's requests.
        async with self._call():
            return await database_sync_to_async(_status)()
