"""Export and import of conversations (chat.transfer, chat.views_transfer): our JSON round trip
with branches, settings, timings, provenance and tool steps; ChatGPT's conversations.json; bad
and foreign files (a clear error, nothing imported); owners only; CSRF."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from chat import search, services, transfer
from chat.models import Conversation, Message, ToolStep
from inference import services as inference
from inference.models import Generation
from inference.schemas import ChatMessage

MODEL = "smollm2-135m-instruct"
FIXTURE = Path(__file__).parent / "fixtures" / "chatgpt_conversations.json"
SENT_SYSTEM = "Be brief. Today is 2026-11-27."


@pytest.fixture(autouse=True)
def no_worker(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr("inference.services._send", lambda ch, msg: sent.append((ch, msg)))
    return sent


def _generation(
    owner: User, text: str, *, previous: Generation | None, user_text: str, **kw: Any
) -> Generation:
    params = inference.generation_params(model_id=MODEL, overrides={"temperature": 0.3})
    # A branch's first reply was sent the system prompt, rendered (its {date} filled in).
    system = [ChatMessage(role="system", content=SENT_SYSTEM)] if previous is None else []
    generation = inference.generation_record(
        model_id=MODEL,
        messages=[*system, ChatMessage(role="user", content=user_text)],
        text=text,
        params=params,
        previous=previous,
        user=owner,
    )
    Generation.objects.filter(pk=generation.pk).update(**kw)
    generation.refresh_from_db()
    return generation


@pytest.fixture
def branched(owner: User, models_root: Path) -> Conversation:
    """Q1 -> (A1 | A2 regenerated); A1 -> Q2 -> B (with a tool step); Q1' (edited) -> C.
    The branch shown ends at B."""
    now = timezone.now()
    conversation = Conversation.objects.create(
        user=owner,
        model_id=MODEL,
        title="Branches & <things>",
        preset="balanced",
        system_prompt="Be brief. Today is {date}.",
        params={"temperature": 0.3},
        pinned=True,
        title_edited=True,
    )
    q1 = Message.objects.create(conversation=conversation, role="user", content="First question")
    g1 = _generation(
        owner,
        "<think>hmm</think>Answer one",
        previous=None,
        user_text="First question",
        content="Answer one",
        reasoning="hmm",
        provenance={"model": MODEL, "seed": 7, "mlx": "0.30"},
        prompt_tokens=12,
        completion_tokens=5,
        created_at=now - timedelta(seconds=3),
        first_token_at=now - timedelta(seconds=2),
        finished_at=now - timedelta(seconds=1),
    )
    a1 = Message.objects.create(
        conversation=conversation, role="assistant", generation=g1, parent=q1
    )
    g2 = _generation(owner, "Answer one, again", previous=None, user_text="First question")
    Message.objects.create(conversation=conversation, role="assistant", generation=g2, parent=q1)
    q2 = Message.objects.create(conversation=conversation, role="user", content="Second", parent=a1)
    g3 = _generation(
        owner,
        "Looked it up: 42",
        previous=g1,
        user_text="Second",
        finish_reason="tool_calls",
        tool_calls=[{"id": "call_1", "name": "python", "arguments": '{"code": "6*7"}'}],
    )
    b = Message.objects.create(
        conversation=conversation, role="assistant", generation=g3, parent=q2
    )
    ToolStep.objects.create(
        message=b,
        call_id="call_1",
        name="python",
        arguments={"code": "6*7"},
        mutating=True,
        state=ToolStep.State.DONE,
        ok=True,
        result="42",
        files=[{"name": "plot.png", "mime": "image/png", "path": "/etc/passwd"}],
        finished_at=now,
    )
    q1b = Message.objects.create(conversation=conversation, role="user", content="First, edited")
    g4 = _generation(owner, "Answer to the edit", previous=None, user_text="First, edited")
    Message.objects.create(conversation=conversation, role="assistant", generation=g4, parent=q1b)
    Conversation.objects.filter(pk=conversation.pk).update(leaf=b)
    conversation.refresh_from_db()
    return conversation


def _tree(conversation: Conversation) -> list[tuple[Any, ...]]:
    """The conversation's messages as comparable rows: role, text, parent's index, details."""
    messages = list(conversation.messages.select_related("generation").order_by("id"))
    index = {m.pk: i for i, m in enumerate(messages)}
    rows = []
    for m in messages:
        g = m.generation
        gen = (
            (
                g.model_id,
                g.state,
                g.finish_reason,
                g.text,
                g.content,
                g.reasoning,
                g.tool_calls,
                g.prompt_tokens,
                g.completion_tokens,
                g.provenance,
                g.ttft_ms,
                g.params.get("temperature"),
            )
            if g is not None
            else None
        )
        steps = [
            (s.call_id, s.name, s.arguments, s.state, s.result, s.ok) for s in m.tool_steps.all()
        ]
        parent = index[m.parent_id] if m.parent_id is not None else None
        rows.append((m.role, m.content, parent, gen, steps))
    return rows


def _settings(c: Conversation) -> tuple[Any, ...]:
    return (c.title, c.model_id, c.preset, c.system_prompt, c.params, c.pinned, c.title_edited)


@pytest.mark.django_db
def test_json_round_trip_keeps_the_tree_texts_settings_and_details(
    owner: User, branched: Conversation
) -> None:
    data = transfer.conversation_json(branched)
    document = json.loads(data)
    assert document["format"] == "mlxweb.conversation" and document["version"] == 1
    reply = next(m for m in document["conversation"]["messages"] if m.get("tool_steps"))
    assert reply["tool_steps"][0]["files"] == [{"name": "plot.png", "mime": "image/png"}]
    assert reply["generation"]["tool_calls"][0]["name"] == "python"

    report = transfer.import_file(user=owner, data=data)
    assert report.notes == ["Files made by tool calls are not imported; their steps are."]
    [copy] = report.conversations
    copy.refresh_from_db()
    assert copy.code != branched.code
    assert _settings(copy) == _settings(branched)
    assert _tree(copy) == _tree(branched)
    # The branch shown is the same one, and the file's paths were not trusted.
    shown = [m.text for m in services.conversation_path(copy)]
    assert shown == [m.text for m in services.conversation_path(branched)]
    assert ToolStep.objects.get(message__conversation=copy).files == []
    # Each imported reply's prompt is the path above it, as the model saw it.
    leaf = Message.objects.select_related("generation").get(pk=copy.leaf.pk)  # type: ignore[union-attr]
    assert leaf.generation is not None
    prompt = [(m["role"], m["content"]) for m in leaf.generation.prompt_messages()]
    assert prompt == [
        ("system", SENT_SYSTEM),
        ("user", "First question"),
        ("assistant", "Answer one"),
        ("user", "Second"),
    ]
    original = Message.objects.select_related("generation").get(pk=branched.leaf.pk)  # type: ignore[union-attr]
    assert original.generation is not None
    assert leaf.generation.prompt_messages() == original.generation.prompt_messages()
    # And exporting the copy gives the same document, ids and export time aside.
    again = json.loads(transfer.conversation_json(copy))["conversation"]
    original = document["conversation"]
    for doc in (again, original):
        ids = {m["id"]: i for i, m in enumerate(doc["messages"])}
        doc["leaf"] = ids[doc["leaf"]]
        for m in doc["messages"]:
            m["id"] = ids[m["id"]]
            m["parent"] = ids.get(m["parent"])
            for step in m.get("tool_steps", []):
                step["files"] = []
        del doc["id"]
    assert again == original


@pytest.mark.django_db
def test_a_reply_whose_record_was_deleted_exports_and_imports_as_a_failed_reply(
    owner: User, branched: Conversation
) -> None:
    regenerated = Message.objects.get(conversation=branched, generation__text="Answer one, again")
    Generation.objects.filter(message=regenerated).delete()  # the message keeps its place
    [copy] = transfer.import_file(
        user=owner, data=transfer.conversation_json(branched)
    ).conversations
    failed = Message.objects.select_related("generation").get(
        conversation=copy, generation__state=Generation.State.ERROR
    )
    assert failed.generation is not None and failed.generation.text == ""
    assert "gone when the conversation was exported" in failed.generation.error
    assert copy.messages.count() == branched.messages.count()


@pytest.mark.django_db
def test_an_imported_conversation_continues_from_its_replies(
    owner: User,
    branched: Conversation,
    no_worker: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    [copy] = transfer.import_file(
        user=owner, data=transfer.conversation_json(branched)
    ).conversations
    with django_capture_on_commit_callbacks(execute=True):
        _, reply = services.message_send(conversation=copy, text="Third")
    assert reply.generation is not None
    prompt = [(m["role"], m["content"]) for m in reply.generation.prompt_messages()]
    assert prompt[-3:] == [("user", "Second"), ("assistant", "Looked it up: 42"), ("user", "Third")]
    assert ("user", "First question") in prompt
    assert any(msg["type"] == "generation.start" for _, msg in no_worker)


@pytest.mark.django_db
def test_chatgpt_export_imports_branches_and_leaves_out_hidden_and_tool_nodes(
    owner: User, models_root: Path
) -> None:
    report = transfer.import_file(user=owner, data=FIXTURE.read_bytes())
    capitals, picture = report.conversations
    assert any("'gpt-4o' is not on this server" in n and MODEL in n for n in report.notes)
    capitals.refresh_from_db()
    assert capitals.title == "Capital cities"
    assert capitals.model_id == MODEL
    assert capitals.created_at.timestamp() == 1700000000.0
    assert capitals.system_prompt == ""  # the hidden system node is not a prompt
    rows = _tree(capitals)
    texts = [(role, content or (gen and gen[3]), parent) for role, content, parent, gen, _ in rows]
    assert texts == [
        ("user", "What is the capital of France?", None),
        ("assistant", "Paris is the capital of France.", 0),
        ("user", "And of Germany? Check with code.", 1),
        # The code call and its tool output are left out; the answer hangs from the question.
        ("assistant", "Berlin is the capital of Germany.", 2),
        # The edited first question: a second root, a sibling of the first.
        ("user", "What is the capital of Spain?", None),
        ("assistant", "Madrid.", 4),
    ]
    shown = [m.text for m in services.conversation_path(capitals)]
    assert shown[-1] == "Berlin is the capital of Germany."
    berlin = Message.objects.select_related("generation").get(pk=capitals.leaf.pk)  # type: ignore[union-attr]
    assert berlin.generation is not None
    assert berlin.generation.provenance["imported_model_id"] == "gpt-4o"
    assert berlin.generation.state == Generation.State.COMPLETE
    [question, _] = services.conversation_path(picture)
    assert question.content == "[attachment not imported]\nWhat is in this picture?"
    # Imported text is searchable like any other.
    assert search.search(user=owner, query="madrid").count == 1


def _rejected(owner: User, data: bytes, match: str) -> None:
    before = (Conversation.objects.count(), Message.objects.count(), Generation.objects.count())
    with pytest.raises(transfer.ImportRejected, match=match):
        transfer.import_file(user=owner, data=data)
    after = (Conversation.objects.count(), Message.objects.count(), Generation.objects.count())
    assert after == before


def _ours(messages: list[dict[str, Any]], **conversation: Any) -> bytes:
    body = {"title": "t", "model_id": MODEL, "messages": messages, **conversation}
    return json.dumps(
        {"format": "mlxweb.conversation", "version": 1, "conversation": body}
    ).encode()


GEN = {"model_id": MODEL, "text": "hi"}


@pytest.mark.django_db
def test_bad_and_foreign_files_get_a_clear_error_and_import_nothing(
    owner: User, models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rejected(owner, b"\x89PNG\r\n\x1a\n\x00\x00", "not JSON text")
    _rejected(owner, b"{not json", r"not valid JSON \(line 1, column 2")
    _rejected(owner, b"[1, 2, 3]", "neither an mlxweb export")
    _rejected(owner, b'{"messages": []}', "neither an mlxweb export")
    _rejected(
        owner, json.dumps({"format": "mlxweb.conversation", "version": 9}).encode(), "newer mlxweb"
    )
    _rejected(
        owner,
        _ours([{"id": "1", "role": "robot"}]),
        r"conversation\.messages\[0\]\.role",
    )
    # Foreign ids: a parent or a leaf that is not in the file.
    _rejected(
        owner,
        _ours(
            [
                {"id": "1", "role": "user", "content": "q"},
                {"id": "2", "parent": "elsewhere", "role": "assistant", "generation": GEN},
            ]
        ),
        "follows 'elsewhere', which is not an earlier message",
    )
    _rejected(owner, _ours([{"id": "1", "role": "user", "content": "q"}], leaf="9"), "ends at '9'")
    _rejected(
        owner,
        _ours(
            [
                {"id": "1", "role": "user", "content": "q"},
                {"id": "1", "role": "user", "content": "r"},
            ]
        ),
        "appears twice",
    )
    chatgpt = json.loads(FIXTURE.read_text())
    chatgpt[1]["mapping"]["pic-answer"]["parent"] = "not-there"
    _rejected(owner, json.dumps(chatgpt).encode(), "hangs from 'not-there'")
    cycle = json.loads(FIXTURE.read_text())[1]
    cycle["mapping"]["pic-root"]["parent"] = "pic-answer"
    _rejected(owner, json.dumps([cycle]).encode(), "cycle")
    # Too big: the upload, and what a zip unpacks to.
    monkeypatch.setattr(transfer, "MAX_IMPORT_BYTES", 1000)
    _rejected(owner, b" " * 1001, "too big: at most 0 MiB")
    monkeypatch.setattr(transfer, "MAX_UNZIPPED_BYTES", 500)
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("conversations.json", " " * 600)
    _rejected(owner, packed.getvalue(), "too big unpacked")


@pytest.mark.django_db
def test_a_failure_half_way_imports_nothing(
    owner: User, branched: Conversation, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    transfer.archive_write(user=owner, out=buffer)
    archive = zipfile.ZipFile(buffer)
    document = json.loads(archive.read("mlxweb-conversations.json"))
    document["conversations"].append(document["conversations"][0])
    real = inference.generation_record
    calls = []

    def failing(**kwargs: Any) -> Generation:
        calls.append(1)
        if len(calls) == 6:  # the first reply of the second conversation
            raise ValueError("disk full")
        return real(**kwargs)

    monkeypatch.setattr(inference, "generation_record", failing)
    _rejected(owner, json.dumps(document).encode(), "could not be imported: disk full")
    assert len(calls) == 6


@pytest.mark.django_db
def test_views_export_import_and_guard_owners(
    owner: User, owner_client: Client, stranger_client: Client, branched: Conversation
) -> None:
    page = owner_client.get(reverse("chat:detail", args=[branched.code])).content.decode()
    assert f'href="{reverse("chat:export", args=[branched.code, "md"])}"' in page
    assert f'href="{reverse("chat:export", args=[branched.code, "json"])}"' in page
    md = owner_client.get(reverse("chat:export", args=[branched.code, "md"]))
    assert md.status_code == 200 and md["Content-Type"].startswith("text/markdown")
    assert "attachment;" in md["Content-Disposition"]
    text = md.content.decode()
    assert text.startswith("# Branches & <things>\n")
    # The branch shown only, with reasoning and the tool step.
    assert "First question" in text and "Second" in text and "Answer one, again" not in text
    assert "> hmm" in text and "**Tool call: python**" in text and "First, edited" not in text
    as_json = owner_client.get(reverse("chat:export", args=[branched.code, "json"]))
    assert json.loads(as_json.content)["conversation"]["title"] == "Branches & <things>"
    assert owner_client.get(reverse("chat:export", args=[branched.code, "pdf"])).status_code == 404
    for kind in ("md", "json"):
        url = reverse("chat:export", args=[branched.code, kind])
        assert stranger_client.get(url).status_code == 404

    everything = owner_client.get(reverse("chat:export_all"))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(everything.streaming_content)))  # type: ignore[attr-defined]
    names = archive.namelist()
    assert "mlxweb-conversations.json" in names and any(n.startswith("markdown/") for n in names)
    theirs = stranger_client.get(reverse("chat:export_all"))
    empty = zipfile.ZipFile(io.BytesIO(b"".join(theirs.streaming_content)))  # type: ignore[attr-defined]
    assert json.loads(empty.read("mlxweb-conversations.json"))["conversations"] == []

    # Importing the archive (a zip) through the page: both conversations come back.
    form_page = owner_client.get(reverse("chat:transfer"))
    assert form_page.status_code == 200
    assert 'enctype="multipart/form-data"' in form_page.content.decode()
    upload = SimpleUploadedFile("all.zip", archive.fp.getvalue(), "application/zip")  # type: ignore[union-attr]
    response = owner_client.post(reverse("chat:transfer"), {"file": upload})
    [copy] = Conversation.objects.filter(user=owner).exclude(pk=branched.pk)
    assert response.status_code == 302 and response["Location"] == reverse(
        "chat:detail", args=[copy.code]
    )
    bad = SimpleUploadedFile("x.json", b"[1]", "application/json")
    response = owner_client.post(reverse("chat:transfer"), {"file": bad})
    assert response.status_code == 400
    assert "neither an mlxweb export" in response.content.decode()
    assert Conversation.objects.filter(user=owner).count() == 2


@pytest.mark.django_db
def test_import_needs_csrf_and_a_sign_in(owner: User, client: Client, models_root: Path) -> None:
    checked = Client(enforce_csrf_checks=True)
    checked.force_login(owner)
    upload = SimpleUploadedFile("c.json", FIXTURE.read_bytes(), "application/json")
    assert checked.post(reverse("chat:transfer"), {"file": upload}).status_code == 403
    response = client.post(reverse("chat:transfer"), {"file": upload})
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert client.get(reverse("chat:export_all")).status_code == 302
    assert Conversation.objects.count() == 0


@pytest.mark.django_db
def test_the_import_route_takes_files_past_the_ordinary_body_limit(
    owner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's body limit (2 MiB signed in) would refuse an export before Django reads it;
    the import route gets the import's own limit (plus the multipart envelope), no more."""
    from tests.security.test_body_limits import _cookie, _send_body

    monkeypatch.setattr(transfer, "MAX_IMPORT_BYTES", 4 * 1024**2)
    cookie = _cookie(owner)
    multipart = b"multipart/form-data; boundary=xyz"
    url = reverse("chat:transfer")
    under = _send_body(url, size=3 * 1024**2, declare=True, cookie=cookie, content_type=multipart)
    assert under.status != 413 and under.consumed == 3 * 1024**2
    over = _send_body(url, size=6 * 1024**2, declare=True, cookie=cookie, content_type=multipart)
    assert over.status == 413 and over.consumed == 0
    elsewhere = _send_body(reverse("chat:search"), size=3 * 1024**2, declare=True, cookie=cookie)
    assert elsewhere.status == 413
