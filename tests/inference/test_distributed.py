"""A model served by two processes through MLX's distributed backend (ring over loopback), as
one inference worker behind Redis and PostgreSQL (issue 13, `inference.distributed`)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command

from inference.catalogue import Catalogue
from inference.distributed import GroupEngine, GroupLink
from inference.engine import Engine, Finished, GenerationRequest
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.inference.test_engine import QUESTION, Recorder
from tests.support.live import Site, free_port
from tests.support.scaleout import (
    chat,
    forget_workers,
    generation_rows,
    registered_workers,
    scaled_site,
    sign_up_and_open_chat,
)
from tests.support.waiting import wait_until

MEMBER_MODULE = "inference.distributed"

# --------------------------------------------------------------------------- in this process
# A group of one (mx.distributed.init() outside the launcher): the leader's side of every
# collective and all of GroupEngine's decisions, against the single-process engine.


@pytest.fixture(scope="module")
def catalogue(tiny_model_dir: Path) -> Catalogue:
    server = ServerConfig.model_validate({"default_model": "tiny"})
    return Catalogue(Config(server=server, models={}), tiny_model_dir.parent)


@pytest.fixture(scope="module")
def group_engine(
    catalogue: Catalogue, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GroupEngine]:
    import mlx.core as mx

    engine = GroupEngine(
        link=GroupLink(mx.distributed.init()),
        catalogue=catalogue,
        converted_dir=tmp_path_factory.mktemp("converted"),
        model_id="tiny",
        max_prompt_tokens=4096,
        max_new_tokens=512,
    )
    engine.start()
    yield engine
    engine.stop()


def _ask(engine: Any, request_id: str, model_id: str = "tiny", **params: Any) -> Recorder:
    recorder = Recorder()
    request = GenerationRequest(
        id=request_id,
        model_id=model_id,
        messages=QUESTION,
        params=GenerationParams(**{"temperature": 0.0, "max_tokens": 16, **params}),
    )
    engine.submit(request, recorder)
    return recorder.wait(120)


def test_a_group_engine_writes_what_the_engine_writes(
    group_engine: GroupEngine, catalogue: Catalogue, tmp_path: Path
) -> None:
    engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted")
    engine.start()
    try:
        expected = _ask(engine, "single")
    finally:
        engine.stop()

    got = _ask(group_engine, "group")

    assert got.text == expected.text and got.text
    finished = got.events[-1]
    assert isinstance(finished, Finished)
    assert (finished.finish_reason, finished.completion_tokens) == ("max_tokens", 16)
    assert got.started is not None and got.started.prompt_tokens == finished.prompt_tokens
    assert group_engine.loaded_models()[0]["model_id"] == "tiny"


def test_a_group_engine_stops_at_a_stop_string_and_keeps_what_came_before(
    group_engine: GroupEngine,
) -> None:
    whole = _ask(group_engine, "whole").text
    stop = whole[len(whole) // 2 :][:3]
    cut = _ask(group_engine, "cut", stop=[stop])

    assert cut.text == whole[: whole.index(stop)]
    finished = cut.events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stop_string"


def test_a_group_engine_refuses_what_it_does_not_serve(group_engine: GroupEngine) -> None:
    other = _ask(group_engine, "other-model", model_id="another")
    tools = _ask(
        group_engine,
        "tools",
        tools=[{"name": "clock", "description": "the time", "parameters": {"type": "object"}}],
    )

    for recorder, why in ((other, "serving only 'tiny'"), (tools, "does not serve tools")):
        [finished] = recorder.events
        assert isinstance(finished, Finished) and finished.finish_reason == "error"
        assert why in finished.error


def test_a_group_engine_stops_a_cancelled_request(group_engine: GroupEngine) -> None:
    recorder = Recorder()
    request = GenerationRequest(
        id="long",
        model_id="tiny",
        messages=QUESTION,
        params=GenerationParams(temperature=0.0, max_tokens=400),
    )
    group_engine.submit(request, recorder)
    wait_until(lambda: recorder.deltas, timeout=60, interval=0.01, what="the first token")
    group_engine.cancel("long")
    recorder.wait(60)

    finished = recorder.events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stopped"
    assert finished.completion_tokens < 400 and recorder.text


def test_the_group_command_checks_its_arguments(settings: Any) -> None:
    settings.REDIS_URL = ""
    with pytest.raises(CommandError, match="no redis_url"):
        call_command("inference_group", "tiny")
    settings.REDIS_URL = "redis://127.0.0.1:6379/14"
    with pytest.raises(CommandError, match="--size must be between 1 and 64"):
        call_command("inference_group", "tiny", "--size", "0")
    with pytest.raises(CommandError, match="no such file"):
        call_command("inference_group", "tiny", "--hostfile", "/nonexistent/hosts.json")
    with pytest.raises(CommandError, match="unknown model"):
        call_command("inference_group", "no-such-model")


# --------------------------------------------------------------------------- two processes


@pytest.fixture
def group_site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Site, str]]:
    with scaled_site(tmp_path, tiny_model_dir) as (site, db_url):
        site.start("group", "inference_group", "tiny", "--size", "2", "--port", str(free_port()))
        site.serve()
        yield site, db_url
        site.stop("group")  # SIGTERM: the group ends its replies and exits


def _members() -> dict[int, int]:
    """The group's member processes here: rank -> pid (MLX's launcher sets MLX_RANK)."""
    members = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if MEMBER_MODULE.encode() not in cmdline or b"-m" not in cmdline:
            continue
        for entry in environ:
            if entry.startswith(b"MLX_RANK="):
                members[int(entry.split(b"=", 1)[1])] = int(pid)
    return members


def _greedy_reference(model_dir: Path, db_url: str, max_tokens: int) -> str:
    """What one process writes for the last reply's prompt: mlx-lm alone, greedy."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            """
            WITH RECURSIVE path(id, parent_id, role, content, depth) AS (
                SELECT id, parent_id, role, content, 0 FROM inference_promptmessage
                WHERE id = (SELECT prompt_id FROM inference_generation ORDER BY id DESC LIMIT 1)
                UNION ALL
                SELECT node.id, node.parent_id, node.role, node.content, path.depth + 1
                FROM inference_promptmessage AS node JOIN path ON node.id = path.parent_id
            )
            SELECT role, content FROM path ORDER BY depth DESC
            """
        ).fetchall()
    model, tokenizer = load(str(model_dir))[:2]
    messages = [{"role": role, "content": content} for role, content in rows]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if int(token) in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(int(token))
    detokenizer.finalize()
    return str(detokenizer.text)


def _wait_for_the_group(db_url: str) -> None:
    """Until the group's heartbeat says it serves the tiny model."""

    def serving() -> bool:
        beats = registered_workers()
        return any(m.get("model_id") == "tiny" for beat in beats for m in beat.loaded)

    wait_until(serving, timeout=180, interval=0.2, what="the group to serve the model")


def _wait_for_members(count: int = 2) -> dict[int, int]:
    found: dict[int, int] = {}

    def ready() -> bool:
        found.clear()
        found.update(_members())
        return len(found) == count

    wait_until(ready, timeout=120, interval=0.2, what=f"{count} group members")
    return dict(found)


@pytest.mark.scaleout
@pytest.mark.timeout(300)
def test_a_group_of_two_writes_what_one_process_writes(
    group_site: tuple[Site, str], tiny_model_dir: Path
) -> None:
    site, db_url = group_site
    assert sorted(_wait_for_members()) == [0, 1]
    _wait_for_the_group(db_url)
    client, code = sign_up_and_open_chat(site)

    asyncio.run(
        chat(
            site, client, code, "Hello, group", 'class="body md"',
            temperature="0", max_tokens="24",
        )
    )  # fmt: skip

    [(state, text, tokens)] = generation_rows(db_url)
    assert state == "complete" and tokens > 0
    assert text == _greedy_reference(tiny_model_dir, db_url, 24)
    assert "group of 2 serving tiny" in site.log("group")


@pytest.mark.scaleout
@pytest.mark.timeout(300)
def test_a_member_killed_ends_the_reply_interrupted_and_the_group_starts_again(
    group_site: tuple[Site, str],
) -> None:
    site, db_url = group_site
    members = _wait_for_members()
    _wait_for_the_group(db_url)
    client, code = sign_up_and_open_chat(site)

    async def start_a_long_reply() -> None:
        await chat(
            site, client, code, "Go on and on", "beforeend:#reply-",
            max_tokens="2000", temperature="0",
        )  # fmt: skip

    asyncio.run(start_a_long_reply())
    wait_until(
        lambda: generation_rows(db_url)[0][1],
        timeout=60,
        interval=0.05,
        what="the reply's first flush",
    )
    flushed = generation_rows(db_url)[0][1]
    os.kill(members[1], signal.SIGKILL)

    wait_until(
        lambda: generation_rows(db_url)[0][0] != "streaming",
        timeout=60,
        interval=0.1,
        what="the reply to end",
    )
    [(state, text, _)] = generation_rows(db_url)
    assert state == "interrupted"
    assert text.startswith(flushed) and text, "the text written before the kill was kept"

    # The supervisor starts a new group, which serves the next message.
    wait_until(
        lambda: set(_members().values()).isdisjoint(members.values()) and len(_members()) == 2,
        timeout=120,
        interval=0.2,
        what="a new group",
    )
    forget_workers()
    _wait_for_the_group(db_url)
    # (The socket first gets the interrupted reply's final frame: wait for the new one's text.)
    asyncio.run(chat(site, client, code, "Again", "beforeend:#reply-", max_tokens="8"))

    def replies() -> list[str]:
        with psycopg.connect(db_url) as conn:
            rows = conn.execute(
                "SELECT state FROM inference_generation "
                "WHERE COALESCE(details->>'priority', '') <> 'batch' ORDER BY id"  # not titles
            ).fetchall()
        return [state for (state,) in rows]

    wait_until(
        lambda: replies() == ["interrupted", "complete"],
        timeout=120,
        interval=0.2,
        what="the new group to answer the next message",
    )
