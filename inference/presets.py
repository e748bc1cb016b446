"""Presets: a system prompt, sampling values, optionally a model and tools, by name.

Built-ins live in `configs/presets/<name>.yaml`; the chat adds each user's own (chat.presets).
A preset may extend another by name, to any depth: what it leaves out comes from its parent
(sampling values merge, the child's win). Cycles and unknown parents are errors that show the
chain.

The system prompt may hold placeholders resolved when a message is sent: {date}, {time},
{user}, {model}; `{{date}}` is a literal `{date}`. Other braces (JSON in a prompt) are text.
An unknown `{name}` is an error when the preset is saved or loaded, never at chat time.
Config files may also use `${ENV_VAR}`, resolved when the file is loaded; presets made in the
browser may not (they would read the server's environment).

Plain Python: the folder arrives as an argument.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from inference.schemas import GenerationParams

# Built-ins are named by their file; users may use capitals and spaces too.
PRESET_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$"
PLACEHOLDERS = ("date", "time", "user", "model")
# The sampling values a preset may set (not tools, logprobs or response formats: those belong
# to a request, not to a way of talking).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "seed",
    "stop",
)
MAX_SYSTEM_PROMPT = 100_000

# `{{name}}` (a literal), `{name}` (a placeholder); anything else with braces is plain text.
_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENV = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PresetError(ValueError):
    """A preset that does not parse, validate or resolve; the message says where and why."""


def placeholder_problems(text: str) -> list[str]:
    """What is wrong with the placeholders of a system prompt: one line per unknown name."""
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    problems = []
    for match in _PLACEHOLDER.finditer(text):
        name = match.group(2)
        if name is not None and name not in PLACEHOLDERS:
            problems.append(
                f"unknown placeholder {{{name}}}: the known ones are {known} "
                f"(write {{{{{name}}}}} for the text {{{name}}})"
            )
    return problems


def render_system_prompt(text: str, *, now: datetime, user: str, model: str) -> str:
    """The system prompt with its placeholders filled in (they were checked when saved)."""
    values = {
        "date": now.strftime("%Y-%m-%d (%A)"),
        "time": now.strftime("%H:%M %Z").strip(),
        "user": user,
        "model": model,
    }

    def fill(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        return values.get(match.group(2), match.group(0))

    return _PLACEHOLDER.sub(fill, text)


def system_prompt_pattern(text: str, *, user: str, model: str) -> re.Pattern[str]:
    """A pattern that matches `text` rendered at any moment: {date} and {time} match anything
    on one line, {user} and {model} only their values. A conversation keeps the system prompt
    it first sent while this still matches, so that the clock does not invalidate its prompt
    cache on every turn."""
    parts: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[position : match.start()]))
        if match.group(1) is not None:
            parts.append(re.escape("{" + match.group(1) + "}"))
        elif match.group(2) in ("date", "time"):
            parts.append(r"[^\n]*")
        elif match.group(2) == "user":
            parts.append(re.escape(user))
        elif match.group(2) == "model":
            parts.append(re.escape(model))
        else:
            parts.append(re.escape(match.group(0)))
        position = match.end()
    parts.append(re.escape(text[position:]))
    return re.compile("".join(parts), re.DOTALL)


def env_problems(text: str) -> list[str]:
    """`${...}` in text typed in the browser: refused (only config files may read the
    environment)."""
    if _ENV.search(text):
        return ["${...} (an environment variable) is only allowed in configs/presets/ files"]
    return []


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """`${NAME}` replaced by the variable's value; an unset or malformed one is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME.match(name):
            raise PresetError(f"${{{name}}} is not an environment variable name")
        if name not in environ:
            raise PresetError(f"${{{name}}}: the environment variable {name} is not set")
        return environ[name]

    return _ENV.sub(value, text)


def sampling_problems(values: Mapping[str, Any]) -> dict[str, str]:
    """Each bad sampling value by field name, with the reason (bounds from GenerationParams)."""
    problems: dict[str, str] = {}
    for name in values:
        if name not in SAMPLING_FIELDS:
            problems[name] = f"not a sampling setting (known: {', '.join(SAMPLING_FIELDS)})"
    try:
        GenerationParams.model_validate({k: v for k, v in values.items() if k in SAMPLING_FIELDS})
    except ValidationError as e:
        for item in e.errors():
            field = str(item["loc"][0]) if item["loc"] else "sampling"
            problems.setdefault(field, item["msg"])
    return problems


class PresetSpec(BaseModel):
    """One preset as written: what it sets itself, before its parent fills in the rest.

    `system` None inherits the parent's (a built-in may set "" to clear it); `tools` None
    leaves the conversation's tools as they are.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=PRESET_NAME)]
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    extends: Annotated[str, StringConstraints(max_length=100)] = ""
    system: Annotated[str, StringConstraints(max_length=MAX_SYSTEM_PROMPT)] | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    model: Annotated[str, StringConstraints(max_length=100)] = ""
    tools: bool | None = None
    builtin: bool = False

    @field_validator("sampling")
    @classmethod
    def _within_bounds(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = sampling_problems(value)
        if problems:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in problems.items()))
        return value

    @field_validator("system")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        problems = placeholder_problems(value or "")
        if problems:
            raise ValueError("; ".join(problems))
        return value


class Preset(BaseModel):
    """A preset with its chain resolved: everything it sets, its parents' values included.

    `chain` names it and its ancestors, nearest first.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    extends: str = ""
    system: str = ""
    sampling: dict[str, Any] = Field(default_factory=dict)
    model: str = ""
    tools: bool | None = None
    builtin: bool = False
    chain: tuple[str, ...] = ()


def resolve(name: str, lookup: Callable[[str], PresetSpec | None]) -> Preset:
    """`name` with its `extends` chain applied. Raises PresetError for an unknown name or
    parent and for a cycle, naming the chain (`a -> b -> a`)."""
    specs: list[PresetSpec] = []
    seen: list[str] = []
    current: str = name
    while current:
        if current in seen:
            chain = " -> ".join([*seen, current])
            raise PresetError(f"preset {name!r} extends itself: {chain}")
        spec = lookup(current)
        if spec is None:
            if not seen:
                raise PresetError(f"there is no preset {current!r}")
            raise PresetError(
                f"preset {seen[-1]!r} extends {current!r}, which does not exist "
                f"({' -> '.join([*seen, current])})"
            )
        seen.append(current)
        specs.append(spec)
        current = spec.extends
    own = specs[0]
    system = ""
    sampling: dict[str, Any] = {}
    model = ""
    tools: bool | None = None
    for spec in reversed(specs):  # the farthest ancestor first, each child over it
        if spec.system is not None:
            system = spec.system
        sampling.update(spec.sampling)
        model = spec.model or model
        tools = spec.tools if spec.tools is not None else tools
    return Preset(
        name=own.name,
        description=own.description,
        extends=own.extends,
        system=system,
        sampling=sampling,
        model=model,
        tools=tools,
        builtin=own.builtin,
        chain=tuple(seen),
    )


def read_preset_file(path: Path, environ: Mapping[str, str] | None = None) -> PresetSpec:
    """One `configs/presets/*.yaml` file, validated, `${ENV}` resolved; errors name the file."""
    environ = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise PresetError("a preset is a mapping (description, system, sampling, ...)")
        for key in ("system", "description"):
            if isinstance(data.get(key), str):
                data[key] = expand_env(data[key], environ)
        return PresetSpec.model_validate({"name": path.stem, **data, "builtin": True})
    except (OSError, yaml.YAMLError, ValidationError, PresetError) as e:
        raise PresetError(f"{path}: {e}") from None


def load_preset_specs(
    directory: Path, environ: Mapping[str, str] | None = None
) -> dict[str, PresetSpec]:
    """Every `*.yaml` preset in `directory` as written, by name; none if it is missing."""
    return {p.stem: read_preset_file(p, environ) for p in sorted(directory.glob("*.yaml"))}


def load_presets(directory: Path, environ: Mapping[str, str] | None = None) -> dict[str, Preset]:
    """Every built-in preset in `directory`, resolved, by name; none if it is missing. Raises
    PresetError naming the file for a bad file, a cycle or an unknown parent."""
    specs = load_preset_specs(directory, environ)
    presets: dict[str, Preset] = {}
    for name in specs:
        try:
            presets[name] = resolve(name, specs.get)
        except PresetError as e:
            raise PresetError(f"{directory / (name + '.yaml')}: {e}") from None
    return presets
