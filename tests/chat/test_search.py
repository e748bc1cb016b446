"""Full-text search (chat.search) on SQLite (FTS5 and triggers) and PostgreSQL (GIN indexes).

The same tests run on both: on SQLite here, and on PostgreSQL by
`test_the_same_tests_pass_on_postgresql`, which runs this module again in a child pytest whose
database is the PostgreSQL on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from chat import search
from chat.models import Conversation, Message
from inference.models import Generation

MODEL = "smollm2-135m-instruct"
ON_POSTGRESQL = os.environ.get("MLXWEB_DATABASE_URL", "").startswith(("postgres", "pgsql"))


def _conversation(user: User, title: str = "New chat") -> Conversation:
    return Conversation.objects.create(user=user, model_id=MODEL, title=title)


def _say(conversation: Conversation, text: str, parent: Message | None = None) -> Message:
    return Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content=text, parent=parent
    )


def _reply(
    conversation: Conversation, parent: Message, text: str = "", *, state: str = "complete"
) -> Message:
    generation = Generation.objects.create(
        model_id=MODEL, user=conversation.user, state=state, text=text, content=text
    )
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent=parent,
    )


def _hit_texts(results: search.Results) -> list[str]:
    return ["".join(s.text for s in hit.segments) for hit in results.messages]


@pytest.mark.django_db
def test_it_finds_titles_messages_and_replies_of_the_user_only(owner: User, stranger: User) -> None:
    mine = _conversation(owner, "Trip to Lisbon")
    question = _say(mine, "Which bridges cross the Tagus river?")
    _reply(mine, question, "The 25 de Abril bridge and the Vasco da Gama bridge cross it.")
    theirs = _conversation(stranger, "Lisbon secrets")
    _say(theirs, "Tell me about bridges over the Tagus")

    results = search.search(user=owner, query="bridge")
    assert [hit.conversation_code for hit in results.messages] == [mine.code, mine.code]
    assert {hit.role for hit in results.messages} == {"user", "assistant"}
    # Stemming: "bridges" finds "bridge" (porter on SQLite, english on PostgreSQL).
    assert all(any(s.hit for s in hit.segments) for hit in results.messages)

    titles = search.search(user=owner, query="lisbon")
    assert [hit.conversation_code for hit in titles.titles] == [mine.code]
    assert titles.messages == []
    marked = [s.text.lower() for s in titles.titles[0].segments if s.hit]
    assert marked == ["lisbon"]

    assert search.search(user=stranger, query="vasco").count == 0


@pytest.mark.django_db
def test_every_word_must_match_and_the_last_is_a_prefix(owner: User) -> None:
    conversation = _conversation(owner)
    _say(conversation, "Photosynthesis converts light into chemical energy")
    _say(conversation, "Light travels fast")
    assert len(search.search(user=owner, query="light energy").messages) == 1
    assert len(search.search(user=owner, query="light").messages) == 2
    assert _hit_texts(search.search(user=owner, query="photosyn")) == [
        "Photosynthesis converts light into chemical energy"
    ]
    assert search.search(user=owner, query="light banana").count == 0


@pytest.mark.django_db
def test_a_reply_is_indexed_when_it_finishes_not_while_it_streams(owner: User) -> None:
    conversation = _conversation(owner)
    question = _say(conversation, "Name a gas giant")
    reply = _reply(conversation, question, state=Generation.State.QUEUED)
    generation = reply.generation
    assert generation is not None
    # The worker's writes are plain UPDATEs (Generation._write), no signals.
    generation.mark_streaming(
        started_at=generation.created_at, prompt_tokens=3, cached_tokens=0, trimmed_messages=0
    )
    Generation.objects.filter(pk=generation.pk).update(text="Jupiter is a")
    assert search.search(user=owner, query="jupiter").count == 0
    generation.finish(
        "eos",
        text="<think>Saturn or Jupiter?</think>Jupiter is a gas giant.",
        content="Jupiter is a gas giant.",
        reasoning="Saturn or Jupiter?",
    )
    results = search.search(user=owner, query="jupiter")
    assert [hit.message_code for hit in results.messages] == [reply.code]
    # (ts_headline may leave out the final full stop.)
    assert [t.rstrip(".") for t in _hit_texts(results)] == ["Jupiter is a gas giant"]
    # The answer is indexed, not the reasoning.
    assert search.search(user=owner, query="saturn").count == 0


@pytest.mark.django_db
def test_renames_and_deletions_follow(owner: User) -> None:
    conversation = _conversation(owner, "Old name")
    question = _say(conversation, "Something about otters")
    _reply(conversation, question, "Otters hold hands while they sleep.")
    Conversation.objects.filter(pk=conversation.pk).update(title="Marine mammals")
    assert search.search(user=owner, query="old name").count == 0
    assert len(search.search(user=owner, query="marine").titles) == 1
    Message.objects.filter(pk=question.pk).update(content="Something about seals")
    assert _hit_texts(search.search(user=owner, query="seals")) == ["Something about seals"]
    assert len(search.search(user=owner, query="otters").messages) == 1  # the reply
    conversation.delete()
    assert search.search(user=owner, query="otters").count == 0
    assert search.search(user=owner, query="marine").count == 0


@pytest.mark.django_db
def test_queries_are_words_never_syntax(owner: User) -> None:
    conversation = _conversation(owner)
    _say(conversation, 'He said "NEAR" AND left -- or not')
    for query in ['"', "NEAR(", "AND", "left OR", "*", "a:b", "'; DROP TABLE chat_message; --"]:
        with contextlib.suppress(search.SearchError):  # a query with no word at all
            search.search(user=owner, query=query)
    assert len(search.search(user=owner, query='left"').messages) == 1
    with pytest.raises(search.SearchError, match="Type a word"):
        search.search(user=owner, query="  ?! ")
    with pytest.raises(search.SearchError, match="at most 200"):
        search.search(user=owner, query="x" * 201)


def test_segments_split_marked_text_and_drop_stray_markers() -> None:
    marked = f"a <b>{search.HIT_START}hit{search.HIT_END} c{search.HIT_END}"
    assert [(s.text, s.hit) for s in search.segments(marked)] == [
        ("a <b>", False),
        ("hit", True),
        (" c", False),
    ]


@pytest.mark.django_db
def test_the_results_escape_the_text_and_mark_only_the_hit(
    owner: User, owner_client: Client
) -> None:
    conversation = _conversation(owner)
    question = _say(
        conversation, "<script>alert(1)</script> what is xylophone <b>bold</b> Tom & Jerry"
    )
    url = reverse("chat:search")

    page = owner_client.get(url, {"q": "xylophone"})
    assert page.status_code == 200
    body = page.content.decode()
    assert "<script>alert(1)</script>" not in body and "<b>bold" not in body
    if connection.vendor == "sqlite":
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
        assert "&lt;b&gt;bold&lt;/b&gt;" in body
    # (PostgreSQL's ts_headline leaves tags out of the excerpt on its own.)
    assert "Tom &amp; Jerry" in body
    assert re.search(r"<mark>xylophone</mark>", body)
    link = f"/c/{conversation.code}/?m={question.code}#message-{question.code}"
    assert f'href="{link}"' in body

    partial = owner_client.get(url, {"q": "xylophone"}, headers={"HX-Request": "true"})
    text = partial.content.decode()
    assert text.lstrip().startswith("{% comment") is False
    assert 'id="search-results"' in text and "<html" not in text
    assert f'href="{link}"' in text

    error = owner_client.get(url, {"q": "?"}, headers={"HX-Request": "true"})
    assert "Type a word to search for." in error.content.decode()


@pytest.mark.django_db
def test_search_needs_a_sign_in(client: Client) -> None:
    response = client.get(reverse("chat:search"), {"q": "x"})
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.django_db
@pytest.mark.skipif(ON_POSTGRESQL, reason="SQLite's triggers")
def test_sqlite_triggers_come_back_after_migrate_and_on_search(owner: User) -> None:
    conversation = _conversation(owner)
    _say(conversation, "Before: walrus")
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER chat_search_message_ai")
        cursor.execute("DELETE FROM chat_search_message")
    _say(conversation, "While the trigger was gone: narwhal")
    assert search.missing_parts(connection) == ["chat_search_message_ai"]
    call_command("migrate", verbosity=0)  # nothing to apply; the post-migrate hook runs
    assert search.missing_parts(connection) == []
    assert search.search(user=owner, query="walrus").count == 1
    assert search.search(user=owner, query="narwhal").count == 1
    # Migrations run outside the command (no hooks) would leave them off: a search heals.
    search.drop_triggers(connection)
    _say(conversation, "After: beluga")
    assert search.search(user=owner, query="beluga").count == 1
    assert search.missing_parts(connection) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(ON_POSTGRESQL, reason="SQLite's table rebuilds")
def test_later_migrations_can_rebuild_the_tables_the_triggers_name(owner: User) -> None:
    """Django rebuilds a SQLite table (copy, drop, rename) for many schema changes; the rename
    fails while a trigger on another table names the table, so `migrate` runs without them."""
    conversation = _conversation(owner, "Walrus facts")
    question = _say(conversation, "Tell me about the walrus")
    _reply(conversation, question, "A walrus hauls out with its tusks.")
    search.drop_before_migrate(plan=[("a migration", False)])  # what migrate's hooks do
    with connection.schema_editor() as editor:
        for model in (Generation, Message, Conversation):
            editor._remake_table(model)  # type: ignore[attr-defined]
    _say(conversation, "During the migration: narwhal", parent=question)
    search.repair_after_migrate()
    assert search.missing_parts(connection) == []
    results = search.search(user=owner, query="walrus")
    assert len(results.titles) == 1 and len(results.messages) == 2
    assert search.search(user=owner, query="narwhal").count == 1
    _say(conversation, "After: beluga")
    assert search.search(user=owner, query="beluga").count == 1


@pytest.mark.scaleout
@pytest.mark.skipif(ON_POSTGRESQL, reason="this is the child run")
@pytest.mark.timeout(240)
def test_the_same_tests_pass_on_postgresql(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    name = f"mlxweb_search_{uuid.uuid4().hex[:8]}"
    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres").close()
    except psycopg.OperationalError as e:
        pytest.fail(f"the PostgreSQL search tests need PostgreSQL on 127.0.0.1:5432 ({e})")
    env = {
        **os.environ,
        "MLXWEB_DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{name}",
        "MLXWEB_VAR_DIR": str(tmp_path / "var"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=230,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # Every test above ran on PostgreSQL, except SQLite's own two and this one.
    assert re.search(r"\b8 passed\b", output), output[-2000:]
    assert "3 skipped" in output, output[-2000:]
