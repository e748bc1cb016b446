"""A long conversation with branches: how long the server takes to open it, and to re-render it
after a branch action (chat.services.conversation_path, the page, chat.branch_frames).

Builds a throwaway SQLite database with one conversation of --messages messages (exchanges of a
question and a markdown reply with a list and a code block; every --branch-every exchanges the
reply has a second version), then times, each --repeat times (median and p95):

- `path`: chat.services.conversation_path (all rows of the tree in one query, tool steps in a
  second), the messages shown;
- `page`: GET /c/<code>/ through Django's test client (the whole page: sidebar, every message
  rendered from the rows with markdown, actions and version arrows), with its query count;
- `switch`: a version switch as the socket does it (branch_switch then branch_frame, the list
  that every tab receives).

    .venv/bin/python bench/bench_conversation_page.py                 # 1,000 messages
    .venv/bin/python bench/bench_conversation_page.py --messages 200 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLY = """Here is what I found about item {n}:

- the first point, with *emphasis* and `inline code`
- the second point, with a [link](https://example.com/{n})

```python
def answer_{n}(x: int) -> int:
    return x * {n}
```

That is all for item {n}."""


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="on the branch shown")
    parser.add_argument("--branch-every", type=int, default=10, help="exchanges")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-page-"))
    os.environ["MLXWEB_VAR_DIR"] = str(folder)
    os.environ["MLXWEB_DATABASE_URL"] = f"sqlite:///{folder / 'bench.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from chat import branch_frames, services
    from chat.models import Conversation, Message
    from inference.models import Generation

    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench", password="x")
    conversation = Conversation.objects.create(user=user, model_id="smollm2-135m-instruct")
    parent = None
    other_version = None
    exchanges = args.messages // 2
    for n in range(exchanges):
        question = Message.objects.create(
            conversation=conversation,
            role="user",
            content=f"Tell me about item {n}.",
            parent=parent,
        )
        replies = []
        for version in range(2 if n % args.branch_every == 0 else 1):
            text = REPLY.format(n=n) + (" (again)" if version else "")
            generation = Generation.objects.create(
                model_id="smollm2-135m-instruct",
                state="complete",
                finish_reason="eos",
                text=text,
                content=text,
                completion_tokens=60,
            )
            replies.append(
                Message.objects.create(
                    conversation=conversation,
                    role="assistant",
                    generation=generation,
                    parent=question,
                )
            )
        if len(replies) > 1:
            other_version = replies[1]
        parent = replies[0]
    conversation.leaf = parent
    conversation.save(update_fields=["leaf"])
    total = conversation.messages.count()
    assert other_version is not None and parent is not None

    def path() -> object:
        return services.conversation_path(conversation)

    client = Client()
    client.force_login(user)
    url = f"/c/{conversation.code}/"

    def page() -> object:
        response = client.get(url, HTTP_HOST="127.0.0.1")
        assert response.status_code == 200, response.status_code
        return response

    first, last = other_version, parent

    def switch() -> object:
        services.branch_switch(conversation=conversation, message_code=str(first.code))
        services.branch_switch(conversation=conversation, message_code=str(last.code))
        return branch_frames.branch_frame(conversation=conversation)

    shown = len(path())  # type: ignore[arg-type]
    queries = []

    def count(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        size = len(page().content)  # type: ignore[attr-defined]
    if os.environ.get("BENCH_PROFILE"):
        import cProfile
        import pstats

        cProfile.runctx("page()", globals(), {"page": page}, str(folder / "page.prof"))
        pstats.Stats(str(folder / "page.prof")).sort_stats("cumulative").print_stats(40)
    print(f"conversation: {total} messages in the tree, {shown} on the branch shown")
    for name, fn in (("path", path), ("page", page), ("switch", switch)):
        median, p95 = _timed(fn, args.repeat)
        extra = f", {len(queries)} queries, {size / 1e6:.1f} MB" if name == "page" else ""
        print(f"{name:7s} median {median:8.1f} ms  p95 {p95:8.1f} ms{extra}")


if __name__ == "__main__":
    main()
