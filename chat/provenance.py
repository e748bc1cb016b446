"""Where a reply came from, and going again from there (issue 9): the details a reply shows
(its provenance, the exact prompt), "replay with..." another model or preset as a new version
of the turn, two versions side by side, and the token-level fork (a reply's token, one of its
alternatives, and the model going on from there as a new version).

New versions are sibling assistant messages (same parent), shown from now on, like the branch
features' regenerate (`chat.services.message_regenerate`, which replay goes through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from chat import services as chat_services
from chat.models import Conversation, Message
from chat.services import ChatError
from inference import services as inference
from inference.catalogue import UnknownModel
from inference.models import Generation
from inference.provenance import trace_text

# The sampler settings shown, in this order, with their labels.
_SAMPLER_LABELS = {
    "temperature": "temperature",
    "top_p": "top-p",
    "top_k": "top-k",
    "min_p": "min-p",
    "repetition_penalty": "repetition penalty",
    "presence_penalty": "presence penalty",
    "frequency_penalty": "frequency penalty",
    "max_tokens": "max tokens",
}


@dataclass(frozen=True)
class ProvenanceRow:
    label: str
    value: str
    # The full value when `value` is shortened (a hash): shown as the title, copied whole.
    full: str = ""


def _short(digest: str) -> str:
    return digest[:12] if digest else "unknown"


def provenance_rows(generation: Generation) -> list[ProvenanceRow]:
    """What the details popover lists for a reply, from its recorded provenance."""
    p = generation.provenance or {}
    rows = [ProvenanceRow("Model", str(p.get("model_id") or generation.model_id))]
    if p.get("kind"):
        source = f"{p['kind']}: {p.get('source', '')}".rstrip(": ")
        rows.append(ProvenanceRow("Weights", source))
    if p.get("hub_repo") or p.get("revision"):
        revision = f"{p.get('hub_repo', '')}@{p.get('revision', '')}".strip("@")
        rows.append(ProvenanceRow("Revision", revision))
    if p.get("weights_fingerprint"):
        fingerprint = str(p["weights_fingerprint"])
        rows.append(ProvenanceRow("Weights fingerprint", _short(fingerprint), fingerprint))
    made = p.get("made_from") or {}
    if made:
        rows.append(ProvenanceRow("Made from", f"{made.get('kind', '')} {made.get('path', '')}"))
    quant = p.get("quantization") or {}
    if quant:
        if quant.get("method") == "none":
            text = "none"
        else:
            text = f"{quant.get('method', '')} {quant.get('bits', '?')}-bit"
            if quant.get("group_size"):
                text += f", group {quant['group_size']}"
            if quant.get("mixed"):
                text += f" (layers: {', '.join(quant['mixed'])})"
        rows.append(ProvenanceRow("Quantization", text))
    if p.get("compute_dtype") or p.get("device"):
        rows.append(
            ProvenanceRow("Computed in", f"{p.get('compute_dtype', '')} on {p.get('device', '')}")
        )
    if "chat_template_sha256" in p:
        digest = str(p["chat_template_sha256"])
        label = _short(digest) + (" (configured)" if p.get("chat_template_overridden") else "")
        rows.append(ProvenanceRow("Chat template", label if digest else "none", digest))
    sampler = p.get("sampler") or generation.params or {}
    if sampler:
        if p.get("greedy") or sampler.get("temperature") == 0:
            settings = "greedy"
        else:
            settings = ", ".join(
                f"{label} {sampler[name]}"
                for name, label in _SAMPLER_LABELS.items()
                if name in sampler and name != "max_tokens"
            )
        rows.append(ProvenanceRow("Sampler", settings))
        if "max_tokens" in sampler:
            rows.append(ProvenanceRow("Max tokens", str(sampler["max_tokens"])))
        if sampler.get("stop"):
            rows.append(ProvenanceRow("Stop strings", ", ".join(map(repr, sampler["stop"]))))
    seed_source = p.get("seed_source")
    if seed_source == "greedy":
        rows.append(ProvenanceRow("Seed", "none needed (greedy)"))
    elif p.get("seed") is not None:
        how = "picked for this reply" if seed_source == "picked" else "given"
        rows.append(ProvenanceRow("Seed", f"{p['seed']} ({how})"))
    elif seed_source == "none":
        rows.append(ProvenanceRow("Seed", "none (not replayable exactly)"))
    versions = p.get("versions") or {}
    if versions:
        text = ", ".join(f"{name.replace('_', '-')} {v}" for name, v in versions.items() if v)
        rows.append(ProvenanceRow("Libraries", text))
    if p.get("continues"):
        rows.append(
            ProvenanceRow(
                "Continues",
                f"another version's first {p.get('prefix_chars', 0)} characters",
            )
        )
    if not p:
        rows.append(ProvenanceRow("Recorded", "nothing (a reply from before provenance)"))
    return rows


# --- replay ------------------------------------------------------------------------------


def replay_choices(conversation: Conversation) -> tuple[list[Any], list[str]]:
    """(the models a reply may be replayed with, the user's preset names)."""
    from chat.presets import Presets

    models = inference.model_list(available_only=True, task="generate")
    return models, Presets(conversation.user).names()


def reply_replay(
    *,
    conversation: Conversation,
    message_code: str,
    model_id: str = "",
    preset: str = "",
) -> Message:
    """The turn of `message_code` answered again with another model and/or a preset's
    settings (sampling values and model; the prompt stays the turn's, so the two versions
    answer the same prompt), as a new version shown from now on. Raises ChatError."""
    from chat.presets import PresetError, Presets

    if not model_id and not preset:
        raise ChatError("Choose a model or a preset to replay with.")
    params: dict[str, Any] = {}
    if preset:
        try:
            resolved = Presets(conversation.user).get(preset)
        except PresetError as e:
            raise ChatError(f"That preset cannot be used: {e}") from e
        params = dict(resolved.sampling)
        model_id = model_id or (resolved.model or "")
    if model_id:
        try:
            spec = inference.model_get(model_id=model_id)
        except UnknownModel as e:
            raise ChatError(f"Unknown model {model_id!r}.") from e
        if spec.task != "generate" or not spec.is_available:
            raise ChatError(
                f"The model {model_id!r} cannot answer now (not a chat model, or "
                "its weights are not on this machine)."
            )
    try:
        return chat_services.message_regenerate(
            conversation=conversation,
            message_code=message_code,
            model_id=model_id or None,
            params=params or None,
        )
    except inference.GenerationQueueFull as e:
        raise ChatError(str(e)) from e


# --- two versions side by side -------------------------------------------------------------


def versions_of(conversation: Conversation, message_code: str) -> list[Message]:
    """The versions (siblings, oldest first) of a reply of `conversation`; ChatError if the
    code is not one of its replies."""
    target = (
        Message.objects.filter(conversation=conversation, code=message_code)
        .only("parent_id", "role")
        .first()
    )
    if target is None or target.role != Message.Role.ASSISTANT:
        raise ChatError("No such reply in this conversation.")
    return list(
        Message.objects.filter(conversation=conversation, parent_id=target.parent_id)
        .filter(role=Message.Role.ASSISTANT)
        .select_related("generation")
        .defer("generation__token_trace")  # the compare page shows no tokens
        .order_by("id")
    )


# --- the token trace and the token-level fork ----------------------------------------------


@dataclass(frozen=True)
class TraceToken:
    """One token of a finished reply as the token view shows it."""

    index: int
    text: str
    probability: float  # 0..1
    alternatives: list[dict[str, Any]]  # {"index", "token", "probability", "chosen"}


def _probability(logprob: Any) -> float:
    try:
        return math.exp(float(logprob))
    except (TypeError, ValueError, OverflowError):
        return 0.0


def trace_tokens(generation: Generation) -> list[TraceToken]:
    """The reply's tokens with their probabilities and alternatives, in order."""
    tokens = []
    for i, entry in enumerate(generation.token_trace or []):
        alternatives = [
            {
                "index": j,
                "token": alt.get("token", ""),
                "probability": _probability(alt.get("logprob")),
                "chosen": alt.get("token") == entry.get("token"),
            }
            for j, alt in enumerate(entry.get("top") or [])
        ]
        tokens.append(
            TraceToken(
                index=i,
                text=str(entry.get("token", "")),
                probability=_probability(entry.get("logprob")),
                alternatives=alternatives,
            )
        )
    return tokens


def _fork_prefix(generation: Generation, index: int, choice: int) -> tuple[str, list[Any]]:
    """(the text up to token `index` with alternative `choice` in its place, the trace entries
    of that text)."""
    trace = generation.token_trace or []
    if not 0 <= index < len(trace):
        raise ChatError("That token is not in this reply.")
    top = trace[index].get("top") or []
    if not 0 <= choice < len(top):
        raise ChatError("That alternative is not offered for this token.")
    alternative = top[choice]
    chosen = {
        "token": alternative.get("token", ""),
        "logprob": alternative.get("logprob", 0.0),
        "top": top,
    }
    for key in ("id", "bytes"):
        if key in alternative:
            chosen[key] = alternative[key]
    entries = [*trace[:index], chosen]
    text = trace_text(entries)
    # Detokenizers trim the space a reply starts with: the text of the row never has it.
    first = trace_text(trace[:1])
    if first.startswith(" ") and not generation.text.startswith(" "):
        text = text.removeprefix(" ")
    return text, entries


@transaction.atomic
def reply_fork(
    *, conversation: Conversation, message_code: str, index: int, choice: int
) -> Message:
    """Token `index` of a finished reply replaced by its alternative `choice`, and the model
    going on from there: a new version of the reply (a sibling), shown from now on, whose text
    starts with the reply's text up to that token and the chosen token. Raises ChatError."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    target = (
        Message.objects.select_related("generation")
        .filter(conversation=conversation, code=message_code, role=Message.Role.ASSISTANT)
        .first()
    )
    if target is None or target.generation is None:
        raise ChatError("No such reply in this conversation.")
    generation = target.generation
    if generation.is_active:
        raise ChatError("Wait for the reply to finish before forking it.")
    if not generation.token_trace:
        raise ChatError("This reply has no token trace to fork from.")
    if Message.objects.filter(
        conversation=conversation, generation__state__in=inference.ACTIVE_STATES
    ).exists():
        raise ChatError("Wait for the reply to finish, or stop it, before starting another.")
    prefix, entries = _fork_prefix(generation, index, choice)
    try:
        forked = inference.generation_continue(
            generation=generation,
            prefix=prefix,
            trace_prefix=entries,
            user=conversation.user,
            notify_group=conversation.group_name,
        )
    except inference.NotContinuable as e:
        raise ChatError(f"This reply cannot be forked: {e}.") from e
    except (inference.GenerationLimitReached, inference.GenerationQueueFull) as e:
        raise ChatError(str(e)) from e
    return chat_services.reply_version_show(
        conversation=conversation, target=target, generation=forked
    )
