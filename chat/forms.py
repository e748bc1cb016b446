from __future__ import annotations

import re
from typing import Any

from annotated_types import Ge, Gt, Le
from django import forms
from django.contrib.auth.forms import UserCreationForm

from inference.presets import (
    MAX_SYSTEM_PROMPT,
    PRESET_NAME,
    SAMPLING_FIELDS,
    env_problems,
    placeholder_problems,
)
from inference.schemas import GenerationParams


class RenameForm(forms.Form):
    title = forms.CharField(max_length=200, strip=True)


class SignupForm(UserCreationForm):
    """Username and password twice, with Django's password validators."""


# --- presets and a conversation's settings (issue 9) ----------------------------------------

SAMPLING_LABELS = {
    "temperature": "Temperature",
    "top_p": "Top p",
    "top_k": "Top k",
    "min_p": "Min p",
    "repetition_penalty": "Repetition penalty",
    "presence_penalty": "Presence penalty",
    "frequency_penalty": "Frequency penalty",
    "max_tokens": "Max tokens",
    "seed": "Seed",
    "stop": "Stop strings",
}
SAMPLING_STEPS = {"temperature": "0.05", "repetition_penalty": "0.05"}
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64


def sampling_bounds(name: str) -> tuple[float | None, float | None, bool]:
    """(lowest, highest, whether the lowest is excluded) of a GenerationParams field, read
    from the schema so that forms and the engine never disagree."""
    low: float | None = None
    high: float | None = None
    exclusive = False
    for item in GenerationParams.model_fields[name].metadata:
        if isinstance(item, Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, Gt):
            low, exclusive = float(item.gt), True  # type: ignore[arg-type]
        elif isinstance(item, Le):
            high = float(item.le)  # type: ignore[arg-type]
    return low, high, exclusive


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) or abs(value) < 1e6 else str(int(value))


def bounds_text(name: str) -> str:
    """The allowed range in words: "from 0 to 2", "more than 0, at most 1"."""
    low, high, exclusive = sampling_bounds(name)
    if low is not None and high is not None and not exclusive:
        return f"from {_number(low)} to {_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'more than' if exclusive else 'at least'} {_number(low)}")
    if high is not None:
        parts.append(f"at most {_number(high)}")
    return ", ".join(parts)


def _check_system_prompt(value: str) -> None:
    problems = placeholder_problems(value) + env_problems(value)
    if problems:
        raise forms.ValidationError(problems)


class SamplingFieldsForm(forms.Form):
    """The sampling fields shared by the side panel and the preset form: blank means "not set
    here" (the placeholder shows what applies instead); each value is checked against
    GenerationParams' bounds with the range in the error."""

    def __init__(self, *args: Any, inherited: dict[str, Any] | None = None, **kwargs: Any):
        """`inherited`: what each blank field means, shown as its placeholder; None when
        that is not known here (a preset's parent decides)."""
        super().__init__(*args, **kwargs)
        for name in SAMPLING_FIELDS:
            if inherited is None:
                shown = "inherited"
            elif name == "stop":
                shown = "\n".join(inherited.get(name) or []) or "none"
            else:
                value = inherited.get(name)
                shown = "random" if value is None else str(value)
            self.fields[name] = self._sampling_field(name, shown)

    @staticmethod
    def _sampling_field(name: str, placeholder: str) -> forms.Field:
        label = SAMPLING_LABELS[name]
        if name == "stop":
            return forms.CharField(
                label=label,
                required=False,
                strip=False,
                widget=forms.Textarea(attrs={"rows": 2, "placeholder": placeholder}),
                help_text=f"One per line, up to {MAX_STOP_STRINGS}.",
            )
        low, high, _ = sampling_bounds(name)
        attrs: dict[str, Any] = {"placeholder": placeholder}
        if low is not None:
            attrs["min"] = _number(low)
        if high is not None:
            attrs["max"] = _number(high)
        integer = GenerationParams.model_fields[name].annotation in (int, int | None)
        attrs["step"] = "1" if integer else SAMPLING_STEPS.get(name, "0.01")
        field_class = forms.IntegerField if integer else forms.FloatField
        # Bounds are checked in clean() so that the message names the range; the browser
        # reads the same bounds from min/max.
        return field_class(label=label, required=False, widget=forms.NumberInput(attrs=attrs))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        params: dict[str, Any] = {}
        for name in SAMPLING_FIELDS:
            value = cleaned.get(name)
            if value is None or value == "":
                continue
            if name == "stop":
                lines = [line for line in str(value).splitlines() if line]
                if len(lines) > MAX_STOP_STRINGS:
                    self.add_error(name, f"At most {MAX_STOP_STRINGS} stop strings.")
                elif any(len(line) > MAX_STOP_LENGTH for line in lines):
                    self.add_error(name, f"A stop string has at most {MAX_STOP_LENGTH} characters.")
                elif lines:
                    params[name] = lines
                continue
            low, high, exclusive = sampling_bounds(name)
            too_low = low is not None and (value <= low if exclusive else value < low)
            too_high = high is not None and value > high
            if too_low or too_high:
                self.add_error(
                    name,
                    f"{SAMPLING_LABELS[name]} goes {bounds_text(name)}; {value:g} is out of range.",
                )
                continue
            params[name] = value
        cleaned["params"] = params
        return cleaned


TOOLS_CHOICES = [("", "as the conversation has it"), ("on", "on"), ("off", "off")]


def _tools_value(value: str) -> bool | None:
    return None if value == "" else value == "on"


class SettingsForm(SamplingFieldsForm):
    """A conversation's side panel: preset, system prompt, sampling values, tools."""

    preset = forms.ChoiceField(required=False)
    system_prompt = forms.CharField(
        label="System prompt",
        required=False,
        strip=False,
        max_length=MAX_SYSTEM_PROMPT,
        validators=[_check_system_prompt],
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="Placeholders: {date}, {time}, {user}, {model}.",
    )
    tools = forms.ChoiceField(label="Tools", required=False, choices=[("off", "off"), ("on", "on")])

    def __init__(
        self,
        *args: Any,
        preset_names: list[str],
        system_placeholder: str = "",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        field = self.fields["preset"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "none (the model's defaults)")] + [(n, n) for n in preset_names]
        self.fields["system_prompt"].widget.attrs["placeholder"] = system_placeholder or "none"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        cleaned["tools_enabled"] = cleaned.get("tools") == "on" if cleaned.get("tools") else None
        return cleaned


class PresetForm(SamplingFieldsForm):
    """One of the user's presets."""

    name = forms.CharField(
        max_length=64,
        help_text="Letters, digits, spaces, dots, dashes and underscores.",
    )
    description = forms.CharField(max_length=300, required=False)
    extends = forms.ChoiceField(required=False, label="Extends")
    system_prompt = forms.CharField(
        label="System prompt",
        required=False,
        strip=False,
        max_length=MAX_SYSTEM_PROMPT,
        validators=[_check_system_prompt],
        widget=forms.Textarea(attrs={"rows": 5}),
        help_text=(
            "Blank: the preset it extends gives it. Placeholders: {date}, {time}, {user}, "
            "{model}; {{date}} is the text {date}."
        ),
    )
    model_id = forms.ChoiceField(required=False, label="Model")
    tools = forms.ChoiceField(required=False, choices=TOOLS_CHOICES, label="Tools")

    def __init__(
        self,
        *args: Any,
        preset_names: list[str],
        builtin_names: list[str],
        models: list[tuple[str, str]],
        current_name: str = "",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.builtin_names = set(builtin_names)
        self.current_name = current_name
        extends = self.fields["extends"]
        assert isinstance(extends, forms.ChoiceField)
        extends.choices = [("", "nothing")] + [(n, n) for n in preset_names if n != current_name]
        model = self.fields["model_id"]
        assert isinstance(model, forms.ChoiceField)
        model.choices = [("", "the conversation's model")] + models

    def clean_name(self) -> str:
        name = " ".join(str(self.cleaned_data["name"]).split())
        if not re.match(PRESET_NAME, name):
            raise forms.ValidationError(
                "Start with a letter or digit; then letters, digits, spaces, dots, dashes "
                "and underscores."
            )
        if name in self.builtin_names:
            raise forms.ValidationError(f"{name!r} is a built-in preset; choose another name.")
        return name

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        cleaned["tools"] = _tools_value(str(cleaned.get("tools") or ""))
        return cleaned
