"""Search, export and import at size: how long a search takes over many messages, and how fast a
large conversation exports and imports (chat.search, chat.transfer).

Builds a throwaway database (SQLite in a temporary folder, or the PostgreSQL given by
--postgres), fills it with one user's conversations (and as many of another user's, which the
search must skip), then times:

- `search`: chat.search.search for one-word, two-word and prefix queries (median and p95 of
  --repeat runs each, with the number of hits);
- `export`: chat.transfer.conversation_json of one conversation of --long messages (a branch
  every 10 turns);
- `import`: chat.transfer.import_file of that export (one transaction, every reply recorded as
  a generation).

    .venv/bin/python bench/bench_search.py                       # SQLite, 100,000 messages
    .venv/bin/python bench/bench_search.py --postgres postgres://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = """
river bridge mountain photosynthesis energy light quantum harbour lantern orchard violin glacier
compass meadow thunder copper falcon saffron pebble canyon ember tundra willow cobalt marble
anchor prairie summit beacon cedar delta fjord grove lagoon mesa oasis reef
""".split()  # noqa: SIM905 - a list of words reads better as words


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def _fill(user_ids: list[int], conversations: int, turns: int, rng: random.Random) -> None:
    from chat.models import Conversation, Message
    from inference.models import Generation

    for user_id in user_ids:
        for start in range(0, conversations, 500):
            batch = Conversation.objects.bulk_create(
                Conversation(user_id=user_id, model_id="smollm2-135m-instruct", title=_text(rng, 4))
                for _ in range(min(500, conversations - start))
            )
            # bulk_create on SQLite and PostgreSQL sets the ids; the triggers index each row.
            for conversation in batch:
                generations = Generation.objects.bulk_create(
                    Generation(
                        model_id="smollm2-135m-instruct",
                        state="complete",
                        text=_text(rng, 60),
                        content="",
                    )
                    for _ in range(turns)
                )
                parent = None
                for generation in generations:
                    question = Message.objects.create(
                        conversation=conversation,
                        role="user",
                        content=_text(rng, 15),
                        parent=parent,
                    )
                    parent = Message.objects.create(
                        conversation=conversation,
                        role="assistant",
                        generation=generation,
                        parent=question,
                    )


def _time(fn, repeat: int) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000, help="per user (2 users)")
    parser.add_argument("--turns", type=int, default=25, help="exchanges per conversation")
    parser.add_argument("--long", type=int, default=1000, help="messages of the exported one")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--postgres", help="an admin URL: a database is made and dropped there")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-search-"))
    os.environ["MLXWEB_VAR_DIR"] = str(folder)
    database = None
    if args.postgres:
        import psycopg

        database = f"bench_search_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        os.environ["MLXWEB_DATABASE_URL"] = args.postgres.rsplit("/", 1)[0] + "/" + database
    else:
        os.environ["MLXWEB_DATABASE_URL"] = f"sqlite:///{folder / 'bench.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection

    from chat import search, transfer
    from chat.models import Conversation, Message
    from inference.models import Generation

    try:
        call_command("migrate", verbosity=0)
        rng = random.Random(7)
        users = [User.objects.create_user(f"bench{i}") for i in range(2)]
        start = time.perf_counter()
        _fill([u.pk for u in users], args.conversations, args.turns, rng)
        if connection.vendor == "postgresql":
            # What autovacuum does soon after a bulk load: the planner's statistics.
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        messages = Message.objects.count()
        print(
            f"{connection.vendor}: {messages:,} messages in {Conversation.objects.count():,} "
            f"conversations of 2 users, written and indexed in "
            f"{time.perf_counter() - start:.1f} s"
        )
        print(f"\n{'query':<28}{'hits':>6}{'median ms':>12}{'p95 ms':>10}")
        for query in [
            "glacier",
            "bridge river",
            "photosyn",
            "saffron falcon cedar",
            "nothingmatches",
        ]:
            median, p95, results = _time(
                lambda q=query: search.search(user=users[0], query=q), args.repeat
            )
            print(f"{query:<28}{results.count:>6}{median:>12.1f}{p95:>10.1f}")  # type: ignore[attr-defined]

        # One long conversation with a branch every 10 turns, exported and imported back.
        conversation = Conversation.objects.create(user=users[0], model_id="smollm2-135m-instruct")
        parent = None
        for i in range(args.long // 2):
            generation = Generation.objects.create(
                model_id="smollm2-135m-instruct", state="complete", text=_text(rng, 60)
            )
            question = Message.objects.create(
                conversation=conversation, role="user", content=_text(rng, 15), parent=parent
            )
            reply = Message.objects.create(
                conversation=conversation, role="assistant", generation=generation, parent=question
            )
            parent = reply if i % 10 else question.parent or reply
        Conversation.objects.filter(pk=conversation.pk).update(leaf=reply)
        conversation.refresh_from_db()
        median, _, data = _time(lambda: transfer.conversation_json(conversation), 3)
        size = len(data)  # type: ignore[arg-type]
        print(f"\nexport of {args.long} messages: {median:.0f} ms median, {size / 1e6:.1f} MB JSON")
        start = time.perf_counter()
        report = transfer.import_file(user=users[1], data=data)  # type: ignore[arg-type]
        took = time.perf_counter() - start
        imported = Message.objects.filter(conversation=report.conversations[0]).count()
        print(f"import of the same: {took:.2f} s ({imported / took:.0f} messages/s)")
    finally:
        connection.close()
        if database is not None:
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
