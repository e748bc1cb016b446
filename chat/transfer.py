"""Export and import of conversations (issue 9).

Export: one conversation as Markdown (the branch shown, to read) or JSON (every branch as a tree,
the conversation's settings, each reply's timings, provenance and tool steps); all of a user's
conversations as one zip archive (the JSON of all of them plus a Markdown file each).

Import: our JSON (one conversation or the archive's list), ChatGPT's `conversations.json` (a list
of conversations, each a `mapping` tree of nodes), or a zip holding either. Everything is read
and checked before anything is written, and the writing is one transaction: a bad or foreign
file gets a clear error (`ImportRejected`) and imports nothing. Imported replies become finished
generations whose prompt is the path above them, so a next turn continues from them; a model id
that is not in this server's catalogue keeps its text and the default model answers from there
on (the report says so). Tool steps come back without their files (their paths belonged to the
other server's workspace, and a path in a file is never trusted).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Literal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Prefetch
from django.utils import timezone
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from chat.models import Conversation, Message, ToolStep
from chat.services import TITLE_LENGTH, conversation_path
from inference import services as inference
from inference.catalogue import UnknownModel
from inference.models import Generation
from inference.schemas import ChatMessage

FORMAT = "mlxweb.conversation"
ARCHIVE_FORMAT = "mlxweb.conversations"
FORMAT_VERSION = 1
ARCHIVE_JSON_NAME = "mlxweb-conversations.json"

# Limits of an import: the upload (the server's body limit for the import route follows it, see
# mlxweb.bodylimit), what a zip may unpack to, and how much one file may hold.
MAX_IMPORT_BYTES = 32 * 1024 * 1024
MAX_UNZIPPED_BYTES = 4 * MAX_IMPORT_BYTES
MAX_CONVERSATIONS = 2_000
MAX_MESSAGES = 20_000
MAX_TEXT_CHARS = 1_000_000

_TEXT = Field(default="", max_length=MAX_TEXT_CHARS)


class ImportRejected(Exception):
    """A file that cannot be imported; the message says why, and nothing was imported."""


@dataclass
class ImportReport:
    conversations: list[Conversation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# --- our format, as read back ----------------------------------------------------------------


class _Loose(BaseModel):
    # Fields this version does not know are ignored: exports of later versions still load.
    model_config = ConfigDict(extra="ignore")


class StepIn(_Loose):
    call_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)
    mutating: bool = False
    state: ToolStep.State = ToolStep.State.DONE
    ok: bool = False
    result: str = _TEXT
    data: dict[str, Any] = Field(default_factory=dict)
    files: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    created_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


class GenerationIn(_Loose):
    model_id: str = Field(max_length=100)
    state: Generation.State = Generation.State.COMPLETE
    finish_reason: Generation.FinishReason | Literal[""] = ""
    error: str = Field(default="", max_length=Generation.MAX_ERROR_LENGTH)
    text: str = _TEXT
    content: str = _TEXT
    reasoning: str = _TEXT
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)
    prompt_tokens: int = Field(default=0, ge=0, le=10**9)
    cached_tokens: int = Field(default=0, ge=0, le=10**9)
    completion_tokens: int = Field(default=0, ge=0, le=10**9)
    trimmed_messages: int = Field(default=0, ge=0, le=10**9)
    provenance: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    # Only on a branch's first reply: the system prompt it was sent ("" for none).
    system_prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    created_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = None
    first_token_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


class MessageIn(_Loose):
    id: str = Field(min_length=1, max_length=100)
    parent: str | None = Field(default=None, max_length=100)
    role: Message.Role
    content: str = _TEXT
    created_at: AwareDatetime | None = None
    generation: GenerationIn | None = None
    tool_steps: list[StepIn] = Field(default_factory=list, max_length=100)


class ConversationIn(_Loose):
    title: str = Field(default="", max_length=200)
    model_id: str = Field(max_length=100)
    created_at: AwareDatetime | None = None
    updated_at: AwareDatetime | None = None
    pinned: bool = False
    title_edited: bool = False
    preset: str = Field(default="", max_length=100)
    system_prompt: str = _TEXT
    params: dict[str, Any] = Field(default_factory=dict)
    tools_enabled: bool = False
    allowed_tools: list[str] = Field(default_factory=list, max_length=100)
    leaf: str | None = Field(default=None, max_length=100)
    messages: list[MessageIn] = Field(max_length=MAX_MESSAGES)


class ExportIn(_Loose):
    format: Literal["mlxweb.conversation"]
    version: int
    conversation: ConversationIn


class ArchiveIn(_Loose):
    format: Literal["mlxweb.conversations"]
    version: int
    conversations: list[ConversationIn] = Field(max_length=MAX_CONVERSATIONS)


# --- ChatGPT's conversations.json ------------------------------------------------------------


class GptAuthor(_Loose):
    role: str = Field(max_length=32)


class GptContent(_Loose):
    content_type: str = Field(max_length=64)
    parts: list[Any] | None = Field(default=None, max_length=1000)
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


class GptMessage(_Loose):
    author: GptAuthor
    content: GptContent | None = None
    create_time: float | None = None
    recipient: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class GptNode(_Loose):
    id: str = Field(max_length=100)
    message: GptMessage | None = None
    parent: str | None = Field(default=None, max_length=100)
    children: list[str] = Field(default_factory=list)


class GptConversation(_Loose):
    title: str | None = None
    create_time: float | None = None
    update_time: float | None = None
    mapping: dict[str, GptNode] = Field(max_length=MAX_MESSAGES)
    current_node: str | None = None


# --- export ----------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _messages_for_export(conversation: Conversation) -> list[Message]:
    return list(
        conversation.messages.select_related("generation")
        .prefetch_related(Prefetch("tool_steps", queryset=ToolStep.objects.order_by("id")))
        .order_by("id")
    )


def _generation_dict(generation: Generation) -> dict[str, Any]:
    return {
        "model_id": generation.model_id,
        "state": generation.state,
        "finish_reason": generation.finish_reason,
        "error": generation.error,
        "text": generation.text,
        "content": generation.content,
        "reasoning": generation.reasoning,
        "tool_calls": generation.tool_calls,
        "params": generation.params,
        "prompt_tokens": generation.prompt_tokens,
        "cached_tokens": generation.cached_tokens,
        "completion_tokens": generation.completion_tokens,
        "trimmed_messages": generation.trimmed_messages,
        "ttft_ms": generation.ttft_ms,
        "tokens_per_second": generation.tokens_per_second,
        "provenance": generation.provenance,
        "details": generation.details,
        "created_at": _iso(generation.created_at),
        "started_at": _iso(generation.started_at),
        "first_token_at": _iso(generation.first_token_at),
        "finished_at": _iso(generation.finished_at),
    }


def _step_dict(step: ToolStep) -> dict[str, Any]:
    return {
        "call_id": step.call_id,
        "name": step.name,
        "arguments": step.arguments,
        "mutating": step.mutating,
        "state": step.state,
        "ok": step.ok,
        "result": step.result,
        "data": step.data,
        # Names and types only: the paths are this server's workspace.
        "files": [{"name": f.get("name", ""), "mime": f.get("mime", "")} for f in step.files],
        "created_at": _iso(step.created_at),
        "finished_at": _iso(step.finished_at),
    }


def _at_root(message: Message, by_pk: dict[int, Message]) -> bool:
    """Whether `message` answers a first message (its prompt starts the conversation)."""
    parent = by_pk.get(message.parent_id) if message.parent_id is not None else None
    return parent is not None and parent.parent_id is None


def conversation_dict(conversation: Conversation) -> dict[str, Any]:
    """The conversation with every branch: messages in the order they were written (a parent
    before its children), each naming its parent by id."""
    messages = []
    for message in _messages_for_export(conversation):
        item: dict[str, Any] = {
            "id": str(message.code),
            "parent": None,
            "role": message.role,
            "created_at": _iso(message.created_at),
        }
        messages.append((message, item))
    codes = {m.pk: str(m.code) for m, _ in messages}
    by_pk = {m.pk: m for m, _ in messages}
    out = []
    for message, item in messages:
        item["parent"] = codes.get(message.parent_id) if message.parent_id else None
        if message.role == Message.Role.USER:
            item["content"] = message.content
        else:
            generation = message.generation
            item["generation"] = _generation_dict(generation) if generation is not None else None
            if generation is not None and _at_root(message, by_pk):
                # The system prompt as this branch's first reply was sent it (placeholders
                # filled in), so that an import builds the very same prompt.
                first = generation.prompt_messages()[:1]
                item["generation"]["system_prompt"] = (
                    first[0]["content"] if first and first[0]["role"] == "system" else ""
                )
            item["tool_steps"] = [_step_dict(s) for s in message.tool_steps.all()]
        out.append(item)
    return {
        "id": str(conversation.code),
        "title": conversation.title,
        "model_id": conversation.model_id,
        "created_at": _iso(conversation.created_at),
        "updated_at": _iso(conversation.updated_at),
        "pinned": conversation.pinned,
        "title_edited": conversation.title_edited,
        "preset": conversation.preset,
        "system_prompt": conversation.system_prompt,
        "params": conversation.params,
        "tools_enabled": conversation.tools_enabled,
        "allowed_tools": conversation.allowed_tools,
        "leaf": codes.get(conversation.leaf_id) if conversation.leaf_id else None,
        "messages": out,
    }


def conversation_json(conversation: Conversation) -> bytes:
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "exported_at": timezone.now().isoformat(),
        "conversation": conversation_dict(conversation),
    }
    return json.dumps(document, ensure_ascii=False, indent=1).encode()


def _fence(text: str, info: str = "") -> str:
    """`text` in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{info}\n{text}\n{ticks}"


def conversation_markdown(conversation: Conversation) -> str:
    """The branch shown, to read: the user's messages and the replies' answers, with their
    reasoning and tool steps."""
    lines = [f"# {conversation.title}", ""]
    lines.append(f"- Model: {conversation.model_id}")
    lines.append(f"- Created: {conversation.created_at:%Y-%m-%d %H:%M} UTC")
    if conversation.preset:
        lines.append(f"- Preset: {conversation.preset}")
    if conversation.params:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(conversation.params.items()))
        lines.append(f"- Settings: {settings}")
    lines.append("")
    if conversation.system_prompt:
        lines += ["## System prompt", "", conversation.system_prompt, ""]
    path = conversation_path(conversation)
    by_message: dict[int, list[ToolStep]] = {}
    for step in ToolStep.objects.filter(message__in=[m.pk for m in path]).order_by("id"):
        by_message.setdefault(step.message_id, []).append(step)
    for message in path:
        if message.role == Message.Role.USER:
            lines += ["## User", "", message.content, ""]
            continue
        generation = message.generation
        heading = "## Assistant"
        if generation is not None:
            heading += f" ({generation.model_id})"
        lines += [heading, ""]
        if generation is None:
            lines += ["*(reply deleted)*", ""]
            continue
        if generation.reasoning:
            quoted = "\n".join(f"> {line}" for line in generation.reasoning.splitlines())
            lines += ["> **Thinking**", ">", quoted, ""]
        answer = generation.content or generation.text
        if answer:
            lines += [answer, ""]
        for step in by_message.get(message.pk, []):
            lines += [
                f"**Tool call: {step.name}** ({step.get_state_display()})",
                "",
                _fence(json.dumps(step.arguments, ensure_ascii=False, indent=2), "json"),
                "",
            ]
            if step.result:
                lines += [_fence(step.result), ""]
        if generation.state != Generation.State.COMPLETE:
            lines += [f"*({generation.get_state_display().lower()})*", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_filename(conversation: Conversation, extension: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", conversation.title).strip("-").lower()[:40] or "chat"
    return f"{conversation.created_at:%Y-%m-%d}-{slug}-{conversation.code.hex[:8]}.{extension}"


def archive_write(*, user: AbstractBaseUser, out: IO[bytes]) -> int:
    """All of `user`'s conversations as a zip: `mlxweb-conversations.json` (importable) and one
    Markdown file per conversation. Returns how many conversations it holds."""
    conversations = list(Conversation.objects.filter(user_id=user.pk).order_by("id"))
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        document = {
            "format": ARCHIVE_FORMAT,
            "version": FORMAT_VERSION,
            "exported_at": timezone.now().isoformat(),
            "conversations": [conversation_dict(c) for c in conversations],
        }
        archive.writestr(ARCHIVE_JSON_NAME, json.dumps(document, ensure_ascii=False, indent=1))
        for conversation in conversations:
            archive.writestr(
                f"markdown/{export_filename(conversation, 'md')}",
                conversation_markdown(conversation),
            )
    return len(conversations)


# --- import: reading -------------------------------------------------------------------------


@dataclass
class _Node:
    key: str
    parent: str | None
    role: str
    content: str = ""
    created_at: datetime | None = None
    generation: GenerationIn | None = None
    steps: list[StepIn] = field(default_factory=list)


@dataclass
class _Draft:
    """A conversation read and checked, not yet written."""

    title: str
    model_id: str
    nodes: list[_Node]  # parents before children
    leaf: str | None
    source: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _describe(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    where = prefix
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    return f"{where.lstrip('.') or 'the file'}: {first['msg']}"


def _read_bytes(data: bytes) -> Any:
    if len(data) > MAX_IMPORT_BYTES:
        raise ImportRejected(
            f"The file is too big: at most {MAX_IMPORT_BYTES // (1024 * 1024)} MiB can be imported."
        )
    if data[:4] == b"PK\x03\x04":
        data = _unzip(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ImportRejected("The file is not JSON text (it is not UTF-8).") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ImportRejected(
            f"The file is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})."
        ) from e
    except RecursionError as e:
        raise ImportRejected("The file's JSON is nested too deeply.") from e


def _unzip(data: bytes) -> bytes:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise ImportRejected("The file looks like a zip archive but cannot be read.") from e
    with archive:
        names = {info.filename.rsplit("/", 1)[-1]: info for info in archive.infolist()}
        info = names.get(ARCHIVE_JSON_NAME) or names.get("conversations.json")
        if info is None:
            raise ImportRejected(
                f"The zip archive holds neither {ARCHIVE_JSON_NAME} (an mlxweb export) nor "
                "conversations.json (a ChatGPT export)."
            )
        if info.file_size > MAX_UNZIPPED_BYTES:
            raise ImportRejected(
                f"{info.filename} is too big unpacked: at most "
                f"{MAX_UNZIPPED_BYTES // (1024 * 1024)} MiB."
            )
        try:
            with archive.open(info) as member:
                content = member.read(MAX_UNZIPPED_BYTES + 1)
        except (zipfile.BadZipFile, OSError, NotImplementedError) as e:
            raise ImportRejected(f"{info.filename} cannot be unpacked ({e}).") from e
        if len(content) > MAX_UNZIPPED_BYTES:
            raise ImportRejected(f"{info.filename} is too big unpacked.")
        return content


def read_file(data: bytes) -> list[_Draft]:
    """The conversations of an uploaded file, read and checked; ImportRejected says what is
    wrong with a file that is not ours or ChatGPT's, or is broken."""
    document = _read_bytes(data)
    drafts: list[_Draft]
    if isinstance(document, dict) and document.get("format") in (FORMAT, ARCHIVE_FORMAT):
        version = document.get("version")
        if not isinstance(version, int) or version < 1:
            raise ImportRejected("version: an mlxweb export names its format version (1).")
        if version > FORMAT_VERSION:
            raise ImportRejected(
                f"This export is format version {version}, from a newer mlxweb; this one reads "
                f"version {FORMAT_VERSION}."
            )
        try:
            if document["format"] == FORMAT:
                conversations = [ExportIn.model_validate(document).conversation]
            else:
                conversations = ArchiveIn.model_validate(document).conversations
        except ValidationError as e:
            raise ImportRejected(f"Not a valid mlxweb export: {_describe(e, '')}.") from e
        drafts = [_draft_from_ours(c, i) for i, c in enumerate(conversations)]
    elif _looks_like_chatgpt(document):
        items = document if isinstance(document, list) else [document]
        if len(items) > MAX_CONVERSATIONS:
            raise ImportRejected(f"At most {MAX_CONVERSATIONS} conversations per import.")
        drafts = []
        for i, item in enumerate(items):
            try:
                conversation = GptConversation.model_validate(item)
            except ValidationError as e:
                raise ImportRejected(
                    f"Not a valid ChatGPT export: {_describe(e, f'[{i}]')}."
                ) from e
            draft = _draft_from_chatgpt(conversation, i)
            if draft is not None:
                drafts.append(draft)
    else:
        raise ImportRejected(
            'This file is neither an mlxweb export (JSON with "format": '
            f'"{FORMAT}") nor ChatGPT\'s conversations.json.'
        )
    if not drafts:
        raise ImportRejected("The file holds no conversation with a message to import.")
    total = sum(len(d.nodes) for d in drafts)
    if total > MAX_MESSAGES:
        raise ImportRejected(f"The file holds {total} messages; at most {MAX_MESSAGES} per import.")
    return drafts


def _looks_like_chatgpt(document: Any) -> bool:
    items = document if isinstance(document, list) else [document]
    return bool(items) and all(isinstance(i, dict) and "mapping" in i for i in items)


def _draft_from_ours(conversation: ConversationIn, index: int) -> _Draft:
    where = f"conversation {index + 1}"
    seen: dict[str, MessageIn] = {}
    nodes: list[_Node] = []
    for message in conversation.messages:
        if message.id in seen:
            raise ImportRejected(f"{where}: the message id {message.id!r} appears twice.")
        if message.parent is not None:
            parent = seen.get(message.parent)
            if parent is None:
                raise ImportRejected(
                    f"{where}: message {message.id!r} follows {message.parent!r}, which is not "
                    "an earlier message of this conversation."
                )
        elif message.role != Message.Role.USER:
            raise ImportRejected(f"{where}: the first message of a branch must be the user's.")
        generation = message.generation
        if message.role == Message.Role.ASSISTANT and generation is None:
            # A reply whose record was deleted before the export: kept as a failed reply, so
            # that what hangs below it still has its place.
            generation = GenerationIn(
                model_id=conversation.model_id,
                state=Generation.State.ERROR,
                finish_reason=Generation.FinishReason.ERROR,
                error="The reply was gone when the conversation was exported.",
            )
        seen[message.id] = message
        nodes.append(
            _Node(
                key=message.id,
                parent=message.parent,
                role=message.role,
                content=message.content,
                created_at=message.created_at,
                generation=generation,
                steps=message.tool_steps,
            )
        )
    if not nodes:
        raise ImportRejected(f"{where} has no messages.")
    if conversation.leaf is not None and conversation.leaf not in seen:
        raise ImportRejected(
            f"{where}: the branch shown ends at {conversation.leaf!r}, which is not one of its "
            "messages."
        )
    return _Draft(
        title=conversation.title,
        model_id=conversation.model_id,
        nodes=nodes,
        leaf=conversation.leaf,
        source="mlxweb",
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        settings={
            "pinned": conversation.pinned,
            "title_edited": conversation.title_edited,
            "preset": conversation.preset,
            "system_prompt": conversation.system_prompt,
            "params": conversation.params,
            "tools_enabled": conversation.tools_enabled,
            "allowed_tools": [t[:64] for t in conversation.allowed_tools if isinstance(t, str)],
        },
    )


def _epoch(value: float | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _gpt_text(message: GptMessage) -> str:
    content = message.content
    if content is None or content.content_type not in ("text", "multimodal_text"):
        return ""
    if content.parts is None:
        return content.text or ""
    pieces = []
    for part in content.parts:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict):
            pieces.append("[attachment not imported]")
    text = "\n".join(p for p in pieces if p).strip()
    if len(text) > MAX_TEXT_CHARS:
        raise ImportRejected(f"A message has more than {MAX_TEXT_CHARS} characters.")
    return text


def _draft_from_chatgpt(conversation: GptConversation, index: int) -> _Draft | None:
    """The visible user and assistant messages of a ChatGPT conversation, as a tree: hidden,
    system and tool nodes (and empty ones) are left out, their children hang from the nearest
    message kept above them."""
    where = f"conversation {index + 1} ({conversation.title or 'untitled'})"
    mapping = conversation.mapping
    for key, node in mapping.items():
        if node.id != key:
            raise ImportRejected(f"{where}: node {key!r} names itself {node.id!r}.")
        if node.parent is not None and node.parent not in mapping:
            raise ImportRejected(
                f"{where}: node {key!r} hangs from {node.parent!r}, which is not in its mapping."
            )
    children: dict[str | None, list[str]] = {}
    for key, node in mapping.items():
        children.setdefault(node.parent, []).append(key)
    # Walk from the roots (parents before children); a node never reached is in a cycle.
    order: list[str] = []
    stack = list(reversed(children.get(None, [])))
    while stack:
        key = stack.pop()
        order.append(key)
        stack.extend(reversed(children.get(key, [])))
    if len(order) != len(mapping):
        raise ImportRejected(f"{where}: its mapping has a cycle (a node above itself).")

    kept: dict[str, str | None] = {}  # node id -> the kept node it stands for (itself or above)
    has_user_above: dict[str, bool] = {}
    nodes: list[_Node] = []
    system_prompt = ""
    model_slug = ""
    for key in order:
        node = mapping[key]
        above = kept.get(node.parent) if node.parent is not None else None
        user_above = has_user_above.get(node.parent, False) if node.parent is not None else False
        kept[key], has_user_above[key] = above, user_above
        message = node.message
        if message is None:
            continue
        role = message.author.role
        hidden = bool(message.metadata.get("is_visually_hidden_from_conversation"))
        text = _gpt_text(message)
        if role == "system" and not hidden and text and not system_prompt and not nodes:
            system_prompt = text
        if role not in ("user", "assistant") or hidden or not text:
            continue
        if role == "assistant" and (message.recipient not in (None, "all") or not user_above):
            continue
        slug = str(message.metadata.get("model_slug") or "")
        if role == "assistant" and slug:
            model_slug = slug
        generation = None
        if role == "assistant":
            generation = GenerationIn(
                model_id=slug[:100] or "chatgpt",
                text=text,
                content=text,
                provenance={"imported_from": "chatgpt", "model": slug} if slug else {},
                created_at=_epoch(message.create_time),
                finished_at=_epoch(message.create_time),
            )
        nodes.append(
            _Node(
                key=key,
                parent=above,
                role=role,
                content=text if role == "user" else "",
                created_at=_epoch(message.create_time),
                generation=generation,
            )
        )
        kept[key] = key
        has_user_above[key] = user_above or role == "user"
    if not nodes:
        return None
    leaf = kept.get(conversation.current_node) if conversation.current_node else None
    if conversation.current_node is not None and conversation.current_node not in mapping:
        raise ImportRejected(
            f"{where}: current_node {conversation.current_node!r} is not in its mapping."
        )
    return _Draft(
        title=(conversation.title or "").strip()[:200],
        model_id=model_slug or "chatgpt",
        nodes=nodes,
        leaf=leaf or nodes[-1].key,
        source="chatgpt",
        created_at=_epoch(conversation.create_time),
        updated_at=_epoch(conversation.update_time),
        settings={"system_prompt": system_prompt},
    )


# --- import: writing -------------------------------------------------------------------------


def _title(draft: _Draft) -> str:
    if draft.title.strip():
        return " ".join(draft.title.split())[:200]
    first = next((n.content for n in draft.nodes if n.role == "user"), "")
    line = " ".join(first.split())
    return (line[:TITLE_LENGTH] + "…" if len(line) > TITLE_LENGTH else line) or "Imported chat"


class _Models:
    """Model ids of the file, as this server can serve them: itself, or the default model."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        self.cache: dict[str, str] = {}
        self.default = inference.default_model_id()

    def __call__(self, model_id: str) -> str:
        if model_id not in self.cache:
            try:
                spec = inference.model_get(model_id=model_id)
                usable = getattr(spec, "task", "generate") == "generate"
            except UnknownModel:
                usable = False
            self.cache[model_id] = model_id if usable else self.default
            if not usable:
                self.report.note(
                    f"The model {model_id!r} is not on this server: its replies are kept as "
                    f"text, and the conversation continues with {self.default!r}."
                )
        return self.cache[model_id]


def _params(model_id: str, values: dict[str, Any], report: ImportReport, what: str) -> Any:
    try:
        return inference.generation_params(model_id=model_id, overrides=values)
    except (ValidationError, ValueError, TypeError):
        report.note(f"Some {what} did not fit {model_id!r} here and were reset to its defaults.")
        return inference.generation_params(model_id=model_id)


_PENDING = {s.value for s in ToolStep.PENDING_STATES}


def _write(
    user: AbstractBaseUser, draft: _Draft, models: _Models, report: ImportReport
) -> Conversation:
    model_id = models(draft.model_id)
    settings = dict(draft.settings)
    if settings.get("params"):
        params = _params(model_id, settings["params"], report, "conversation settings")
        chosen = set(settings["params"])
        settings["params"] = {k: v for k, v in params.model_dump().items() if k in chosen}
    now = timezone.now()
    conversation = Conversation.objects.create(
        user_id=user.pk,
        model_id=model_id,
        title=_title(draft),
        created_at=draft.created_at or now,
        updated_at=draft.updated_at or draft.created_at or now,
        **settings,
    )
    system = conversation.system_prompt
    conversation.user = user  # type: ignore[assignment]
    written: dict[str, Message] = {}
    steps_of: dict[int, list[StepIn]] = {}
    for node in draft.nodes:
        parent = written[node.parent] if node.parent is not None else None
        if node.role == Message.Role.USER:
            message = Message.objects.create(
                conversation=conversation,
                role=Message.Role.USER,
                content=node.content,
                parent=parent,
                created_at=node.created_at or now,
            )
        else:
            message = _write_reply(conversation, node, parent, steps_of, models, report, system)
            steps_of[message.pk] = node.steps
        written[node.key] = message
    leaf = written[draft.leaf] if draft.leaf is not None else list(written.values())[-1]
    Conversation.objects.filter(pk=conversation.pk).update(leaf=leaf)
    conversation.leaf = leaf
    return conversation


def _write_reply(
    conversation: Conversation,
    node: _Node,
    parent: Message | None,
    steps_of: dict[int, list[StepIn]],
    models: _Models,
    report: ImportReport,
    system: str,
) -> Message:
    source = node.generation
    assert source is not None  # checked when read
    # The prompt: the user's messages since the last reply above (or since the start), after
    # that reply's prompt and text; a reply right after a reply continues its tool round.
    pending: list[ChatMessage] = []
    previous: Generation | None = None
    above = parent
    while above is not None and above.role == Message.Role.USER:
        pending.insert(0, ChatMessage(role="user", content=above.content))
        above = above.parent
    if above is not None:
        previous = above.generation
        if not pending:
            steps = steps_of.get(above.pk, [])
            pending = [
                ChatMessage(role="tool", content=s.result, tool_call_id=s.call_id, name=s.name)
                for s in steps
            ]
    else:
        # The system prompt the original reply was sent, when the file says; else the
        # conversation's own.
        sent = source.system_prompt if source.system_prompt is not None else system
        if sent:
            pending.insert(0, ChatMessage(role="system", content=sent))
    model_id = models(source.model_id)
    params = _params(model_id, source.params, report, "reply settings")
    finish_reason = source.finish_reason or (
        Generation.FinishReason.INTERRUPTED
        if source.state in Generation.ACTIVE_STATES
        else Generation.FinishReason.EOS
    )
    if not pending and previous is None:
        raise ImportRejected("A reply must follow a user message.")
    generation = inference.generation_record(
        model_id=model_id,
        messages=pending,
        text=source.text,
        params=params,
        previous=previous,
        user=conversation.user,
        finish_reason=finish_reason,
        prompt_tokens=source.prompt_tokens,
        completion_tokens=source.completion_tokens,
    )
    provenance = dict(source.provenance)
    if model_id != source.model_id:
        provenance.setdefault("imported_model_id", source.model_id)
    values: dict[str, Any] = {
        "content": source.content if source.content or source.tool_calls else source.text,
        "reasoning": source.reasoning,
        "tool_calls": source.tool_calls,
        "error": source.error,
        "cached_tokens": source.cached_tokens,
        "trimmed_messages": source.trimmed_messages,
        "provenance": provenance,
        "details": source.details,
        "started_at": source.started_at,
        "first_token_at": source.first_token_at,
    }
    if source.created_at is not None:
        values["created_at"] = source.created_at
    if source.finished_at is not None:
        values["finished_at"] = source.finished_at
    Generation.objects.filter(pk=generation.pk).update(**values)
    for name, value in values.items():  # the next reply's prompt reads this object
        setattr(generation, name, value)
    message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent=parent,
        created_at=node.created_at or source.created_at or timezone.now(),
    )
    for step in node.steps:
        if step.files:
            report.note("Files made by tool calls are not imported; their steps are.")
        state = ToolStep.State.STOPPED if step.state in _PENDING else step.state
        ToolStep.objects.create(
            message=message,
            call_id=step.call_id,
            name=step.name,
            arguments=step.arguments,
            mutating=step.mutating,
            state=state,
            ok=step.ok,
            result=step.result,
            data=step.data,
            files=[],
            created_at=step.created_at or timezone.now(),
            finished_at=step.finished_at or (timezone.now() if state != step.state else None),
        )
    return message


def import_file(*, user: AbstractBaseUser, data: bytes) -> ImportReport:
    """Import every conversation of an uploaded file for `user`, all or nothing."""
    drafts = read_file(data)
    report = ImportReport()
    try:
        with transaction.atomic():
            models = _Models(report)
            for draft in drafts:
                report.conversations.append(_write(user, draft, models, report))
    except (ValidationError, ValueError) as e:
        raise ImportRejected(f"The file could not be imported: {e}") from e
    return report


def imported_count(report: ImportReport) -> str:
    n = len(report.conversations)
    return f"Imported {n} conversation{'s' if n != 1 else ''}."
