"""Template tags of the settings panel and the new chat's composer (issue 9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import template
from django.forms import BoundField

from chat import presets as chat_presets
from chat.forms import SamplingFieldsForm, SettingsForm
from chat.models import Conversation
from inference.presets import SAMPLING_FIELDS

register = template.Library()


@dataclass(frozen=True)
class PanelRow:
    """One sampling field of the panel and where a blank value comes from."""

    field: BoundField
    source: str
    inherited: Any


@dataclass(frozen=True)
class Panel:
    form: SettingsForm
    settings: chat_presets.ConversationSettings
    rows: list[PanelRow]

    @property
    def summary(self) -> str:
        """What the closed panel says: the preset and the values set here."""
        parts = [f"preset {self.settings.preset.name}"] if self.settings.preset else []
        own = [row.field.label for row in self.rows if row.field.value() not in (None, "")]
        if own:
            parts.append(f"{len(own)} own value{'s' if len(own) != 1 else ''}")
        if self.settings.system_prompt:
            parts.append("system prompt")
        return " · ".join(parts) or "model defaults"


@register.simple_tag
def settings_panel_for(conversation: Conversation, form: SettingsForm | None = None) -> Panel:
    """The panel of `conversation`: `form` when a post came back with errors, else its
    saved values."""
    from chat.views_presets import settings_form

    built, current = settings_form(conversation)
    form = form or built
    rows = [
        PanelRow(form[name], current.inherited[name].source, current.inherited[name].value)
        for name in SAMPLING_FIELDS
    ]
    return Panel(form=form, settings=current, rows=rows)


@register.simple_tag
def preset_choices_for(user: Any) -> list[dict[str, Any]]:
    """The presets a user can start a chat with (the new chat's composer), each with the
    model and tools it sets ("" when none), which composer.js copies into the composer. A
    preset that does not resolve is left out."""
    if user is None or not user.is_authenticated:
        return []
    choices = []
    for name, preset, _problem in chat_presets.Presets(user).listing():
        if preset is not None:
            tools = "" if preset.tools is None else ("on" if preset.tools else "off")
            choices.append({"name": name, "model": preset.model, "tools": tools})
    return choices


@register.filter
def thousands(value: Any) -> str:
    """12345 -> "12,345" (token counts)."""
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


# The options the composer carries with each message (chat.schemas.SendMessage's fields).
COMPOSER_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_tokens",
    "seed",
    "stop",
)


@register.simple_tag
def composer_options_for(conversation: Conversation | None, selected_model: str = "") -> list[Any]:
    """The composer's option fields: the conversation's own values, and as placeholders what
    a blank field means (its preset's value or the model's default)."""
    if conversation is not None:
        current = chat_presets.conversation_settings(conversation)
        inherited = {name: source.value for name, source in current.inherited.items()}
        own = dict(conversation.params or {})
    else:
        inherited = chat_presets.sampling_defaults(selected_model) if selected_model else {}
        own = {}
    initial = {k: "\n".join(v) if isinstance(v, list) else v for k, v in own.items()}
    form = SamplingFieldsForm(initial=initial, inherited=inherited)
    return [form[name] for name in COMPOSER_FIELDS]
