"""A small Python client of mlxweb's gRPC service, over its Unix socket or localhost TCP.

Plain Python and grpcio (no Django), so scripts and `mlxweb run` import it cheaply:

    from mlxweb.client import Client, Delta

    with Client(api_key="mlxw_...") as client:  # default: the local server's Unix socket
        for event in client.chat(model="smollm2-135m-instruct",
                                 messages=[{"role": "user", "content": "Hi"}], max_tokens=64):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)

A reply streams as one `Started` (its code, for `cancel`), `Delta`s and one `Finished`. Leaving
the loop early (or closing the iterator) ends the call, and the server stops the generation.
Failures raise `ClientError`, whose `code` is the gRPC status's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference.grpc import mlxweb_pb2 as pb
from inference.grpc import mlxweb_pb2_grpc as pb_grpc
from inference.grpc.options import SCALAR_OPTIONS

__all__ = [
    "Client",
    "ClientError",
    "Delta",
    "Finished",
    "Started",
    "default_target",
]

SOCKET_NAME = "grpc.sock"
HEALTH_TIMEOUT_S = 2.0


@dataclass
class Started:
    """The worker has taken the generation: its code and its prompt's token counts."""

    code: str
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    """A piece of the reply; `channel` is "content" or "reasoning"."""

    text: str
    channel: str


@dataclass
class Finished:
    """How the reply ended (eos, stop_string, max_tokens, tool_calls, stopped, interrupted,
    error), its token counts, and why it failed when it did."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str


Event = Started | Delta | Finished


class ClientError(Exception):
    """A call that failed; `code` is the gRPC status's name ("UNAUTHENTICATED", "NOT_FOUND",
    "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def default_target(var_dir: Path | None = None) -> str:
    """The local server's Unix socket as a target: `<var_dir>/grpc.sock`, with `var_dir` (or,
    left out, the configured socket under the configured data folder)."""
    if var_dir is not None:
        path = Path(var_dir).expanduser() / SOCKET_NAME
    else:
        from mlxweb.config import load_config
        from mlxweb.paths import DataPaths

        server = load_config().server
        path = server.grpc.socket_path(DataPaths.from_config(server).var_dir)
    return f"unix://{path.absolute()}"


def _target(target: str) -> str:
    # A bare socket path is a Unix target too.
    if target.startswith(("/", "./", "~")):
        return f"unix://{Path(target).expanduser().absolute()}"
    return target


def _error(error: grpc.RpcError, target: str) -> ClientError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the mlxweb gRPC server at {target}: {details}"
    return ClientError(code.name, details)


def _options(params: dict[str, Any]) -> pb.GenerationOptions:
    """GenerationOptions from inference.schemas.GenerationParams' names; the server checks the
    bounds."""
    options = pb.GenerationOptions()
    for name, value in params.items():
        if value is None:
            continue
        try:
            if name in SCALAR_OPTIONS:
                setattr(options, name, value)
            elif name == "stop":
                options.stop.extend([value] if isinstance(value, str) else list(value))
            elif name == "logit_bias":
                options.logit_bias.update({int(k): float(v) for k, v in dict(value).items()})
            elif name == "response_format":
                form = dict(value)
                schema = form.get("json_schema")
                options.response_format.CopyFrom(
                    pb.ResponseFormat(
                        type=str(form.get("type", "text")),
                        json_schema=json.dumps(schema) if schema is not None else "",
                        strict=bool(form.get("strict", False)),
                    )
                )
            else:
                raise ClientError("INVALID_ARGUMENT", f"{name}: not a generation option")
        except (TypeError, ValueError) as e:
            raise ClientError("INVALID_ARGUMENT", f"{name}: {e}") from e
    return options


def _event(message: pb.GenerationEvent) -> Event:
    kind = message.WhichOneof("event")
    if kind == "started":
        s = message.started
        return Started(code=s.code, prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens)
    if kind == "delta":
        return Delta(text=message.delta.text, channel=message.delta.channel or "content")
    f = message.finished
    return Finished(
        finish_reason=f.finish_reason,
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        error=f.error,
    )


class Client:
    """A connection to mlxweb's gRPC service.

    `target` is "unix:///abs/path.sock" (a bare absolute path works too) or "127.0.0.1:50051";
    left out, the local server's socket (`default_target()`). `api_key` defaults to
    $MLXWEB_API_KEY; `timeout` bounds every call, a whole streamed reply included.
    """

    def __init__(
        self, target: str | None = None, *, api_key: str | None = None, timeout: float = 600.0
    ) -> None:
        self.target = _target(target) if target else default_target()
        self.api_key = api_key if api_key is not None else os.environ.get("MLXWEB_API_KEY")
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target)
        self._stub = pb_grpc.MlxwebStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def _call(self, method: Callable[..., Any], request: Any, **kwargs: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, **{"timeout": self.timeout, **kwargs})
        except grpc.RpcError as e:
            raise _error(e, self.target) from None

    def is_serving(self) -> bool:
        """Whether a server answers SERVING to the standard health check (2 s); never raises."""
        try:
            answer = self._health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except Exception:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def health(self) -> dict[str, Any]:
        """The health check's status and the inference worker's state (needs no key)."""
        check = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
        )
        status = self._call(self._stub.Status, pb.StatusRequest())
        return {
            "status": health_pb2.HealthCheckResponse.ServingStatus.Name(check.status),
            "worker_alive": status.worker_alive,
            "loaded": [
                {"model_id": m.model_id, "bytes": m.bytes, "loaded_at": m.loaded_at}
                for m in status.loaded
            ],
            "queued": status.queued,
            "streaming": status.streaming,
        }

    def list_models(self, *, available_only: bool = False, task: str = "") -> list[dict[str, Any]]:
        """The models a request may name: id, name, task ("generate"/"embed"), whether their
        weights are here, context length."""
        answer = self._call(
            self._stub.ListModels, pb.ListModelsRequest(available_only=available_only, task=task)
        )
        return [
            {
                "id": m.id,
                "name": m.name,
                "task": m.task,
                "available": m.available,
                "context_length": m.context_length,
            }
            for m in answer.models
        ]

    def chat(
        self, *, model: str, messages: list[dict[str, Any]], **params: Any
    ) -> Generator[Event]:
        """One reply to `messages` ({"role", "content"}, optionally "name", "tool_call_id"),
        streamed. `params` are generation options (temperature, max_tokens, stop, seed, ...)."""
        try:
            request = pb.ChatRequest(
                model=model,
                messages=[pb.ChatMessage(**message) for message in messages],
                options=_options(params),
            )
        except (TypeError, ValueError) as e:
            raise ClientError("INVALID_ARGUMENT", f"messages: {e}") from e
        return self._stream(self._stub.Chat, request)

    def generate(
        self, *, model: str, prompt: str, system: str = "", raw: bool = False, **params: Any
    ) -> Generator[Event]:
        """One reply to `prompt` (through the chat template, after `system`; as it is with
        `raw`), streamed."""
        request = pb.GenerateRequest(
            model=model, prompt=prompt, system=system, raw=raw, options=_options(params)
        )
        return self._stream(self._stub.Generate, request)

    def _stream(self, method: Callable[..., Any], request: Any) -> Generator[Event]:
        call = self._call(method, request)
        try:
            for message in call:
                yield _event(message)
        except grpc.RpcError as e:
            raise _error(e, self.target) from None
        finally:
            # A consumer that stops early (break, close(), Ctrl-C) ends the call; the server
            # then stops the generation. A call that ended already ignores it.
            call.cancel()

    def embed(self, *, model: str, texts: list[str]) -> list[list[float]]:
        """One sentence vector per text, from an embedding model."""
        answer = self._call(self._stub.Embed, pb.EmbedRequest(model=model, texts=texts))
        return [list(embedding.values) for embedding in answer.embeddings]

    def cancel(self, code: str) -> bool:
        """Stop one of your generations (its text is kept); False if it had ended already."""
        return bool(self._call(self._stub.Cancel, pb.CancelRequest(code=code)).stopped)
