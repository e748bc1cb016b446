"""How long the server takes to open a long conversation (issue 9: "a conversation of 1,000
messages opens fast").

A throwaway data folder (SQLite) gets a user and conversations of 10, 100 and 1,000 messages
(user and assistant turns, the replies finished generations with markdown, code and a list, as
a real chat has); the conversation page is then rendered through Django's test client in this
process, so the time is the server's alone (views, queries, templates, markdown), no network and
no browser. Also measured: the size and render time of one streamed token's frame, which must not
grow with the conversation (a token touches only the live reply).

    .venv/bin/python bench/bench_chat_open.py [--repeats 5] [--sizes 10,100,1000]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPLY = """Here is how to do it:

1. Read the file line by line.
2. Keep a count per word in a `dict`.

```python
from collections import Counter

def words(path):
    with open(path) as f:
        return Counter(w for line in f for w in line.split())
```

The total is **{n}** words; see the [docs](https://docs.python.org/3/library/collections.html).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="messages per conversation")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    var = tempfile.mkdtemp(prefix="mlxweb-bench-open-")
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_VAR_DIR": var,
            "MLXWEB_SECRET_KEY": "bench",
            "MLXWEB_DATABASE_URL": f"sqlite:///{var}/db.sqlite3",
        }
    )
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    from chat import frames, services
    from inference.schemas import ChatMessage

    settings.ALLOWED_HOSTS = ["*"]
    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench", password="bench-pass-phrase")
    model_id = settings.MLXWEB_CONFIG.server.default_model
    client = Client()
    client.force_login(user)

    rows = []
    for size in sizes:
        messages = []
        for i in range(size // 2):
            question = f"Question {i}: how do I count words?"
            messages.append(ChatMessage(role="user", content=question))
            messages.append(ChatMessage(role="assistant", content=REPLY.format(n=i)))
        conversation = services.conversation_import(
            user=user, model_id=model_id, messages=messages, title=f"{size} messages"
        )
        url = reverse("chat:detail", args=[conversation.code])
        client.get(url)  # templates compiled, caches warm
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - began)
            assert response.status_code == 200, response.status_code
        with CaptureQueriesContext(connection) as queries:
            body = client.get(url).content
        began = time.perf_counter()
        frame = frames.delta_frame(code="0" * 32, text="token")
        frame_ms = (time.perf_counter() - began) * 1000
        rows.append(
            (size, statistics.median(times) * 1000, min(times) * 1000, len(queries), len(body),
             len(frame), frame_ms)
        )  # fmt: skip

    print(f"| messages | page ms (median of {args.repeats}) | min ms | queries | page KB "
          "| token frame bytes | frame render ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for size, median, fastest, count, page, frame, frame_ms in rows:
        print(
            f"| {size:,} | {median:.0f} | {fastest:.0f} | {count} | {page / 1024:.0f} | {frame} "
            f"| {frame_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
