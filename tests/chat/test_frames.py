"""The frames' model picker: only models that generate text can be chosen for a chat."""

from __future__ import annotations

from pathlib import Path

from chat.frames import model_choices


def test_it_lists_only_generation_models(models_root: Path) -> None:
    ids = {choice["id"] for choice in model_choices()}

    assert "smollm2-135m-instruct" in ids
    # Configured with `task: embed`: it embeds sentences and cannot chat.
    assert "all-minilm-l6-v2" not in ids
