"""What a sentence-transformers model folder says about turning token states into one vector.

sentence-transformers saves a model as a Hugging Face folder plus small files: `modules.json`
(the pipeline: Transformer, then Pooling, then optionally Normalize), `1_Pooling/config.json`
(which pooling), `sentence_bert_config.json` (the maximum sequence length). These are read here,
as plain JSON, so the catalogue can tell an embedding model from a chat model without importing
mlx; `inference.embeddings` builds the model from what this returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The files that mark a folder as a sentence-transformers model.
MARKER_FILES = ("modules.json", "sentence_bert_config.json")

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}

Pooling = Literal["mean", "cls", "max"]


class SentenceModelError(ValueError):
    """The folder is not a sentence-transformers model this project can run; says why."""


@dataclass(frozen=True)
class SentencePipeline:
    """How token states become a sentence vector, as the folder's own files say."""

    pooling: Pooling
    normalize: bool
    max_seq_length: int | None  # None: the folder does not say (use the model's positions)
    dimension: int | None
    lowercase: bool = False  # sentence-transformers lowercases the text before tokenizing


def is_sentence_transformer_dir(path: Path) -> bool:
    """Whether `path` holds a sentence-transformers model (reads no file, only looks)."""
    return any((path / name).is_file() for name in MARKER_FILES)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SentenceModelError(f"{path.name} is unreadable: {e}") from e


def read_pipeline(path: Path) -> SentencePipeline:
    """The pooling, normalization and length limit of the sentence-transformers model at `path`.

    A folder without `modules.json` gets sentence-transformers' own default for a plain model
    (mean pooling, no normalization). Raises SentenceModelError for modules this project does
    not implement (a Dense layer, say) or a pooling mode other than mean, CLS or max.
    """
    modules = _read_json(path / "modules.json")
    pooling_dir = "1_Pooling"
    normalize = False
    if modules is not None:
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise SentenceModelError("modules.json is not a list of modules")
        types = [str(m.get("type", "")) for m in modules]
        if not types or types[0] != _TRANSFORMER:
            raise SentenceModelError("modules.json does not start with a Transformer module")
        unknown = [t for t in types[1:] if t not in (_POOLING, _NORMALIZE)]
        if unknown:
            raise SentenceModelError(f"unsupported sentence-transformers module {unknown[0]!r}")
        pooling_dirs = [str(m.get("path", "")) for m in modules if m.get("type") == _POOLING]
        if len(pooling_dirs) > 1:
            raise SentenceModelError("modules.json names more than one Pooling module")
        if pooling_dirs:
            pooling_dir = pooling_dirs[0]
        normalize = _NORMALIZE in types
    pooling_path = (path / pooling_dir).resolve()
    if not pooling_path.is_relative_to(path.resolve()):
        raise SentenceModelError("modules.json points outside the model folder")
    pooling_config = _read_json(pooling_path / "config.json") or {}
    if not isinstance(pooling_config, dict):
        raise SentenceModelError(f"{pooling_dir}/config.json is not an object")
    chosen = [mode for key, mode in _POOLING_MODES.items() if pooling_config.get(key)]
    others = [
        key
        for key, value in pooling_config.items()
        if key.startswith("pooling_mode_") and key not in _POOLING_MODES and value
    ]
    if others or len(chosen) > 1:
        raise SentenceModelError(
            f"unsupported pooling ({', '.join(others + chosen)}): mean, CLS or max only"
        )
    pooling: Pooling = chosen[0] if chosen else "mean"  # type: ignore[assignment]
    dimension = pooling_config.get("word_embedding_dimension")

    bert_config = _read_json(path / "sentence_bert_config.json") or {}
    if not isinstance(bert_config, dict):
        raise SentenceModelError("sentence_bert_config.json is not an object")
    max_length = bert_config.get("max_seq_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise SentenceModelError(f"max_seq_length {max_length!r} is not a length")
    return SentencePipeline(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_length,
        dimension=int(dimension) if isinstance(dimension, int) else None,
        lowercase=bool(bert_config.get("do_lower_case", False)),
    )


# The activations the encoder implements (inference.embeddings maps each to its mlx function).
BERT_ACTIVATIONS = ("gelu", "relu")
_BERT_SETTINGS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class BertConfig:
    """The hyperparameters of a BERT encoder (`config.json`, Hugging Face's names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BertConfig:
        """The encoder `config` describes, or SentenceModelError saying what the embedding
        loader cannot run (the library's inspection asks the same question, without mlx)."""
        model_type = config.get("model_type")
        if model_type != "bert":
            raise SentenceModelError(
                f"the embedding loader implements BERT encoders, not {model_type!r}"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise SentenceModelError("only absolute position embeddings are implemented")
        missing = [name for name in _BERT_SETTINGS if not isinstance(config.get(name), int)]
        if missing:
            raise SentenceModelError(f"config.json lacks BERT setting(s): {', '.join(missing)}")
        built = cls(**{name: config[name] for name in cls.__dataclass_fields__ if name in config})
        if built.hidden_act not in BERT_ACTIVATIONS:
            raise SentenceModelError(f"unsupported activation {built.hidden_act!r}")
        if built.num_attention_heads <= 0 or built.hidden_size % built.num_attention_heads:
            raise SentenceModelError("hidden_size is not a multiple of num_attention_heads")
        return built
