"""Presets in the chat and a conversation's sticky settings (issue 9).

A user sees the built-in presets of `configs/presets/` and their own `Preset` rows; either may
extend the other by name (inference.presets resolves the chains). A conversation stores the
preset's name, its own system prompt and its own sampling values; what it leaves blank comes
from the preset, then from the model's config, then from GenerationParams. `generation_settings`
is what a send uses; `conversation_settings` is what the side panel shows, each value with
where it comes from.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from chat.models import Conversation
from chat.models import Preset as PresetRow
from inference import services as inference
from inference.catalogue import UnknownModel
from inference.models import Generation
from inference.presets import (
    SAMPLING_FIELDS,
    Preset,
    PresetError,
    PresetSpec,
    load_preset_specs,
    load_presets,
    render_system_prompt,
    resolve,
    system_prompt_pattern,
)
from inference.schemas import ChatMessage, GenerationParams


def presets_dir() -> Path:
    """configs/presets of the configs folder in use (MLXWEB_CONFIG_DIR moves it)."""
    from mlxweb.config import DEFAULT_CONFIG_DIR

    return Path(os.environ.get("MLXWEB_CONFIG_DIR") or DEFAULT_CONFIG_DIR) / "presets"


@functools.cache
def _builtins(directory: Path) -> dict[str, PresetSpec]:
    load_presets(directory)  # every chain resolves, or PresetError names the file
    return load_preset_specs(directory)


def builtin_specs() -> dict[str, PresetSpec]:
    """The built-in presets as written, read and checked once per folder."""
    return _builtins(presets_dir())


def _spec_of(row: PresetRow) -> PresetSpec:
    try:
        return PresetSpec(
            name=row.name,
            description=row.description,
            extends=row.extends,
            system=row.system_prompt or None,
            sampling=row.params or {},
            model=row.model_id,
            tools=row.tools,
        )
    except ValidationError as e:  # a row written by hand, or bounds that changed since
        raise PresetError(f"preset {row.name!r} is not valid: {e}") from None


class Presets:
    """The presets one user can use: the built-ins and their own, looked up by name."""

    def __init__(self, user: AbstractBaseUser) -> None:
        self.rows = {row.name: row for row in PresetRow.objects.filter(user_id=user.pk)}
        # A broken built-in file leaves the built-ins out and says why (the presets page
        # shows it) rather than breaking every chat page.
        self.problem = ""
        try:
            self.builtins = builtin_specs()
        except PresetError as e:
            self.builtins = {}
            self.problem = str(e)

    def spec(self, name: str) -> PresetSpec | None:
        row = self.rows.get(name)
        if row is not None:
            return _spec_of(row)
        return self.builtins.get(name)

    def get(self, name: str) -> Preset:
        """`name` resolved; raises PresetError (unknown, broken chain, invalid row)."""
        return resolve(name, self.spec)

    def names(self) -> list[str]:
        return sorted({*self.builtins, *self.rows})

    def listing(self) -> list[tuple[str, Preset | None, str]]:
        """(name, resolved preset or None, the problem) for each, built-ins first."""
        result: list[tuple[str, Preset | None, str]] = []
        for name in [*sorted(self.builtins), *sorted(set(self.rows) - set(self.builtins))]:
            try:
                result.append((name, self.get(name), ""))
            except PresetError as e:
                result.append((name, None, str(e)))
        return result

    def children(self, name: str) -> list[str]:
        """The user's presets that extend `name` directly."""
        return sorted(r.name for r in self.rows.values() if r.extends == name)


def sampling_defaults(model_id: str) -> dict[str, Any]:
    """What a generation of `model_id` samples with when nothing else is set: its config's
    values over GenerationParams' defaults."""
    try:
        configured = inference.model_get(model_id=model_id).sampling
    except UnknownModel:
        configured = {}
    base = GenerationParams().model_dump()
    return {name: configured.get(name, base[name]) for name in SAMPLING_FIELDS}


@dataclass(frozen=True)
class FieldSource:
    """What a blank settings field means: the value that applies, and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class ConversationSettings:
    """A conversation's settings as the side panel shows them."""

    preset: Preset | None
    preset_problem: str
    system_prompt: str  # the template that applies (the conversation's own or the preset's)
    system_source: str
    inherited: dict[str, FieldSource]  # per sampling field: what a blank field means
    tools: bool


def _preset_or_problem(conversation: Conversation, presets: Presets) -> tuple[Preset | None, str]:
    if not conversation.preset:
        return None, ""
    try:
        return presets.get(conversation.preset), ""
    except PresetError as e:
        return None, f"The preset no longer applies: {e}"


def conversation_settings(
    conversation: Conversation, *, model_id: str | None = None
) -> ConversationSettings:
    model_id = model_id or conversation.model_id
    presets = Presets(conversation.user)
    preset, problem = _preset_or_problem(conversation, presets)
    defaults = sampling_defaults(model_id)
    inherited = {}
    for name in SAMPLING_FIELDS:
        if preset is not None and name in preset.sampling:
            inherited[name] = FieldSource(preset.sampling[name], f"preset {preset.name}")
        else:
            inherited[name] = FieldSource(defaults[name], f"{model_id} default")
    if conversation.system_prompt:
        system, source = conversation.system_prompt, "this conversation"
    elif preset is not None and preset.system:
        system, source = preset.system, f"preset {preset.name}"
    else:
        system, source = "", ""
    return ConversationSettings(
        preset=preset,
        preset_problem=problem,
        system_prompt=system,
        system_source=source,
        inherited=inherited,
        tools=conversation.tools_enabled,
    )


@dataclass(frozen=True)
class GenerationSettings:
    """What a send uses: sampling values over the model's defaults, and the system prompt."""

    sampling: dict[str, Any]
    system_template: str

    def system_prompt(self, *, user: str, model: str, now: datetime | None = None) -> str:
        """The system prompt with its placeholders filled in for this send."""
        if not self.system_template:
            return ""
        moment = timezone.localtime(now or timezone.now())
        return render_system_prompt(self.system_template, now=moment, user=user, model=model)

    def keeps_system_prompt(self, sent: str, *, user: str, model: str) -> bool:
        """Whether `sent` (the system prompt the conversation's prompt starts with) is this
        template rendered at some earlier moment: then the conversation goes on with it
        instead of rebuilding its prompt (and losing the prompt cache) every time the clock
        changes {time}."""
        if not self.system_template:
            return sent == ""
        pattern = system_prompt_pattern(self.system_template, user=user, model=model)
        return pattern.fullmatch(sent) is not None


def generation_settings(conversation: Conversation) -> GenerationSettings:
    """The preset's values with the conversation's own on top; a preset that no longer
    resolves (deleted, its parent deleted) counts as none: the chat goes on."""
    preset, _ = _preset_or_problem(conversation, Presets(conversation.user))
    sampling = dict(preset.sampling) if preset is not None else {}
    sampling.update({k: v for k, v in (conversation.params or {}).items() if k in SAMPLING_FIELDS})
    system = conversation.system_prompt or (preset.system if preset is not None else "")
    return GenerationSettings(sampling=sampling, system_template=system)


def user_label(user: AbstractBaseUser) -> str:
    """How {user} reads: the user's full name when they have one, else their username."""
    full_name = getattr(user, "get_full_name", lambda: "")()
    return str(full_name or user.get_username())


# --- writing -------------------------------------------------------------------------------


class SettingsError(ValueError):
    """Settings that cannot be applied; the message says why, `field` which form field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _check_model(model_id: str) -> None:
    try:
        spec = inference.model_get(model_id=model_id)
    except UnknownModel:
        raise SettingsError(
            f"The model {model_id!r} is not in the catalogue.", "model_id"
        ) from None
    if spec.task != "generate":
        raise SettingsError(f"The model {model_id!r} embeds text: it cannot chat.", "model_id")


@transaction.atomic
def conversation_settings_save(
    *,
    conversation: Conversation,
    preset: str,
    system_prompt: str,
    params: dict[str, Any],
    tools: bool | None,
) -> Conversation:
    """Save the side panel (values already checked by chat.forms.SettingsForm).

    Choosing another preset applies it: the conversation's own system prompt and sampling
    values are cleared so that the preset's show, the preset's model is chosen and its tools
    setting applied. Raises SettingsError for a preset that does not resolve."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    fields = ["preset", "system_prompt", "params", "tools_enabled", "model_id"]
    if preset != conversation.preset:
        conversation.preset = preset
        conversation.system_prompt = ""
        conversation.params = {}
        if preset:
            chosen = _apply_preset(conversation)
            if chosen.tools is not None:
                tools = None  # the preset decides
    else:
        conversation.system_prompt = system_prompt
        conversation.params = {k: v for k, v in params.items() if k in SAMPLING_FIELDS}
    if tools is not None:
        conversation.tools_enabled = tools
    conversation.save(update_fields=fields)
    return conversation


def _apply_preset(conversation: Conversation) -> Preset:
    try:
        chosen = Presets(conversation.user).get(conversation.preset)
    except PresetError as e:
        raise SettingsError(str(e), "preset") from None
    if chosen.model:
        _check_model(chosen.model)
        conversation.model_id = chosen.model
    if chosen.tools is not None:
        conversation.tools_enabled = chosen.tools
    return chosen


@transaction.atomic
def conversation_start(
    *, conversation: Conversation, preset: str, params: dict[str, Any]
) -> Conversation:
    """A new conversation's preset and sampling values, from the new chat's composer. The
    composer's model and tools, which the preset may have set there, come with the message."""
    conversation.preset = preset
    conversation.params = {k: v for k, v in params.items() if k in SAMPLING_FIELDS}
    if preset:
        try:
            Presets(conversation.user).get(preset)
        except PresetError as e:
            raise SettingsError(str(e), "preset") from None
    conversation.save(update_fields=["preset", "params"])
    return conversation


def preset_save(
    *, user: AbstractBaseUser, row: PresetRow | None, values: dict[str, Any]
) -> PresetRow:
    """Create or update one of the user's presets from checked form values (chat.forms),
    once its chain resolves with the new values (no cycle, every parent exists). Raises
    SettingsError naming the chain otherwise."""
    presets = Presets(user)
    name = values["name"]
    same = presets.rows.get(name)
    if same is not None and (row is None or same.pk != row.pk):
        raise SettingsError(f"You already have a preset named {name!r}.", "name")
    candidate = PresetSpec(
        name=name,
        description=values.get("description", ""),
        extends=values.get("extends", ""),
        system=values.get("system_prompt") or None,
        sampling=values.get("params", {}),
        model=values.get("model_id", ""),
        tools=values.get("tools"),
    )
    if row is not None and row.name != name and presets.children(row.name):
        raise SettingsError(
            f"{_list(presets.children(row.name))} this preset by its name; change "
            "them before renaming it.",
            "name",
        )

    def lookup(other: str) -> PresetSpec | None:
        if other == name:
            return candidate
        if row is not None and other == row.name:
            return None  # the old name goes away
        return presets.spec(other)

    try:
        resolve(name, lookup)
    except PresetError as e:
        raise SettingsError(str(e), "extends") from None
    if candidate.model:
        _check_model(candidate.model)
    with transaction.atomic():
        if row is None:
            row = PresetRow(user_id=user.pk)
        row.name = name
        row.description = candidate.description
        row.extends = candidate.extends
        row.system_prompt = candidate.system or ""
        row.params = candidate.sampling
        row.model_id = candidate.model
        row.tools = candidate.tools
        row.updated_at = timezone.now()
        row.save()
    return row


def _list(children: list[str]) -> str:
    return f"{', '.join(children)} extend{'s' if len(children) == 1 else ''}"


def preset_delete(*, row: PresetRow) -> None:
    """Delete one of a user's presets, unless another of theirs extends it. Conversations
    that used it keep their own values and fall back to the model's defaults."""
    children = Presets(row.user).children(row.name)
    if children:
        raise SettingsError(f"{_list(children)} this preset; change or delete them first")
    row.delete()


# --- sending --------------------------------------------------------------------------------


def system_turns(
    conversation: Conversation,
    settings: GenerationSettings,
    *,
    model_id: str,
    previous: Generation | None,
) -> list[ChatMessage] | None:
    """How the next prompt starts. None: it goes on from `previous`'s prompt, whose system
    prompt is still the one that applies. Otherwise the messages a new prompt starts with
    (the system prompt, or nothing): the caller sends the whole path after them, since a
    system prompt changed mid-conversation changes the prompt from its first token."""
    user = user_label(conversation.user)
    if previous is not None and previous.prompt_id is not None:
        first = previous.prompt_messages()[:1]
        sent = first[0]["content"] if first and first[0]["role"] == "system" else ""
        if settings.keeps_system_prompt(sent, user=user, model=model_id):
            return None
    text = settings.system_prompt(user=user, model=model_id)
    return [ChatMessage(role="system", content=text)] if text else []


def conversation_keep_options(*, conversation: Conversation, message: Any) -> None:
    """The composer's options stick (a chat.schemas.SendMessage that was sent): the option
    fields it carried become the conversation's own values, a blank one clearing it. A
    message without them (an API client's) changes nothing."""
    carried = [name for name in SAMPLING_FIELDS if name in message.model_fields_set]
    if not carried:
        return
    sent = message.sampling()
    params = {k: v for k, v in (conversation.params or {}).items() if k not in carried}
    params.update({k: v for k, v in sent.items() if k in carried})
    conversation.params = params
    Conversation.objects.filter(pk=conversation.pk).update(params=params)
