"""Full-text search over a user's conversations: titles, their messages and the replies' answers.

Two engines, one behaviour:

- **SQLite**: two FTS5 tables, `chat_search_title` (rowid = conversation id) and
  `chat_search_message` (rowid = message id), kept right by triggers on `chat_conversation`,
  `chat_message` and `inference_generation`. A reply's text is written by the inference worker
  with plain UPDATEs, so triggers, not Django signals, are what see it: a reply is indexed when
  its generation leaves the queued/streaming states (never per streamed flush), with its answer
  (`content`, without reasoning and tool markup) or, for replies from before that split, `text`.
- **PostgreSQL**: GIN indexes on `to_tsvector(...)` expressions of the same columns (the
  generation's one partial: finished replies only). PostgreSQL keeps them right by itself, and
  the queries below use the very same expressions so the planner uses the indexes.

On SQLite, Django rebuilds a table (copy, drop, rename) for some later schema changes: that drops
the table's triggers, and the rename fails while another table's trigger names it. So the
triggers are dropped before migrations run and put back after, with the index refilled from the
tables (`drop_before_migrate`, `repair_after_migrate`, connected in `chat.apps`); a search that
finds them missing puts them back too.

Highlights come back as segments (text, hit) for the template to autoescape: the engines mark
hits with control characters that cannot reach the page as markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection as default_connection
from django.db.backends.base.base import BaseDatabaseWrapper

from chat.models import Conversation, Message

# What the engines put around a hit; stripped from the text itself so a model cannot fake one.
HIT_START = "\x02"
HIT_END = "\x03"
MAX_QUERY_CHARS = 200
MAX_TERMS = 12
DEFAULT_LIMIT = 30
# PostgreSQL's text search configuration (stemming, English stop words) and, to match it on
# SQLite, FTS5's porter stemmer over the Unicode tokenizer.
PG_CONFIG = "english"
FTS5_TOKENIZE = "porter unicode61 remove_diacritics 2"
# to_tsvector fails past 1 MB of text; an index expression that fails would fail the write.
PG_MAX_INDEXED_CHARS = 200_000
# The migration that installs the index: before it (or after rolling it back), none is kept.
MIGRATION = "0004_search"

_WORD = re.compile(r"\w+", re.UNICODE)


class SearchError(ValueError):
    """A query that cannot be searched; the message says why."""


@dataclass
class Segment:
    text: str
    hit: bool


@dataclass
class Hit:
    """One result: a conversation's title, or one of its messages."""

    conversation_code: UUID
    conversation_title: str
    segments: list[Segment]
    message_code: UUID | None = None
    role: str = ""
    when: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        base = f"/c/{self.conversation_code}/"
        if self.message_code is None:
            return base
        return f"{base}?m={self.message_code}#message-{self.message_code}"


@dataclass
class Results:
    query: str
    terms: list[str]
    titles: list[Hit]
    messages: list[Hit]

    @property
    def count(self) -> int:
        return len(self.titles) + len(self.messages)


def query_terms(query: str) -> list[str]:
    """The words of a user's query (letters, digits), at most MAX_TERMS of them; SearchError for
    a query too long or with nothing to search for."""
    query = query.strip()
    if len(query) > MAX_QUERY_CHARS:
        raise SearchError(f"A search may have at most {MAX_QUERY_CHARS} characters.")
    terms = [t.lower() for t in _WORD.findall(query)]
    if not terms:
        raise SearchError("Type a word to search for.")
    return terms[:MAX_TERMS]


def segments(marked: str) -> list[Segment]:
    """Split an engine's highlighted text at its hit markers."""
    out: list[Segment] = []
    rest = marked
    while rest:
        start = rest.find(HIT_START)
        if start == -1:
            out.append(Segment(rest.replace(HIT_END, ""), False))
            break
        if start:
            out.append(Segment(rest[:start].replace(HIT_END, ""), False))
        rest = rest[start + 1 :]
        end = rest.find(HIT_END)
        if end == -1:
            end = len(rest)
        out.append(Segment(rest[:end].replace(HIT_START, ""), True))
        rest = rest[end + 1 :]
    return [s for s in out if s.text]


# --- SQLite ----------------------------------------------------------------------------------

# The text a message contributes, for a trigger whose row is `row` (new or old): a user's
# message, or a finished reply's answer.
_SQLITE_BODY = """CASE WHEN {row}.role = 'user' THEN {row}.content ELSE COALESCE((
    SELECT CASE WHEN g.content <> '' THEN g.content ELSE g.text END
    FROM inference_generation AS g
    WHERE g.id = {row}.generation_id AND g.state NOT IN ('queued', 'streaming')), '') END"""

SQLITE_TABLES = {
    "chat_search_title": f"CREATE VIRTUAL TABLE chat_search_title USING fts5("
    f"title, tokenize = '{FTS5_TOKENIZE}')",
    "chat_search_message": f"CREATE VIRTUAL TABLE chat_search_message USING fts5("
    f"body, tokenize = '{FTS5_TOKENIZE}')",
}

SQLITE_TRIGGERS = {
    "chat_search_conversation_ai": """
        CREATE TRIGGER chat_search_conversation_ai AFTER INSERT ON chat_conversation BEGIN
            INSERT INTO chat_search_title(rowid, title) VALUES (new.id, new.title);
        END""",
    "chat_search_conversation_au": """
        CREATE TRIGGER chat_search_conversation_au AFTER UPDATE OF title ON chat_conversation
        BEGIN
            DELETE FROM chat_search_title WHERE rowid = old.id;
            INSERT INTO chat_search_title(rowid, title) VALUES (new.id, new.title);
        END""",
    "chat_search_conversation_ad": """
        CREATE TRIGGER chat_search_conversation_ad AFTER DELETE ON chat_conversation BEGIN
            DELETE FROM chat_search_title WHERE rowid = old.id;
        END""",
    "chat_search_message_ai": f"""
        CREATE TRIGGER chat_search_message_ai AFTER INSERT ON chat_message BEGIN
            INSERT INTO chat_search_message(rowid, body)
            VALUES (new.id, {_SQLITE_BODY.format(row="new")});
        END""",
    "chat_search_message_au": f"""
        CREATE TRIGGER chat_search_message_au
        AFTER UPDATE OF role, content, generation_id ON chat_message BEGIN
            DELETE FROM chat_search_message WHERE rowid = old.id;
            INSERT INTO chat_search_message(rowid, body)
            VALUES (new.id, {_SQLITE_BODY.format(row="new")});
        END""",
    "chat_search_message_ad": """
        CREATE TRIGGER chat_search_message_ad AFTER DELETE ON chat_message BEGIN
            DELETE FROM chat_search_message WHERE rowid = old.id;
        END""",
    # A reply's text: written by the worker while it streams (not indexed then) and when it
    # ends (indexed); any later change of a finished reply's text is indexed too.
    "chat_search_generation_au": f"""
        CREATE TRIGGER chat_search_generation_au
        AFTER UPDATE OF state, content, text ON inference_generation
        WHEN new.state NOT IN ('queued', 'streaming')
            OR old.state NOT IN ('queued', 'streaming') BEGIN
            DELETE FROM chat_search_message
            WHERE rowid IN (SELECT id FROM chat_message WHERE generation_id = new.id);
            INSERT INTO chat_search_message(rowid, body)
            SELECT m.id, {_SQLITE_BODY.format(row="m")}
            FROM chat_message AS m WHERE m.generation_id = new.id;
        END""",
}

_SQLITE_REBUILD = [
    "DELETE FROM chat_search_title",
    "DELETE FROM chat_search_message",
    "INSERT INTO chat_search_title(rowid, title) SELECT id, title FROM chat_conversation",
    "INSERT INTO chat_search_message(rowid, body) SELECT m.id, "
    + _SQLITE_BODY.format(row="m")
    + " FROM chat_message AS m",
]

# --- PostgreSQL -------------------------------------------------------------------------------


def _pg_vector(expression: str) -> str:
    return f"to_tsvector('{PG_CONFIG}'::regconfig, left({expression}, {PG_MAX_INDEXED_CHARS}))"


PG_TITLE_VECTOR = _pg_vector("title")
PG_MESSAGE_VECTOR = _pg_vector("content")
PG_GENERATION_TEXT = "CASE WHEN content <> '' THEN content ELSE text END"
PG_GENERATION_VECTOR = _pg_vector(PG_GENERATION_TEXT)
PG_GENERATION_FINISHED = "state NOT IN ('queued', 'streaming')"

PG_INDEXES = {
    "chat_search_conversation_title": f"CREATE INDEX IF NOT EXISTS chat_search_conversation_title"
    f" ON chat_conversation USING gin (({PG_TITLE_VECTOR}))",
    "chat_search_message_content": f"CREATE INDEX IF NOT EXISTS chat_search_message_content"
    f" ON chat_message USING gin (({PG_MESSAGE_VECTOR})) WHERE role = 'user'",
    "chat_search_generation_text": f"CREATE INDEX IF NOT EXISTS chat_search_generation_text"
    f" ON inference_generation USING gin (({PG_GENERATION_VECTOR}))"
    f" WHERE {PG_GENERATION_FINISHED}",
}


# --- installing ------------------------------------------------------------------------------


def install(connection: BaseDatabaseWrapper, *, triggers: bool = True) -> None:
    """Create the index (FTS5 tables and, with `triggers`, their triggers; or GIN indexes)
    and fill it from the tables."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            for sql in SQLITE_TABLES.values():
                cursor.execute(
                    sql.replace("CREATE VIRTUAL TABLE", "CREATE VIRTUAL TABLE IF NOT EXISTS")
                )
            if triggers:
                for sql in SQLITE_TRIGGERS.values():
                    cursor.execute(sql.replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS", 1))
            for sql in _SQLITE_REBUILD:
                cursor.execute(sql)
        elif connection.vendor == "postgresql":
            for sql in PG_INDEXES.values():
                cursor.execute(sql)


def drop_triggers(connection: BaseDatabaseWrapper) -> None:
    """SQLite: drop the triggers (the index stays; `ensure_index` puts them back and refills
    it). Needed while migrations run: each trigger names other tables (a message's trigger
    reads its generation, a generation's finds its message), and SQLite refuses to rename the
    copy of a table Django rebuilds while a trigger elsewhere names the table it replaces."""
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        for name in SQLITE_TRIGGERS:
            cursor.execute(f"DROP TRIGGER IF EXISTS {name}")


def uninstall(connection: BaseDatabaseWrapper) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            for name in SQLITE_TRIGGERS:
                cursor.execute(f"DROP TRIGGER IF EXISTS {name}")
            for name in SQLITE_TABLES:
                cursor.execute(f"DROP TABLE IF EXISTS {name}")
        elif connection.vendor == "postgresql":
            for name in PG_INDEXES:
                cursor.execute(f"DROP INDEX IF EXISTS {name}")


def missing_parts(connection: BaseDatabaseWrapper) -> list[str]:
    """The names of the index's tables, triggers or indexes that the database lacks."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")
            present = {row[0] for row in cursor.fetchall()}
            wanted = [*SQLITE_TABLES, *SQLITE_TRIGGERS]
        elif connection.vendor == "postgresql":
            cursor.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            present = {row[0] for row in cursor.fetchall()}
            wanted = list(PG_INDEXES)
        else:
            return []
    return [name for name in wanted if name not in present]


def ensure_index(connection: BaseDatabaseWrapper | None = None) -> list[str]:
    """Put back what a schema change dropped (SQLite drops a table's triggers when Django
    rebuilds it) and refill the index; returns what was missing. A database that never had the
    search migration is left alone."""
    from django.db.migrations.recorder import MigrationRecorder

    connection = connection or default_connection
    recorder = MigrationRecorder(connection)
    if not recorder.has_table() or ("chat", MIGRATION) not in recorder.applied_migrations():
        return []
    missing = missing_parts(connection)
    if missing:
        install(connection)
    return missing


def drop_before_migrate(
    using: str = "default", plan: list[Any] | None = None, **kwargs: Any
) -> None:
    """pre_migrate receiver (see chat.apps): off with the SQLite triggers while migrations
    run (see `drop_triggers`); `repair_after_migrate` puts them back."""
    from django.db import connections

    if plan:
        drop_triggers(connections[using])


def repair_after_migrate(using: str = "default", **kwargs: Any) -> None:
    """post_migrate receiver (see chat.apps): `ensure_index` on the migrated database."""
    from django.db import connections

    ensure_index(connections[using])


# --- searching -------------------------------------------------------------------------------


def search(*, user: AbstractBaseUser, query: str, limit: int = DEFAULT_LIMIT) -> Results:
    """The user's conversations whose title, and messages whose text, match every word of
    `query` (the last word also as a prefix, for search as you type), best first."""
    terms = query_terms(query)
    vendor = default_connection.vendor
    if vendor == "sqlite":
        # Migrations run without the triggers; one run outside `manage.py migrate` (no
        # post-migrate signal) would leave them off. Cheap to check, and it heals.
        with default_connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE %s",
                ["chat_search_%"],
            )
            if cursor.fetchone()[0] != len(SQLITE_TRIGGERS):
                ensure_index(default_connection)
        title_rows, message_rows = _search_sqlite(user.pk, terms, limit)
    elif vendor == "postgresql":
        title_rows, message_rows = _search_postgresql(user.pk, terms, limit)
    else:  # pragma: no cover - the settings allow only these two
        raise SearchError(f"Search is not available on {vendor}.")
    conversations = Conversation.objects.filter(user_id=user.pk).in_bulk(
        [cid for cid, _ in title_rows]
    )
    titles = [
        Hit(
            conversations[cid].code,
            conversations[cid].title,
            segments(marked),
            when=conversations[cid].updated_at,
        )
        for cid, marked in title_rows
        if cid in conversations
    ]
    found = Message.objects.select_related("conversation").in_bulk([mid for mid, _ in message_rows])
    messages = [
        Hit(
            found[mid].conversation.code,
            found[mid].conversation.title,
            segments(marked),
            message_code=found[mid].code,
            role=found[mid].role,
            when=found[mid].created_at,
        )
        for mid, marked in message_rows
        if mid in found and found[mid].conversation.user_id == user.pk
    ]
    return Results(query=query, terms=terms, titles=titles, messages=messages)


def _fts5_query(terms: list[str]) -> str:
    quoted = [f'"{t}"' for t in terms]
    quoted[-1] += "*"
    return " ".join(quoted)


def _search_sqlite(
    user_id: int, terms: list[str], limit: int
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    match = _fts5_query(terms)
    with default_connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.id, highlight(chat_search_title, 0, %s, %s)
            FROM chat_search_title JOIN chat_conversation AS c ON c.id = chat_search_title.rowid
            WHERE chat_search_title MATCH %s AND c.user_id = %s
            ORDER BY bm25(chat_search_title), c.updated_at DESC LIMIT %s
            """,
            [HIT_START, HIT_END, match, user_id, limit],
        )
        titles = [(int(r[0]), str(r[1])) for r in cursor.fetchall()]
        cursor.execute(
            """
            SELECT m.id, snippet(chat_search_message, 0, %s, %s, '…', 24)
            FROM chat_search_message
            JOIN chat_message AS m ON m.id = chat_search_message.rowid
            JOIN chat_conversation AS c ON c.id = m.conversation_id
            WHERE chat_search_message MATCH %s AND c.user_id = %s
            ORDER BY bm25(chat_search_message), m.id DESC LIMIT %s
            """,
            [HIT_START, HIT_END, match, user_id, limit],
        )
        messages = [(int(r[0]), str(r[1])) for r in cursor.fetchall()]
    return titles, messages


def _tsquery(terms: list[str]) -> str:
    quoted = [f"'{t}'" for t in terms]
    quoted[-1] += ":*"
    return " & ".join(quoted)


_PG_TITLE_OPTIONS = f"HighlightAll=true, StartSel={HIT_START}, StopSel={HIT_END}"
_PG_HEADLINE_OPTIONS = (
    f"StartSel={HIT_START}, StopSel={HIT_END}, MaxWords=30, MinWords=10, MaxFragments=2, "
    'FragmentDelimiter=" … "'
)


def _search_postgresql(
    user_id: int, terms: list[str], limit: int
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    tsquery = _tsquery(terms)
    config = f"'{PG_CONFIG}'::regconfig"
    with default_connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT c.id, ts_headline({config}, c.title, q, %s)
            FROM chat_conversation AS c, to_tsquery({config}, %s) AS q
            WHERE c.user_id = %s AND {PG_TITLE_VECTOR} @@ q
            ORDER BY ts_rank({PG_TITLE_VECTOR}, q) DESC, c.updated_at DESC
            LIMIT %s
            """,
            [_PG_TITLE_OPTIONS, tsquery, user_id, limit],
        )
        titles = [(int(r[0]), str(r[1])) for r in cursor.fetchall()]
        cursor.execute(
            f"""
            WITH q AS (SELECT to_tsquery({config}, %s) AS q),
            hits AS (
                SELECT m.id, m.content AS body, ts_rank({PG_MESSAGE_VECTOR}, q.q) AS rank
                FROM chat_message AS m JOIN chat_conversation AS c ON c.id = m.conversation_id, q
                WHERE c.user_id = %s AND m.role = 'user' AND {PG_MESSAGE_VECTOR} @@ q.q
                UNION ALL
                SELECT m.id, g.body, g.rank FROM (
                    SELECT id, {PG_GENERATION_TEXT} AS body,
                        ts_rank({PG_GENERATION_VECTOR}, q.q) AS rank
                    FROM inference_generation, q
                    WHERE {PG_GENERATION_FINISHED} AND {PG_GENERATION_VECTOR} @@ q.q
                ) AS g
                JOIN chat_message AS m ON m.generation_id = g.id
                JOIN chat_conversation AS c ON c.id = m.conversation_id
                WHERE c.user_id = %s
                ORDER BY rank DESC, id DESC LIMIT %s
            )
            SELECT hits.id, ts_headline({config}, hits.body, q.q, %s)
            FROM hits, q ORDER BY hits.rank DESC, hits.id DESC
            """,
            [tsquery, user_id, user_id, limit, _PG_HEADLINE_OPTIONS],
        )
        messages = [(int(r[0]), str(r[1])) for r in cursor.fetchall()]
    return titles, messages
