"""The chat websocket: one socket per open conversation tab.

It authorizes in connect(), validates each message, and only enqueues work (through
chat.services) and relays the worker's events as HTML frames rendered from the page's own
template partials. It never runs a generation loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from pydantic import ValidationError

from chat import branch_frames, frames, services
from chat import presets as chat_presets
from chat.branches import branch_action
from chat.models import Conversation, Message, ToolStep
from chat.schemas import (
    BranchAction,
    FrameError,
    SendMessage,
    StopReply,
    ToolDecision,
    describe_error,
    parse_message,
    read_frame,
)
from inference import services as inference
from inference.catalogue import UnknownModel

logger = logging.getLogger(__name__)

# Close codes: 4401 not signed in, 4404 no such conversation for this user.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


@database_sync_to_async
def _conversation_for_user(user: Any, code: str) -> Conversation | None:
    return Conversation.objects.filter(user=user, code=code).first()


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """ws/conversations/<code>/: send turns, stop replies, and watch replies stream."""

    conversation: Conversation

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tasks: set[asyncio.Future[None]] = set()
        # The title generations of this conversation: their deltas are not for the page.
        self._title_codes: set[str] = set()

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        code = self.scope["url_route"]["kwargs"]["code"]
        conversation = await _conversation_for_user(user, code)
        if conversation is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.conversation = conversation
        await self.channel_layer.group_add(conversation.group_name, self.channel_name)
        await self.channel_layer.group_add(services.title_group(conversation), self.channel_name)
        await self.accept()
        # A reply may have streamed on while the page was being rendered: ask the worker for
        # the exact text so far. Deltas that arrive before the snapshot are overwritten by it.
        for reply in await database_sync_to_async(services.active_replies)(
            conversation=conversation
        ):
            assert reply.generation is not None
            await database_sync_to_async(inference.generation_request_sync)(
                generation=reply.generation, reply_channel=self.channel_name
            )
        # A tool loop left mid-way (no tab was open when its reply ended) goes on.
        last = await database_sync_to_async(
            lambda: (
                Message.objects.select_related("generation")
                .filter(pk=conversation.leaf_id)
                .first()
            )
        )()
        if last is not None and last.role == Message.Role.ASSISTANT:
            # A reply that ended between the page's render and this socket joining the group
            # missed its last frame: send it (the frame is the row's, the same however often).
            if last.generation is not None and not last.generation.is_active:
                await self.send(text_data=await database_sync_to_async(frames.reply_frame)(last))
            await self._advance_tools(last)
        # A title that finished while no tab was open is applied now; one that is due (the
        # first reply ended with no tab open) starts now. After the tool loop: a step waiting
        # for the user's approval is theirs to see first; the title is a nicety.
        if await database_sync_to_async(services.title_apply)(conversation=conversation):
            await self._send_sidebar()
        await self._title_after_reply()

    async def disconnect(self, code: int) -> None:
        # Leaving never stops a reply: the worker finishes and saves it.
        if hasattr(self, "conversation"):
            await self.channel_layer.group_discard(self.conversation.group_name, self.channel_name)
            await self.channel_layer.group_discard(
                services.title_group(self.conversation), self.channel_name
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        limit = settings.MLXWEB_CONFIG.server.limits.ws_max_message_bytes
        try:
            content = read_frame(text_data, bytes_data, max_bytes=limit)
        except FrameError as e:
            await self._error(str(e))
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        try:
            message = parse_message(content)
        except ValidationError as e:
            await self._error(f"Invalid message: {describe_error(e)}")
            return
        except ValueError as e:
            await self._error(str(e))
            return
        if isinstance(message, SendMessage):
            await self._send_turn(message)
        elif isinstance(message, ToolDecision):
            await self._decide(message)
        elif isinstance(message, StopReply):
            await self._stop(message)
        else:
            await self._branch(message)

    async def _branch(self, action: BranchAction) -> None:
        """Regenerate, continue, switch, edit, delete, fork, pin, rename: every open tab of
        the conversation shows the result; a fork opens in this tab."""
        try:
            outcome = await database_sync_to_async(branch_action)(
                conversation=self.conversation, action=action
            )
        except services.ChatError as e:
            await self._error(str(e))
            return
        except UnknownModel:
            await self._error(f"Unknown model {getattr(action, 'model', '')!r}.")
            return
        except ValidationError as e:
            await self._error(f"Invalid options: {describe_error(e)}")
            return
        html = await database_sync_to_async(branch_frames.branch_frame)(
            conversation=self.conversation, messages=outcome.kind == "messages"
        )
        await self.channel_layer.group_send(
            self.conversation.group_name, {"type": "chat.html", "html": html}
        )
        if outcome.kind == "navigate":
            await self.send(
                text_data=await database_sync_to_async(branch_frames.branch_frame)(
                    conversation=self.conversation, messages=False, location=outcome.location
                )
            )

    async def _send_sidebar(self) -> None:
        html = await database_sync_to_async(branch_frames.branch_frame)(
            conversation=self.conversation, messages=False
        )
        await self.send(text_data=html)

    async def _title_after_reply(self) -> None:
        """Start the title once the first reply has ended (every tab asks; one starts it)."""
        try:
            generation = await database_sync_to_async(services.title_start)(
                conversation=self.conversation
            )
        except Exception:  # a title is a nicety: it must never break the conversation's socket
            logger.exception("title of conversation %s", self.conversation.code)
            return
        if generation is not None:
            self._title_codes.add(str(generation.code))

    async def _send_turn(self, message: SendMessage) -> None:
        try:
            user_message, reply = await database_sync_to_async(services.message_send)(
                conversation=self.conversation,
                text=message.text,
                model_id=message.model,
                params=message.sampling(),
                tools=message.tools_enabled,
            )
        except services.ChatError as e:
            await self._error(str(e))
            return
        except UnknownModel:
            await self._error(f"Unknown model {message.model!r}.")
            return
        except ValidationError as e:
            await self._error(f"Invalid options: {describe_error(e)}")
            return
        # The composer's options stick: the composer frame below shows them again.
        await database_sync_to_async(chat_presets.conversation_keep_options)(
            conversation=self.conversation, message=message
        )
        html = await database_sync_to_async(frames.turn_frame)(
            conversation=self.conversation, messages=[user_message, reply]
        )
        await self.channel_layer.group_send(
            self.conversation.group_name, {"type": "chat.html", "html": html}
        )
        # Only the sender's composer is cleared; other tabs keep what they were typing.
        composer = await database_sync_to_async(frames.composer_frame)(
            conversation=self.conversation
        )
        await self.send(text_data=composer)

    async def _stop(self, message: StopReply) -> None:
        try:
            reply = await database_sync_to_async(services.reply_stop)(
                conversation=self.conversation, reply_code=message.reply
            )
        except services.ChatError as e:
            await self._error(str(e))
            return
        if reply.generation is not None and not reply.generation.is_active:
            await self._broadcast_reply(reply)  # a tool loop stopped between generations

    async def _decide(self, message: ToolDecision) -> None:
        try:
            step = await database_sync_to_async(services.tool_step_decide)(
                conversation=self.conversation, step_code=message.step, decision=message.decision
            )
        except services.ChatError as e:
            await self._error(str(e))
            return
        reply = await database_sync_to_async(lambda: step.message)()
        await self._broadcast_reply(reply)
        await self._advance_tools(reply)

    # --- the tool loop --------------------------------------------------------------------
    # Every open tab runs these on a reply's end; the services make each step run once and the
    # reply continue once. Tools run in a worker thread, in a task of their own, so the socket
    # keeps answering (the stop button) while they run.

    async def _broadcast_reply(self, reply: Message) -> None:
        html = await database_sync_to_async(frames.reply_frame)(reply)
        await self.channel_layer.group_send(
            self.conversation.group_name, {"type": "chat.html", "html": html}
        )

    async def _advance_tools(self, reply: Message) -> None:
        made = await database_sync_to_async(services.tool_steps_record)(reply=reply)
        pending = await database_sync_to_async(
            lambda: list(reply.tool_steps.filter(state=ToolStep.State.QUEUED))
        )()
        if made:  # every tab shows the new steps, those that wait for the user above all
            await self._broadcast_reply(reply)
        for step in pending:
            task = asyncio.ensure_future(self._run_step(reply, step))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not pending:
            await self._continue(reply)

    async def _run_step(self, reply: Message, step: ToolStep) -> None:
        try:
            if not await database_sync_to_async(services.tool_step_claim)(step=step):
                return
            await self._broadcast_reply(reply)  # every tab shows it running
            try:
                await database_sync_to_async(services.tool_step_run, thread_sensitive=False)(
                    step=step
                )
            except Exception as e:  # the step ends failed rather than running for ever
                logger.exception("tool step %s could not finish", step.code)
                await database_sync_to_async(services.tool_step_fail)(step=step, error=str(e))
            await self._broadcast_reply(reply)
            await self._continue(reply)
        except Exception:
            logger.exception("tool step %s failed", step.code)

    async def _continue(self, reply: Message) -> None:
        try:
            message = await database_sync_to_async(services.tool_round_continue)(reply=reply)
        except services.ChatError as e:
            await self._error(str(e))
            return
        if message is None:
            return
        await self._broadcast_reply(reply)
        html = await database_sync_to_async(frames.turn_frame)(
            conversation=self.conversation, messages=[message]
        )
        await self.channel_layer.group_send(
            self.conversation.group_name, {"type": "chat.html", "html": html}
        )

    async def _error(self, text: str) -> None:
        await self.send(text_data=frames.error_frame(text))

    # --- group events ---------------------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels runs close_old_connections() in the sync thread before every handler. A
        # delta touches no database, and that hop queues it behind the worker's text flushes
        # in the same thread: ~10 ms on every streamed token (docs/benchmarks.md).
        if message.get("type") == "generation.delta":
            if message.get("code") not in self._title_codes:
                await self.generation_delta(message)
            return
        await super().dispatch(message)

    async def chat_html(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["html"])

    async def generation_delta(self, event: dict[str, Any]) -> None:
        # The worker splits reasoning from the answer as it streams (inference.parsing): each
        # goes to its own part of the live reply.
        await self.send(
            text_data=frames.delta_frame(
                code=event["code"], text=event["text"], channel=event.get("channel", "content")
            )
        )

    async def generation_snapshot(self, event: dict[str, Any]) -> None:
        await self.send(text_data=frames.snapshot_frame(code=event["code"], text=event["text"]))

    async def generation_resumed(self, event: dict[str, Any]) -> None:
        # The reply's worker went away and another goes on with its text (a new generation:
        # inference.cluster.resume). Render the message, now the new one's, then ask for its
        # exact text so far: its first deltas may have come before the page had its place.
        reply = await database_sync_to_async(
            lambda: (
                Message.objects.select_related("generation")
                .filter(conversation=self.conversation, generation__code=event["code"])
                .first()
            )
        )()
        if reply is None or reply.generation is None:
            return
        await self.send(text_data=await database_sync_to_async(frames.reply_frame)(reply))
        if reply.generation.is_active:
            await database_sync_to_async(inference.generation_request_sync)(
                generation=reply.generation, reply_channel=self.channel_name
            )

    async def generation_done(self, event: dict[str, Any]) -> None:
        reply = await database_sync_to_async(
            lambda: (
                Message.objects.select_related("generation")
                .filter(conversation=self.conversation, generation__code=event["code"])
                .first()
            )
        )()
        if reply is not None:
            await self.send(text_data=await database_sync_to_async(frames.reply_frame)(reply))
            await self._advance_tools(reply)
            await self._title_after_reply()
        elif event["code"] in self._title_codes:
            # Every tab applies it (only the first changes the row) and shows the title.
            await database_sync_to_async(services.title_apply)(conversation=self.conversation)
            await self._send_sidebar()
