"""inference.cluster on its own: routing by model and load, failover of a dead worker's replies
(once, however many processes notice), and `mlxweb status` listing every worker. The rows are
real (the test database), and so is the registry: each test runs with the `WorkerHeartbeat`
table (no Redis) and with Redis on loopback; the channel layer is the in-memory one."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from inference import cluster, services
from inference.models import Generation
from inference.registry import Beat, RedisRegistry, registry
from inference.schemas import ChatMessage, GenerationParams
from tests.cli.conftest import cli  # noqa: F401, F811  (the fixture: `mlxweb ARGS` here)

MODEL = "smollm2-135m-instruct"
GB = 2**30


REGISTRY_REDIS = "redis://127.0.0.1:6379/13"


@pytest.fixture(autouse=True, params=["table", "redis"])
def backend(request: pytest.FixtureRequest, settings: Any) -> str:
    """Where the workers register: the table (REDIS_URL unset) or Redis."""
    if request.param == "redis":
        import redis

        try:
            redis.Redis.from_url(REGISTRY_REDIS).flushdb()
        except redis.ConnectionError as e:
            pytest.fail(f"the scale-out tests need Redis on 127.0.0.1:6379 ({e})")
        settings.REDIS_URL = REGISTRY_REDIS
    else:
        settings.REDIS_URL = ""
    return str(request.param)


def registered(worker_id: str) -> bool:
    return registry().get(worker_id) is not None


@pytest.fixture
def catalogue(models_root, db) -> None:  # type: ignore[no-untyped-def]
    """generation_create checks the model id against the (temporary) catalogue."""


def beat(
    worker_id: str,
    *models: str,
    free: int = 4 * GB,
    age: float = 0.0,
    draining: bool = False,
    exclusive: bool = False,
) -> Beat:
    loaded = [
        {"model_id": m, "bytes": GB, **({"exclusive": True} if exclusive else {})} for m in models
    ]
    written = Beat(
        worker_id=worker_id,
        updated_at=timezone.now() - timedelta(seconds=age),
        loaded=loaded,
        channel_name=cluster.worker_channel(worker_id),
        budget_bytes=8 * GB,
        used_bytes=8 * GB - free,
        draining=draining,
    )
    registry().beat(written)
    return written


def received(channel: str) -> dict[str, Any] | None:
    """The next message on `channel` of the in-memory layer, None if there is none."""

    async def receive() -> dict[str, Any] | None:
        try:
            return dict(await asyncio.wait_for(get_channel_layer().receive(channel), 0.2))
        except TimeoutError:
            return None

    return async_to_sync(receive)()


def create(**options: Any) -> Generation:
    return services.generation_create(
        model_id=MODEL,
        messages=[ChatMessage(role="user", content="Hello")],
        params=GenerationParams(max_tokens=50),
        **options,
    )


def test_it_routes_to_a_worker_holding_the_model_with_room_else_the_one_with_most_memory(
    db,
) -> None:
    beat("holder", "a", free=1 * GB)
    beat("roomy", "b", free=6 * GB)
    beat("big-but-draining", free=8 * GB, draining=True)
    beat("big-but-dead", free=8 * GB, age=cluster.DEAD_AFTER_S + 1)
    beat("group", "c", free=7 * GB, exclusive=True)

    assert cluster.pick_worker("a").worker_id == "holder"  # type: ignore[union-attr]
    # Not loaded anywhere: the idle worker with the most free memory, never a group of
    # another model, a draining or a dead worker.
    assert cluster.pick_worker("z").worker_id == "roomy"  # type: ignore[union-attr]
    assert cluster.pick_worker("c").worker_id == "group"  # type: ignore[union-attr]
    assert cluster.pick_worker("z", exclude={"roomy", "holder"}) is None

    # The holder is full (its routed, unfinished replies fill max_concurrent_streams): a
    # reply goes to an idle worker that can load the model instead of waiting.
    for _ in range(8):
        Generation.objects.create(model_id="a", worker_id="holder")
    assert cluster.pick_worker("a").worker_id == "roomy"  # type: ignore[union-attr]
    Generation.objects.create(model_id="b", worker_id="roomy")  # roomy is busy now
    assert cluster.pick_worker("a").worker_id == "holder"  # type: ignore[union-attr]


def test_a_reply_is_sent_to_its_worker_and_its_stop_follows_it(
    catalogue, django_capture_on_commit_callbacks
) -> None:
    beat("w1", "other-model")
    beat("w2", MODEL)
    with django_capture_on_commit_callbacks(execute=True):
        generation = create()
    generation.refresh_from_db()
    assert generation.worker_id == "w2"
    channel = cluster.worker_channel("w2")
    assert received(channel) == {"type": "generation.start", "code": str(generation.code)}
    assert received(cluster.worker_channel("w1")) is None

    services.generation_stop(generation=generation)
    assert received(channel) == {"type": "generation.stop", "code": str(generation.code)}
    generation.refresh_from_db()
    assert generation.details.get("stop_requested") is True


def test_a_dead_workers_replies_are_continued_once_and_nothing_alive_is_touched(
    catalogue, django_capture_on_commit_callbacks
) -> None:
    beat("dead", MODEL, age=cluster.DEAD_AFTER_S + 1)
    beat("alive", free=6 * GB)
    with django_capture_on_commit_callbacks(execute=True):
        lost, stopped, waiting, unseen, theirs = (create() for _ in range(5))
    while received(cluster.worker_channel("alive")) is not None:  # their first starts
        pass
    for generation, state in (
        (lost, "streaming"),
        (stopped, "streaming"),
        (waiting, "queued"),
        (unseen, "streaming"),
    ):
        Generation.objects.filter(pk=generation.pk).update(
            worker_id="dead", state=state, text="half a" if state == "streaming" else ""
        )
    Generation.objects.filter(pk=stopped.pk).update(details={"stop_requested": True})
    Generation.objects.filter(pk=theirs.pk).update(
        worker_id="alive", state="streaming", text="mine"
    )
    shown: list[str] = []

    def show(sender: Any, old: Generation, new: Generation, **kwargs: Any) -> bool:
        if old.pk == unseen.pk:
            return False  # nobody shows this one: it stays interrupted
        shown.append(str(old.code))
        return True

    cluster.generation_resumed.connect(show)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert cluster.reap_dead_workers(me="alive") == 4
            assert cluster.reap_dead_workers(me="alive") == 0  # claimed once
            assert cluster.reap_dead_workers(me="someone-else") == 0
    finally:
        cluster.generation_resumed.disconnect(show)

    rows = {g.pk: g for g in Generation.objects.all()}
    assert (rows[lost.pk].state, rows[lost.pk].text) == ("interrupted", "half a")
    assert (rows[stopped.pk].state, rows[stopped.pk].text) == ("stopped", "half a")
    assert (rows[unseen.pk].state, rows[unseen.pk].text) == ("interrupted", "half a")
    assert (rows[theirs.pk].state, rows[theirs.pk].text) == ("streaming", "mine")
    assert shown == [str(lost.code)]
    [continued] = Generation.objects.filter(details__resumed_from=str(lost.code))
    assert rows[lost.pk].details["resumed_by"] == str(continued.code)
    assert (continued.text, continued.state, continued.worker_id) == ("half a", "queued", "alive")
    assert continued.details["continues"] == str(lost.code)
    assert not Generation.objects.filter(details__resumed_from=str(unseen.pk)).exists()
    # The queued reply was routed again, and the continuation started, on the live worker.
    assert rows[waiting.pk].worker_id == "alive" and rows[waiting.pk].state == "queued"
    starts = []
    while (message := received(cluster.worker_channel("alive"))) is not None:
        starts.append(message["code"])
    assert sorted(starts) == sorted([str(waiting.code), str(continued.code)])
    assert not registered("dead")


def test_mlxweb_status_lists_every_worker(db, tmp_path, cli) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    beat("w1", "a")
    beat("w2", "b", draining=True)
    beat("w3", age=cluster.DEAD_AFTER_S + 1)
    nowhere = ["--url", "http://127.0.0.1:9", "--target", f"unix://{tmp_path}/none.sock"]
    data = json.loads(cli("status", "--json", *nowhere).out)
    states = {w["id"]: (w["state"], w["models"]) for w in data["workers"]}
    assert states == {
        "w1": ("alive", ["a"]),
        "w2": ("draining", ["b"]),
        "w3": ("not answering", []),
    }
    text = cli("status", *nowhere).out
    assert "draining" in text and "not answering" in text and "w3" in text


def test_stopping_a_reply_whose_worker_is_gone_ends_it_at_once(
    catalogue, django_capture_on_commit_callbacks
) -> None:
    """The web process notices the dead worker itself: the reply ends stopped, text kept, and
    nothing waits for a stop message that no worker would read."""
    beat("gone", MODEL, age=cluster.DEAD_AFTER_S + 1)
    beat("alive")
    with django_capture_on_commit_callbacks(execute=True):
        generation = create()
    Generation.objects.filter(pk=generation.pk).update(
        worker_id="gone", state="streaming", text="so far"
    )
    generation.refresh_from_db()
    while received(cluster.worker_channel("alive")) is not None:
        pass

    with django_capture_on_commit_callbacks(execute=True):
        services.generation_stop(generation=generation)

    generation.refresh_from_db()
    assert (generation.state, generation.text) == ("stopped", "so far")
    assert "resumed_by" not in generation.details
    assert received(cluster.worker_channel("gone")) is None
    assert received(cluster.worker_channel("alive")) is None  # nothing continued
    assert not registered("gone")


def test_the_registry_says_who_is_new_and_lets_one_process_declare_a_worker_dead(
    backend: str, db: None
) -> None:
    workers = registry()
    assert isinstance(workers, RedisRegistry) == (backend == "redis")
    assert workers.beat(Beat("w1", timezone.now() - timedelta(seconds=60), channel_name="c1"))
    assert not workers.beat(Beat("w1", timezone.now() - timedelta(seconds=60), channel_name="c1"))
    beat("w2", "a")
    assert [b.worker_id for b in workers.beats()] == ["w1", "w2"]
    cutoff = timezone.now() - timedelta(seconds=30)
    # w2 beat just now: not lapsed, not claimed; w1 is claimed once, whoever asks second.
    assert not workers.claim_lapsed("w2", cutoff)
    assert workers.claim_lapsed("w1", cutoff)
    assert not workers.claim_lapsed("w1", cutoff)
    assert [b.worker_id for b in workers.beats()] == ["w2"]
    # A worker declared dead that beats again is new again (it drops its replies).
    assert workers.beat(Beat("w1", timezone.now(), channel_name="c1"))
    kept = workers.get("w2")
    assert kept is not None and kept.loaded == [{"model_id": "a", "bytes": GB}]
    assert kept.channel_name == cluster.worker_channel("w2") and kept.budget_bytes == 8 * GB
