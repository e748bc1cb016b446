"""`mlxweb run MODEL [PROMPT]`: one answer streamed to the terminal, or a chat when no prompt
is given.

Through the running server when one answers on its gRPC socket and an API key is at hand
(`mlxweb.client`), else in this process: Django set up for the catalogue and the settings, and
the engine the inference worker would use (`inference.worker.get_engine`) started here. One dim
line on stderr says which.

In the chat, the conversation so far goes with every turn; `/system TEXT`, `/preset NAME`,
`/save [TITLE]` (a conversation the browser shows, for `--user` or the first admin), `/clear`,
`/exit`. Ctrl-C stops a reply (the text so far is kept); Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import queue
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from mlxweb.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError, verb_parser
from mlxweb.cli.output import note

# Reasons a reply ends well (an error or a stop is reported otherwise).
FINISHED_WELL = ("eos", "stop_string", "max_tokens", "tool_calls")
HELP = """Commands:
  /system TEXT   set the system prompt (/system alone clears it)
  /preset NAME   use a sampling preset (/preset alone lists them)
  /save [TITLE]  save this chat as a conversation the browser shows
  /clear         forget the conversation so far
  /exit          leave (Ctrl-D too); Ctrl-C stops a reply"""


def add_verbs(verbs: Any) -> None:
    run = verb_parser(
        verbs,
        "run",
        _run,
        help="chat with a model: one answer for PROMPT, or a chat in the terminal without one",
    )
    model = run.add_argument("model", help="a model id (`mlxweb list` shows the chat ids)")
    model.completer = _model_ids  # type: ignore[attr-defined]
    run.add_argument("prompt", nargs="?", help="the question ('-' reads it from stdin)")
    run.add_argument("--system", default="", help="a system prompt")
    preset = run.add_argument("--preset", help="a sampling preset of configs/presets/")
    preset.completer = _preset_names  # type: ignore[attr-defined]
    run.add_argument("--temperature", type=float)
    run.add_argument("--top-p", type=float)
    run.add_argument("--max-tokens", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument(
        "--local", action="store_true", help="run the model in this process even if a server runs"
    )
    run.add_argument("--target", help="the server's gRPC target (default: its Unix socket)")
    run.add_argument(
        "--api-key", help="an API key for the server (default: $MLXWEB_API_KEY)"
    )
    run.add_argument("--user", help="whose conversation /save makes (default: the first admin)")


def _model_ids(**kwargs: Any) -> list[str]:
    from inference.services import model_list

    return [spec.id for spec in model_list(task="generate")]


def presets_dir() -> Path:
    """configs/presets of the configs folder in use (MLXWEB_CONFIG_DIR moves it)."""
    from mlxweb.config import DEFAULT_CONFIG_DIR

    return Path(os.environ.get("MLXWEB_CONFIG_DIR") or DEFAULT_CONFIG_DIR) / "presets"


def _preset_names(**kwargs: Any) -> list[str]:
    return sorted(_presets())


def _presets() -> dict[str, Any]:
    from inference.presets import PresetError, load_presets

    try:
        return load_presets(presets_dir())
    except PresetError as e:
        raise CLIError(str(e), code=EXIT_USAGE) from None


# ---------------------------------------------------------------------------------------------
# Where replies come from


@dataclass(frozen=True)
class Piece:
    """Reply text as it arrives."""

    text: str
    reasoning: bool = False


@dataclass(frozen=True)
class End:
    """How the reply ended; "stopped" when Ctrl-C stopped it."""

    reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


class Replies(Protocol):
    """A way to get replies: the running server, or the engine in this process."""

    def stream(
        self, *, model: str, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> Iterator[Piece | End]:
        """The reply's pieces, then exactly one End; Ctrl-C stops it (End "stopped")."""
        ...

    def close(self) -> None: ...


class InProcess:
    """The engine started in this process, on the catalogue and settings the server uses."""

    def __init__(self) -> None:
        from inference import worker

        self.engine = worker.get_engine()

    def stream(
        self, *, model: str, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> Iterator[Piece | End]:
        from inference.engine import Delta, Finished, GenerationRequest

        request = GenerationRequest(
            id=uuid.uuid4().hex,
            model_id=model,
            messages=messages,
            params=validated_params(model, params),
        )
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.engine.submit(request, events.put)
        stopping = False
        while True:
            try:
                event = events.get(timeout=0.1)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True  # the engine answers with Finished("stopped"), text kept
                self.engine.cancel(request.id)
                continue
            if isinstance(event, Delta):
                yield Piece(event.text)
            elif isinstance(event, Finished):
                yield End(
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                    event.error,
                )
                return

    def close(self) -> None:
        from inference import worker

        worker.stop_engine()


class ThroughServer:
    """The running server's gRPC service (`mlxweb.client`)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def stream(
        self, *, model: str, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> Iterator[Piece | End]:
        from mlxweb.client import ClientError, Delta, Finished, Started

        code = ""
        events = self.client.chat(model=model, messages=messages, **params)
        try:
            for event in events:
                if isinstance(event, Started):
                    code = event.code
                elif isinstance(event, Delta):
                    yield Piece(event.text, reasoning=event.channel == "reasoning")
                elif isinstance(event, Finished):
                    yield End(
                        event.finish_reason,
                        event.prompt_tokens,
                        event.completion_tokens,
                        event.error,
                    )
                    return
        except KeyboardInterrupt:
            if code:
                self.client.cancel(code)
            close = getattr(events, "close", None)
            if close is not None:
                close()
            yield End("stopped")
            return
        except ClientError as e:
            usage = e.code in ("NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED")
            raise CLIError(str(e), code=EXIT_USAGE if usage else EXIT_FAILURE) from None
        yield End("error", error="the server closed the stream before the reply ended")

    def close(self) -> None:
        self.client.close()


def validated_params(model: str, params: dict[str, Any]) -> Any:
    """The model's default sampling with `params` on top, as the server would use them."""
    from pydantic import ValidationError

    from inference.catalogue import UnknownModel
    from inference.services import generation_params

    try:
        return generation_params(model_id=model, overrides=params)
    except UnknownModel as e:
        raise CLIError(f"{e} (`mlxweb list` shows the models)", code=EXIT_USAGE) from None
    except ValidationError as e:
        raise CLIError(f"bad sampling values: {e}", code=EXIT_USAGE) from None


def choose_replies(args: argparse.Namespace) -> Replies:
    """The server when one answers and a key is at hand, else this process; says which."""
    reason = "--local"
    if not args.local:
        try:
            from mlxweb.client import Client, default_target
        except ImportError:
            reason = "this version has no gRPC client"
        else:
            target = args.target or default_target()
            api_key = args.api_key or os.environ.get("MLXWEB_API_KEY") or None
            client = Client(target, api_key=api_key)
            serving = client.is_serving()
            if serving and api_key:
                note(f"mlxweb: through the server at {target}")
                return ThroughServer(client)
            client.close()
            reason = (
                f"a server answers at {target}, but no API key is given "
                "(--api-key or MLXWEB_API_KEY)"
                if serving
                else f"no server answers at {target}"
            )
    note(f"mlxweb: in this process ({reason}); loading {args.model}")
    return InProcess()


# ---------------------------------------------------------------------------------------------
# The verb


@dataclass
class ChatState:
    """What the next turn is sent with."""

    model: str
    system: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns


def _run(args: argparse.Namespace, tokens: list[str]) -> int:
    state = ChatState(model=args.model, system=args.system)
    if args.preset:
        _use_preset(state, args.preset, announce=False)
    flags = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    state.params.update({k: v for k, v in flags.items() if v is not None})
    validated_params(state.model, state.params)  # a bad model or value fails before loading

    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    replies = choose_replies(args)
    try:
        if prompt is not None:
            return _answer_once(replies, state, prompt)
        return _chat(replies, state, user=args.user)
    finally:
        replies.close()


def _answer_once(replies: Replies, state: ChatState, prompt: str) -> int:
    state.turns.append({"role": "user", "content": prompt})
    _, end = _stream_reply(replies, state)
    if end.reason == "stopped":
        return EXIT_INTERRUPTED
    if end.reason not in FINISHED_WELL:
        raise CLIError(end.error or f"the reply ended: {end.reason}")
    note(f"{end.prompt_tokens} prompt tokens, {end.completion_tokens} tokens, {end.reason}")
    return EXIT_OK


def _stream_reply(replies: Replies, state: ChatState) -> tuple[str, End]:
    """Print the reply as it comes; returns its text and end."""
    out = sys.stdout
    text: list[str] = []
    end = End("error", error="no reply")
    for event in replies.stream(model=state.model, messages=state.messages(), params=state.params):
        if isinstance(event, Piece):
            if not event.reasoning:
                text.append(event.text)
            out.write(event.text)
            out.flush()
        else:
            end = event
    out.write("\n")
    out.flush()
    return "".join(text), end


def _chat(replies: Replies, state: ChatState, *, user: str | None) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print(f"Chatting with {state.model}. /help for commands, /exit or Ctrl-D to leave.")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return EXIT_OK
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(line, state, user=user):
                return EXIT_OK
            continue
        state.turns.append({"role": "user", "content": line})
        text, end = _stream_reply(replies, state)
        if end.reason not in FINISHED_WELL and end.reason != "stopped":
            print(f"error: {end.error or end.reason}", file=sys.stderr)
            state.turns.pop()  # the turn is not part of the conversation
            continue
        state.turns.append({"role": "assistant", "content": text})


def _command(line: str, state: ChatState, *, user: str | None) -> bool:
    """Run a /command; True to leave the chat."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return True
    if name == "/help":
        print(HELP)
    elif name == "/system":
        state.system = rest
        print("System prompt set." if rest else "System prompt cleared.")
    elif name == "/preset":
        if rest:
            try:
                _use_preset(state, rest, announce=True)
            except CLIError as e:
                print(f"error: {e}", file=sys.stderr)
        else:
            for preset in _presets().values():
                print(f"  {preset.name:<14} {preset.description}")
    elif name == "/save":
        try:
            conversation = save_conversation(state, username=user, title=rest)
        except CLIError as e:
            print(f"error: {e}", file=sys.stderr)
        else:
            from mlxweb.cli.server import server_url

            print(
                f"Saved as “{conversation.title}” for {conversation.user.get_username()}: "
                f"{server_url()}c/{conversation.code}/"
            )
    elif name == "/clear":
        state.turns.clear()
        print("Conversation cleared.")
    else:
        print(f"Unknown command {name}; /help lists them.", file=sys.stderr)
    return False


def _use_preset(state: ChatState, name: str, *, announce: bool) -> None:
    presets = _presets()
    if name not in presets:
        known = ", ".join(sorted(presets)) or "none"
        raise CLIError(f"no preset {name!r} (known: {known})", code=EXIT_USAGE)
    preset = presets[name]
    # The preset's values replace the sampling chosen so far; the model's defaults fill the rest.
    state.params = dict(preset.sampling)
    if preset.system:
        # Its placeholders ({date}, {time}, {user}, {model}) filled in as the chat page does.
        from inference.presets import render_system_prompt

        state.system = render_system_prompt(
            preset.system,
            now=datetime.now().astimezone(),
            user=getpass.getuser(),
            model=state.model,
        )
    if announce:
        values = ", ".join(f"{k} {v}" for k, v in preset.sampling.items())
        print(f"Preset {name}: {values or 'the model defaults'}.")


def save_conversation(state: ChatState, *, username: str | None, title: str = "") -> Any:
    """The chat so far as a conversation of `username` (default: the first admin)."""
    from django.contrib.auth import get_user_model

    from chat import services as chat
    from inference.schemas import ChatMessage

    users = get_user_model().objects
    if username:
        owner = users.filter(username=username).first()
        if owner is None:
            raise CLIError(f"no user {username!r}")
    else:
        owner = users.filter(is_superuser=True).order_by("pk").first()
        if owner is None:
            raise CLIError("no admin account yet (the first sign-up makes one): pass --user")
    if not state.turns:
        raise CLIError("nothing to save yet")
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in state.messages()]  # type: ignore[arg-type]
    try:
        return chat.conversation_import(
            user=owner, model_id=state.model, messages=messages, params=state.params, title=title
        )
    except chat.ChatError as e:
        raise CLIError(str(e)) from None
