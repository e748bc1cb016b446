"""Sampling presets (`configs/presets/<name>.yaml`): a description, an optional system prompt
and sampling values, validated against `GenerationParams`' names and bounds.

Kept minimal for the command line's `/preset` (issue 12); issue 9 adds inheritance,
placeholders and presets made in the browser. Plain Python: the folder arrives as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator

from inference.schemas import GenerationParams

PRESET_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class PresetError(ValueError):
    """A preset file that does not parse or validate; the message names the file."""


class Preset(BaseModel):
    """A system prompt plus sampling values; `sampling` holds only the values it sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=PRESET_NAME)]
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    system: Annotated[str, StringConstraints(max_length=100_000)] = ""
    sampling: dict[str, Any] = {}

    @field_validator("sampling")
    @classmethod
    def _within_bounds(cls, value: dict[str, Any]) -> dict[str, Any]:
        GenerationParams.model_validate(value)  # unknown names and out-of-bounds values fail
        return value


def load_presets(directory: Path) -> dict[str, Preset]:
    """Every `*.yaml` preset in `directory`, by name (the file's stem); none if it is missing."""
    presets: dict[str, Preset] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise PresetError(f"{path}: a preset is a mapping")
            presets[path.stem] = Preset.model_validate({"name": path.stem, **data})
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise PresetError(f"{path}: {e}") from None
    return presets
