"""What other apps may ask of the inference app: create a generation, stop it, read the catalogue.

Only this module and the worker write `Generation` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from inference.catalogue import ModelSpec, get_catalogue
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

logger = logging.getLogger(__name__)

ACTIVE_STATES = Generation.ACTIVE_STATES


def model_list(*, available_only: bool = False) -> list[ModelSpec]:
    """The models a request may name, for pickers and APIs."""
    catalogue = get_catalogue()
    return catalogue.available() if available_only else catalogue.all()


def model_get(*, model_id: str) -> ModelSpec:
    """The spec of an allowed model; raises inference.catalogue.UnknownModel otherwise."""
    return get_catalogue().get(model_id)


def default_model_id() -> str:
    return get_catalogue().default_model_id


def generation_params(
    *, model_id: str, overrides: dict[str, Any] | None = None
) -> GenerationParams:
    """The model's default sampling with the request's overrides on top, validated and capped.

    Raises pydantic.ValidationError on bad overrides and UnknownModel on a bad model id.
    """
    spec = get_catalogue().get(model_id)
    values = {**spec.sampling, **(overrides or {})}
    params = GenerationParams.model_validate(values)
    cap = settings.MLXWEB_CONFIG.server.limits.max_new_tokens
    if params.max_tokens > cap:
        params = params.model_copy(update={"max_tokens": cap})
    return params


def _send(channel: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    async_to_sync(layer.send)(channel, message)


def generation_create(
    *,
    model_id: str,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    notify_group: str = "",
) -> Generation:
    """Record a generation and hand it to the worker once the row is committed.

    The row exists before the first token, so a page rendered at any moment finds it.
    """
    get_catalogue().get(model_id)  # only allowed models reach the worker
    generation = Generation.objects.create(
        model_id=model_id,
        messages=[m.model_dump() for m in messages],
        params=params.model_dump(),
        notify_group=notify_group,
    )
    code = str(generation.code)
    transaction.on_commit(
        lambda: _send(settings.INFERENCE_CHANNEL, {"type": "generation.start", "code": code})
    )
    return generation


def generation_stop(*, generation: Generation) -> None:
    """Ask the worker to stop a generation; the text so far is kept and marked stopped."""
    if not generation.is_active:
        return
    _send(settings.INFERENCE_CHANNEL, {"type": "generation.stop", "code": str(generation.code)})


def generation_request_sync(*, generation: Generation, reply_channel: str) -> None:
    """Ask the worker to send `reply_channel` the full text so far of an active generation."""
    _send(
        settings.INFERENCE_CHANNEL,
        {"type": "generation.sync", "code": str(generation.code), "reply_channel": reply_channel},
    )


def model_last_used() -> dict[str, datetime]:
    """When each model id last got a request."""
    rows = Generation.objects.values("model_id").annotate(last=Max("created_at"))
    return {row["model_id"]: row["last"] for row in rows}


def generation_count_active(*, model_ids: Sequence[str]) -> int:
    """Replies queued or streaming from these models right now."""
    if not model_ids:
        return 0
    return Generation.objects.filter(
        model_id__in=list(model_ids), state__in=Generation.ACTIVE_STATES
    ).count()


def generation_mark_orphans_interrupted(*, worker_id: str) -> int:
    """Mark generations left active by a worker that is gone as interrupted, keeping their text.

    Called once when a worker starts: only one inference worker serves a deployment, so any
    active generation that is not its own belongs to a dead one.
    """
    count = (
        Generation.objects.filter(state__in=Generation.ACTIVE_STATES)
        .exclude(worker_id=worker_id)
        .update(
            state=Generation.State.INTERRUPTED,
            finish_reason=Generation.FinishReason.INTERRUPTED,
            finished_at=timezone.now(),
        )
    )
    if count:
        logger.info("marked %d generation(s) of a dead worker interrupted", count)
    return count
