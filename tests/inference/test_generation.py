"""The Generation row: its state changes, its prompt in the prompt tree, and the migration that
moved old rows' copied prompts into the tree."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Sum
from django.db.models.functions import Length
from django.test.utils import CaptureQueriesContext

from inference import services
from inference.models import Generation, PromptMessage
from inference.schemas import ChatMessage, GenerationParams

MODEL_ID = "smollm2-135m-instruct"


def _create(messages: list[tuple[str, str]], **options: Any) -> Generation:
    return services.generation_create(
        model_id=MODEL_ID,
        messages=[ChatMessage(role=role, content=content) for role, content in messages],  # type: ignore[arg-type]
        params=GenerationParams(),
        **options,
    )


def _reply(generation: Generation, text: str) -> Generation:
    generation.finish("eos", text=text, completion_tokens=len(text.split()))
    return generation


@pytest.fixture
def catalogue(models_root, db) -> None:  # type: ignore[no-untyped-def]
    """generation_create checks the model id against the (temporary) catalogue."""


# --------------------------------------------------------------------------- state changes


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        ("eos", Generation.State.COMPLETE),
        ("stop_string", Generation.State.COMPLETE),
        ("max_tokens", Generation.State.COMPLETE),
        ("stopped", Generation.State.STOPPED),
        ("interrupted", Generation.State.INTERRUPTED),
        ("error", Generation.State.ERROR),
    ],
)
def test_it_finishes_in_the_state_its_reason_means(db, reason: str, state: str) -> None:
    generation = Generation.objects.create(model_id=MODEL_ID, state=Generation.State.STREAMING)
    generation.finish(reason, text="so far", completion_tokens=2)

    row = Generation.objects.get(pk=generation.pk)
    assert (row.state, row.finish_reason) == (state, reason)
    assert row.text == "so far" and row.completion_tokens == 2
    assert row.finished_at is not None and not row.is_active
    assert (generation.state, generation.finished_at) == (row.state, row.finished_at)


def test_it_bounds_the_error_and_leaves_fields_not_given_alone(db) -> None:
    generation = Generation.objects.create(model_id=MODEL_ID, text="kept", prompt_tokens=9)
    generation.finish("error", error="x" * 20_000)

    row = Generation.objects.get(pk=generation.pk)
    assert row.state == Generation.State.ERROR
    assert len(row.error) == Generation.MAX_ERROR_LENGTH
    assert (row.text, row.prompt_tokens) == ("kept", 9)


def test_it_does_not_fail_to_finish_a_row_deleted_meanwhile(db) -> None:
    generation = Generation.objects.create(model_id=MODEL_ID)
    Generation.objects.filter(pk=generation.pk).delete()
    generation.finish("eos", text="nobody reads this")
    assert not Generation.objects.exists()


def test_it_marks_streaming_with_the_prompt_counts(db) -> None:
    generation = Generation.objects.create(model_id=MODEL_ID)
    generation.mark_streaming(
        started_at=generation.created_at, prompt_tokens=40, cached_tokens=30, trimmed_messages=2
    )
    row = Generation.objects.get(pk=generation.pk)
    assert row.state == Generation.State.STREAMING and row.is_active
    assert (row.prompt_tokens, row.cached_tokens, row.trimmed_messages) == (40, 30, 2)


def test_it_interrupts_only_active_rows_keeping_their_text(db) -> None:
    queued = Generation.objects.create(model_id=MODEL_ID)
    streaming = Generation.objects.create(
        model_id=MODEL_ID, state=Generation.State.STREAMING, text="half a"
    )
    done = Generation.objects.create(model_id=MODEL_ID, state=Generation.State.COMPLETE)

    assert set(Generation.objects.active()) == {queued, streaming}
    assert Generation.objects.active().interrupt() == 2

    rows = {g.pk: g for g in Generation.objects.all()}
    assert rows[streaming.pk].state == Generation.State.INTERRUPTED
    assert rows[streaming.pk].finish_reason == Generation.FinishReason.INTERRUPTED
    assert rows[streaming.pk].text == "half a"
    assert rows[queued.pk].state == Generation.State.INTERRUPTED
    assert rows[done.pk].state == Generation.State.COMPLETE and rows[done.pk].finished_at is None


def test_it_marks_only_other_workers_generations_interrupted(db) -> None:
    mine = Generation.objects.create(model_id=MODEL_ID, worker_id="me")
    theirs = Generation.objects.create(
        model_id=MODEL_ID, worker_id="dead", state=Generation.State.STREAMING, text="kept"
    )
    assert services.generation_mark_orphans_interrupted(worker_id="me") == 1
    assert Generation.objects.get(pk=mine.pk).is_active
    theirs.refresh_from_db()
    assert (theirs.state, theirs.text) == (Generation.State.INTERRUPTED, "kept")


# --------------------------------------------------------------------------- the prompt


def test_it_replays_the_prompt_exactly(catalogue) -> None:
    first = _create([("system", "Be brief."), ("user", "Hi 👋\n<b>")])
    assert first.prompt_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋\n<b>"},
    ]
    _reply(first, "Hello!  ")
    second = _create([("user", "And again")], previous=first)
    _reply(second, "")  # failed before writing anything: left out of the next prompt
    third = _create([("user", "Third")], previous=second)

    assert Generation.objects.get(pk=third.pk).prompt_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋\n<b>"},
        {"role": "assistant", "content": "Hello!  "},
        {"role": "user", "content": "And again"},
        {"role": "user", "content": "Third"},
    ]


def test_it_stores_a_long_conversation_in_linear_space_and_constant_queries(catalogue) -> None:
    turns = 50
    previous = None
    stored_text = 0
    queries = []
    for turn in range(turns):
        question, answer = f"question {turn} " * 20, f"answer {turn} " * 30
        with CaptureQueriesContext(connection) as captured:
            previous = _create([("user", question)], previous=previous)
        queries.append(len(captured))
        _reply(previous, answer)
        stored_text += len(question) + (len(answer) if turn < turns - 1 else 0)

    assert previous is not None
    # The 50th turn costs what the second did: no query per earlier message.
    assert queries[1] == queries[-1] <= 8, queries
    assert len(previous.prompt_messages()) == 2 * turns - 1
    # Each message is stored once: one node per message, each text once.
    assert PromptMessage.objects.count() == 2 * turns - 1
    assert PromptMessage.objects.aggregate(n=Sum(Length("content")))["n"] == stored_text
    assert Generation.objects.count() == turns


def test_it_branches_from_a_shared_prefix(catalogue) -> None:
    first = _reply(_create([("user", "Pick a colour")]), "Blue.")
    again = _create([("user", "Why?")], previous=first)
    edited = _create([("user", "Why not red?")], previous=first)
    regenerated = _create([("user", "Why?")], previous=first)

    assert regenerated.prompt_id == again.prompt_id  # the same prompt: no new nodes
    assert again.prompt_id != edited.prompt_id
    assert PromptMessage.objects.count() == 4  # question, reply, and the two follow-ups
    assert edited.prompt_messages()[-1] == {"role": "user", "content": "Why not red?"}


def test_it_refuses_to_continue_an_unfinished_reply(catalogue) -> None:
    streaming = _create([("user", "Go on")])
    with pytest.raises(ValueError, match="no finished prompt and reply"):
        _create([("user", "Next")], previous=streaming)
    with pytest.raises(ValueError, match="at least one message"):
        _create([])


# --------------------------------------------------------------------------- per-user limits


def test_it_refuses_a_reply_over_the_users_queued_limit(catalogue, owner, stranger, settings):
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update={"max_queued_replies_per_user": 2})
    server = config.server.model_copy(update={"limits": limits})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})

    first = _create([("user", "one")], user=owner)
    _create([("user", "two")], user=owner)
    with pytest.raises(services.GenerationLimitReached, match="2 replies waiting"):
        _create([("user", "three")], user=owner)
    _create([("user", "someone else")], user=stranger)  # a limit per user

    first.mark_streaming(
        started_at=first.created_at, prompt_tokens=1, cached_tokens=0, trimmed_messages=0
    )
    _create([("user", "three")], user=owner)  # one started: room for one more
    assert Generation.objects.filter(user=owner).count() == 3


# --------------------------------------------------------------------------- the migration


@pytest.mark.django_db(transaction=True)
def test_the_migration_moves_copied_prompts_into_the_tree_and_back() -> None:
    before = [("inference", "0001_initial")]
    executor = MigrationExecutor(connection)
    # Up to the latest migration: the rows are then read through today's models.
    after = [node for node in executor.loader.graph.leaf_nodes() if node[0] == "inference"]
    try:
        executor.migrate(before)
        old = MigrationExecutor(connection).loader.project_state(before).apps
        OldGeneration = old.get_model("inference", "Generation")
        conversation = [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Name a bird."},
            {"role": "assistant", "content": "A wren."},
            {"role": "user", "content": "Another?"},
        ]
        rows = [
            OldGeneration.objects.create(model_id=MODEL_ID, messages=conversation[:1]),
            OldGeneration.objects.create(model_id=MODEL_ID, messages=conversation[:3]),
            OldGeneration.objects.create(model_id=MODEL_ID, messages=conversation),
            OldGeneration.objects.create(model_id=MODEL_ID, messages=[]),
        ]

        executor = MigrationExecutor(connection)
        executor.migrate(after)

        generations = {g.pk: g for g in Generation.objects.all()}
        assert generations[rows[2].pk].prompt_messages() == conversation
        assert generations[rows[1].pk].prompt_messages() == conversation[:3]
        assert generations[rows[0].pk].prompt_messages() == conversation[:1]
        assert generations[rows[3].pk].prompt is None
        assert PromptMessage.objects.count() == len(conversation)  # the turns share the prefix

        executor = MigrationExecutor(connection)
        executor.migrate(before)
        old = MigrationExecutor(connection).loader.project_state(before).apps
        restored = old.get_model("inference", "Generation").objects.get(pk=rows[2].pk)
        assert restored.messages == conversation
    finally:
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes()
        )
