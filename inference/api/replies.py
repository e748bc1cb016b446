"""API requests' generations on the shared engine, heard through the channel layer.

A request joins a group of its own with a fresh channel *before* it creates its generations
(`notify_group`), so no delta can come before it listens; the worker sends `generation.delta` and
`generation.done` there, as it does to a chat's group. The row is the record: at the end the
finished row gives the answer, the reasoning, tool calls, token counts and the finish reason, and
any text a lost delta would have carried.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction

from inference import services as inference
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

logger = logging.getLogger(__name__)

# With no event for this long, the rows are read again: a generation whose `done` was lost
# (a channel layer that dropped it) still ends.
IDLE_CHECK_S = 10.0


@dataclass
class ReplyEvent:
    """One event of one choice: a piece of text (`kind` "delta") or its end ("done")."""

    kind: str
    index: int
    text: str = ""
    channel: str = "content"
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    generation: Generation | None = None


def answer_of(generation: Generation) -> str:
    """The answer without reasoning or tool-call markup (the raw text where the row has no
    separate answer)."""
    return str(getattr(generation, "content", generation.text) or "")


def reasoning_of(generation: Generation) -> str:
    return str(getattr(generation, "reasoning", "") or "")


def tool_calls_of(generation: Generation) -> list[dict[str, Any]]:
    return list(getattr(generation, "tool_calls", None) or [])


class ReplyStream:
    """The `n` generations of one API request, and the events they send.

    Use as `async with ReplyStream(...) as stream: async for event in stream.events()`; leaving
    the block early (a client that went away cancels the response) stops what is still running.
    """

    def __init__(
        self,
        *,
        user: Any | None,
        model_id: str,
        params: GenerationParams,
        messages: Sequence[ChatMessage] = (),
        prompt_text: str | None = None,
        prompts: Sequence[str] | None = None,
        n: int = 1,
    ) -> None:
        self.user = user
        self.model_id = model_id
        self.params = params
        self.messages = list(messages)
        # One raw prompt per choice (completions with a list of prompts), or `prompt_text` n times.
        if prompts is None:
            prompts = [prompt_text] * n if prompt_text is not None else []
        self.prompts = list(prompts)
        self.n = len(self.prompts) if self.prompts else n
        self.generations: list[Generation] = []
        self.done: dict[int, Generation] = {}
        # Characters of content sent per choice, to find text a lost delta carried.
        self.sent: dict[tuple[int, str], int] = {}
        self.group = f"api.{uuid.uuid4().hex}"
        self.channel = ""
        self._layer: Any = None

    async def __aenter__(self) -> ReplyStream:
        self._layer = get_channel_layer()
        self.channel = await self._layer.new_channel()
        await self._layer.group_add(self.group, self.channel)
        try:
            await database_sync_to_async(self._create_all)()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _create_all(self) -> None:
        # One transaction: the worker hears of the n generations together, once they all exist,
        # and a refusal of any (a per-user limit) leaves none behind.
        self.generations = []
        try:
            with transaction.atomic():
                for index in range(self.n):
                    kwargs: dict[str, Any] = {}
                    if self.prompts:
                        # A raw completion: no chat template (contract: `prompt_text`).
                        kwargs["prompt_text"] = self.prompts[index]
                    self.generations.append(
                        inference.generation_create(
                            model_id=self.model_id,
                            messages=self.messages,
                            params=self.params,
                            user=self.user,
                            notify_group=self.group,
                            **kwargs,
                        )
                    )
        except BaseException:
            self.generations = []
            raise

    async def close(self) -> None:
        """Stop the generations that have not ended and leave the group."""
        unfinished = [g for i, g in enumerate(self.generations) if i not in self.done]
        if unfinished:
            await database_sync_to_async(self._stop)(unfinished)
        if self._layer is not None and self.channel:
            await self._layer.group_discard(self.group, self.channel)
            self.channel = ""

    @staticmethod
    def _stop(generations: list[Generation]) -> None:
        for generation in generations:
            generation.refresh_from_db(fields=["state"])
            if generation.is_active:
                logger.info("API client went away: stopping generation %s", generation.code)
                inference.generation_stop(generation=generation)

    def _index_of(self, code: str) -> int | None:
        for index, generation in enumerate(self.generations):
            if str(generation.code) == code:
                return index
        return None

    async def _finished(self, index: int) -> list[ReplyEvent]:
        generation = self.generations[index]
        await database_sync_to_async(generation.refresh_from_db)()
        self.done[index] = generation
        events = []
        # Text whose delta was lost (or never sent) comes from the row before the end.
        for channel, text in (("reasoning", reasoning_of(generation)), ("content", None)):
            if text is None:
                text = answer_of(generation)
            sent = self.sent.get((index, channel), 0)
            if len(text) > sent:
                self.sent[(index, channel)] = len(text)
                events.append(ReplyEvent("delta", index, text=text[sent:], channel=channel))
        events.append(ReplyEvent("done", index, generation=generation))
        return events

    async def _recheck(self) -> list[ReplyEvent]:
        events: list[ReplyEvent] = []
        for index, generation in enumerate(self.generations):
            if index in self.done:
                continue
            state = await database_sync_to_async(
                lambda g=generation: (
                    Generation.objects.filter(pk=g.pk).values_list("state", flat=True).first()
                )
            )()
            if state not in Generation.ACTIVE_STATES:
                events += await self._finished(index)
        return events

    async def events(self) -> AsyncIterator[ReplyEvent]:
        """Deltas as they come, then each choice's end; ends when every choice has ended."""
        while len(self.done) < len(self.generations):
            try:
                message = await asyncio.wait_for(
                    self._layer.receive(self.channel), timeout=IDLE_CHECK_S
                )
            except TimeoutError:
                for event in await self._recheck():
                    yield event
                continue
            index = self._index_of(str(message.get("code", "")))
            if index is None or index in self.done:
                continue
            if message.get("type") == "generation.delta":
                channel = str(message.get("channel") or "content")
                text = str(message.get("text", ""))
                self.sent[(index, channel)] = self.sent.get((index, channel), 0) + len(text)
                yield ReplyEvent(
                    "delta",
                    index,
                    text=text,
                    channel=channel,
                    logprobs=list(message.get("logprobs") or []),
                )
            elif message.get("type") == "generation.done":
                for event in await self._finished(index):
                    yield event
