"""The models the worker may load: the allow-list.

A request names a model by id only; this module is the one place that turns an id into a path.
Ids come from `configs/models/*.yaml`, from MLX model directories found in the models
directory (where the model library writes what it pulls, converts and imports), and from LoRA
adapter folders there (mlx-lm's format: `adapter_config.json` + `adapters.safetensors`), each
served on top of the base model its `adapter_config.json` names (`base_model`, else mlx-lm's own
`model` key: a catalogue id, a folder of the models directory, or a hub repo of a configured
model). Nothing else is ever loaded, so no request can make the worker read an arbitrary path or
repo.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from inference.config import ModelConfig
from inference.weights.inspect import find_models
from inference.weights.sentence import is_sentence_transformer_dir

logger = logging.getLogger(__name__)

_ID_UNSAFE = re.compile(r"[^a-z0-9._-]+")


class UnknownModel(LookupError):
    """The id is not in the catalogue (not configured, not in the models directory)."""


class ModelUnavailable(LookupError):
    """The model is known but its weights are not on this machine."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the loader needs to know about one allowed model."""

    id: str
    name: str
    kind: Literal["gguf", "mlx", "hub"]
    context_length: int
    path: Path | None = None
    hub_repo: str | None = None
    revision: str | None = None
    chat_template: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    configured: bool = True
    # What the model is for: "generate" (chat, completions) or "embed" (sentence vectors).
    task: Literal["generate", "embed"] = "generate"
    # Seconds to keep it loaded after its last request (-1: for good); None: the server's.
    keep_alive: float | None = None
    # The KV caches (inference.kvcache): quantized bits and group, rotating size; None: the
    # server's.
    kv_bits: int | None = None
    kv_group_size: int | None = None
    max_kv_size: int | None = None
    # A LoRA adapter: its folder, and the id of the base model it loads on top of (whose
    # source the fields above copy). `problem` says why it cannot load (e.g. no such base).
    adapter_path: Path | None = None
    base_id: str | None = None
    problem: str | None = None

    def local_path(self) -> Path | None:
        """The file or directory holding the (base model's) weights, or None if they are not
        here."""
        if self.problem is not None:
            return None
        if self.adapter_path is not None and not (
            (self.adapter_path / ADAPTER_CONFIG).is_file()
            and (self.adapter_path / ADAPTER_WEIGHTS).is_file()
        ):
            return None
        if self.kind == "hub":
            return _hub_snapshot(self.hub_repo or "", self.revision)
        assert self.path is not None
        if self.kind == "gguf":
            return self.path if self.path.is_file() else None
        return self.path if (self.path / "config.json").is_file() else None

    @property
    def is_available(self) -> bool:
        return self.local_path() is not None

    def unavailable_reason(self) -> str:
        """Why this model cannot answer now, in words for anyone (the chat's picker, the
        thread, the models list); "" when it can."""
        if self.is_available:
            return ""
        if self.problem:
            return self.problem
        if self.kind == "hub":
            return f"not downloaded yet ({self.hub_repo} from the Hugging Face Hub)"
        if self.kind == "gguf":
            return "its GGUF file is missing from the models folder"
        if self.path is not None and self.path.is_dir():
            return "its folder has no config.json (an incomplete download or conversion)"
        return "its folder is missing from the models folder"


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def is_adapter_dir(path: Path) -> bool:
    """A LoRA adapter folder as mlx-lm's trainer writes it."""
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def _adapter_spec(path: Path, specs: Mapping[str, ModelSpec]) -> ModelSpec:
    """The catalogue entry of an adapter folder: its base's source plus the adapter, or an
    entry whose `problem` says why it cannot load."""
    adapter_id = model_id_for_dir(path.name)
    common: dict[str, Any] = {
        "id": adapter_id,
        "name": path.name,
        "configured": False,
        "adapter_path": path,
    }
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        config = None
        problem = f"adapter {adapter_id!r}: unreadable {ADAPTER_CONFIG}: {e}"
    if isinstance(config, dict):
        base_name = config.get("base_model") or config.get("model")
        if not isinstance(base_name, str) or not base_name.strip():
            problem = (
                f"adapter {adapter_id!r}: {ADAPTER_CONFIG} names no base model "
                "(set base_model to the id of a model in the catalogue)"
            )
        else:
            base = _find_base(base_name.strip(), specs)
            if base is None:
                problem = (
                    f"adapter {adapter_id!r}: its base model {base_name!r} is not in the "
                    "catalogue (set base_model in its adapter_config.json to a model id)"
                )
            elif base.task != "generate":
                problem = f"adapter {adapter_id!r}: its base {base.id!r} does not generate text"
            else:
                return replace(
                    base,
                    **common,
                    base_id=base.id,
                    sampling=dict(base.sampling),
                )
    elif config is not None:
        problem = f"adapter {adapter_id!r}: {ADAPTER_CONFIG} is not a JSON object"
    return ModelSpec(kind="mlx", path=path, context_length=4096, problem=problem, **common)


def _find_base(name: str, specs: Mapping[str, ModelSpec]) -> ModelSpec | None:
    """The model an adapter's config names: an id, a folder of the models directory (by path
    or name), or the hub repo of a configured model."""
    candidates = [s for s in specs.values() if s.adapter_path is None]
    for spec in candidates:
        if spec.id == name or spec.hub_repo == name:
            return spec
    leaf = Path(name).name
    for spec in candidates:
        if spec.path is not None and (str(spec.path) == name or spec.path.name == leaf):
            return spec
    wanted = model_id_for_dir(leaf)
    return next((s for s in candidates if s.id == wanted), None)


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def model_id_for_dir(name: str) -> str:
    """The catalogue id of a directory found in the models directory."""
    return _ID_UNSAFE.sub("-", name.lower()).strip("-._")[:100] or "model"


def _spec_from_config(model: ModelConfig, models_dir: Path) -> ModelSpec:
    source = model.source
    common: dict[str, Any] = {
        "id": model.id,
        "name": model.name,
        "context_length": model.context_length,
        "chat_template": model.chat_template,
        "sampling": model.sampling.model_dump(exclude_none=True),
        "task": model.task,
        "keep_alive": model.keep_alive,
        "kv_bits": model.kv_bits,
        "kv_group_size": model.kv_group_size,
        "max_kv_size": model.max_kv_size,
    }
    if source.kind == "gguf":
        assert source.gguf is not None
        return ModelSpec(kind="gguf", path=models_dir / source.gguf, **common)
    if source.kind == "path":
        assert source.path is not None
        return ModelSpec(kind="mlx", path=models_dir / source.path, **common)
    return ModelSpec(kind="hub", hub_repo=source.hub, revision=source.revision, **common)


def _spec_from_dir(path: Path) -> ModelSpec | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not any(path.glob("*.safetensors")):
        return None
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings", 4096
    )
    return ModelSpec(
        id=model_id_for_dir(path.name),
        name=path.name,
        kind="mlx",
        path=path,
        context_length=int(context),
        configured=False,
        # A folder sentence-transformers saved is an embedding model.
        task="embed" if is_sentence_transformer_dir(path) else "generate",
    )


class _ServerDefaults(Protocol):
    @property
    def default_model(self) -> str: ...


class CatalogueConfig(Protocol):
    """What the catalogue reads from the project's config (`mlxweb.config.Config` fits)."""

    @property
    def server(self) -> _ServerDefaults: ...

    @property
    def models(self) -> Mapping[str, ModelConfig]: ...


class Catalogue:
    """The allow-list, re-read from disk on each lookup so new library entries appear at once."""

    def __init__(self, config: CatalogueConfig, models_dir: Path) -> None:
        self.config = config
        self.models_dir = models_dir
        self._configured = {m.id: _spec_from_config(m, models_dir) for m in config.models.values()}

    @property
    def default_model_id(self) -> str:
        return self.config.server.default_model

    def all(self) -> list[ModelSpec]:
        """Configured models first (in id order), then the ones found in the models directory."""
        specs = dict(self._configured)
        configured_paths = {s.path for s in specs.values() if s.path is not None}
        for found in find_models(self.models_dir):
            if found.kind != "dir" or found.path in configured_paths:
                continue
            spec = _spec_from_dir(found.path)
            if spec is not None and spec.id not in specs:
                specs[spec.id] = spec
        for folder in self._adapter_dirs():
            adapter = _adapter_spec(folder, specs)
            if adapter.id not in specs:
                specs[adapter.id] = adapter
        return list(specs.values())

    def _adapter_dirs(self) -> list[Path]:
        """Adapter folders in the models directory (hidden ones skipped, as for models)."""
        if not self.models_dir.is_dir():
            return []
        return [
            child
            for child in sorted(self.models_dir.iterdir())
            if not child.name.startswith(".") and child.is_dir() and is_adapter_dir(child)
        ]

    def available(self) -> list[ModelSpec]:
        return [s for s in self.all() if s.is_available]

    def get(self, model_id: str) -> ModelSpec:
        """The spec for `model_id`; UnknownModel if it is not allowed."""
        if model_id in self._configured:
            return self._configured[model_id]
        for spec in self.all():
            if spec.id == model_id:
                return spec
        raise UnknownModel(f"unknown model {model_id!r}")


_catalogue: Catalogue | None = None


def get_catalogue() -> Catalogue:
    """The process-wide catalogue built from Django settings."""
    global _catalogue
    if _catalogue is None:
        # Imported here: the engine and the bench use Catalogue without Django.
        from django.conf import settings

        _catalogue = Catalogue(settings.MLXWEB_CONFIG, settings.MLXWEB_MODELS_DIR)
    return _catalogue


def reset_catalogue() -> None:
    """Forget the cached catalogue (tests change settings)."""
    global _catalogue
    _catalogue = None
