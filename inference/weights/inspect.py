"""What a model on disk is, read from its small files, and where the models folder keeps them.

The web process calls these on page views, so they read only small files (config.json,
tokenizer_config.json, safetensors headers, a GGUF's header), never weights, and never import
mlx or mlx-lm. `find_models` is the one scan of the models folder: the chat's catalogue and the
model library both list what it finds.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.weights.gguf.reader import GGUFError, read_summary
from inference.weights.sentence import (
    BertConfig,
    SentenceModelError,
    is_sentence_transformer_dir,
    read_pipeline,
)

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 100 * 1024 * 1024
# GGUF tensor types that MLX's own `mx.load` reads (quantized ones straight into its layout).
_GGUF_MLX_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}


@dataclass(frozen=True)
class FoundModel:
    """A model in the models folder: a model folder (with a config.json) or a GGUF file."""

    path: Path
    name: str  # the folder or file name; "folder/file.gguf" one level down
    kind: Literal["dir", "gguf"]
    linked: bool = False  # a symbolic link (a pull links the Hugging Face cache's folder here)


def find_models(models_dir: Path) -> list[FoundModel]:
    """Model folders and GGUF files in the models folder (GGUFs also one folder down), by name.

    Hidden entries (staging and deleting folders, uploads) are skipped.
    """
    found: list[FoundModel] = []
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):
            continue
        linked = child.is_symlink()
        if child.is_dir() and (child / "config.json").is_file():
            found.append(FoundModel(child, child.name, "dir", linked))
        elif child.is_dir() and not linked:
            for gguf in sorted(child.glob("*.gguf")):
                if gguf.is_file():
                    found.append(FoundModel(gguf, f"{child.name}/{gguf.name}", "gguf"))
        elif child.suffix == ".gguf" and child.is_file():
            found.append(FoundModel(child, child.name, "gguf", linked))
    return found


def unreadable_details(problem: str) -> dict[str, Any]:
    """The details of a model nothing could be read from, `problem` saying why; every
    inspector's result has these keys."""
    return {
        "task": "generate",
        "architecture": "",
        "model_type": "",
        "parameter_count": None,
        "quant_bits": None,
        "quant_group_size": None,
        "quant_detail": "",
        "dtype": "",
        "is_mlx": False,
        "loadable": False,
        "load_problem": problem[:300],
        "has_chat_template": False,
        "context_length": None,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, `__metadata__`)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: safetensors header too large")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: not a safetensors header")
    return header


@functools.cache
def _mlx_lm_architectures() -> tuple[frozenset[str], dict[str, str]]:
    """The model types mlx-lm implements and its type remapping, read without importing it.

    Importing mlx_lm imports mlx and transformers (over a second), which the web process must
    not pay for on a page view: the model modules are files, and the remapping a dict literal.
    """
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset(), {}
    package = Path(next(iter(spec.submodule_search_locations)))
    types = frozenset(p.stem for p in (package / "models").glob("*.py") if p.stem[0] != "_")
    remapping: dict[str, str] = {}
    try:
        tree = ast.parse((package / "utils.py").read_text(encoding="utf-8"))
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "MODEL_REMAPPING" for t in node.targets)
                and isinstance(node.value, ast.Dict)
            ):
                remapping = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        logger.warning("could not read mlx_lm's model type remapping")
    return types, remapping


def mlx_lm_supports(model_type: str) -> bool:
    types, remapping = _mlx_lm_architectures()
    return remapping.get(model_type, model_type) in types


def _quantization(config: dict[str, Any]) -> tuple[int | None, int | None, str]:
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict):
        return None, None, ""
    bits, group = quant.get("bits"), quant.get("group_size")
    if not isinstance(bits, int):
        method = quant.get("quant_method")
        return None, None, str(method) if method else ""
    per_layer = {v.get("bits") for v in quant.values() if isinstance(v, dict) and "bits" in v}
    widths = sorted(b for b in per_layer | {bits} if isinstance(b, int))
    # Mixed recipes: the widest layers' bits, and the range in the detail ("mixed 4-6").
    detail = f"mixed {widths[0]}-{widths[-1]}" if len(widths) > 1 else ""
    mode = quant.get("mode")
    if mode and mode != "affine":
        detail = f"{detail} {mode}".strip()
    return widths[-1], group if isinstance(group, int) else None, detail


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tokenizer_config = _read_json(path / "tokenizer_config.json") or {}
    return bool(tokenizer_config.get("chat_template"))


def _parameter_count(weight_files: list[Path], bits: int | None) -> int | None:
    """Parameters from the safetensors headers; packed quantized weights count unpacked."""
    total = 0
    quantized = {
        name.removesuffix(".scales")
        for f in weight_files
        for name in _header_or_empty(f)
        if name.endswith(".scales")
    }
    for f in weight_files:
        for name, info in _header_or_empty(f).items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            base, _, leaf = name.rpartition(".")
            if base in quantized and leaf in {"scales", "biases"}:
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            if base in quantized and leaf == "weight" and info.get("dtype") == "U32" and bits:
                count = count * 32 // bits
            total += count
    return total or None


@functools.lru_cache(maxsize=256)
def _cached_header(path: str, mtime_ns: int) -> dict[str, Any]:
    return read_safetensors_header(Path(path))


def _header_or_empty(path: Path) -> dict[str, Any]:
    try:
        return _cached_header(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, struct.error):
        return {}


def _embedding_problem(path: Path, config: dict[str, Any], weight_files: list[Path]) -> str:
    """Why the embedding loader (a BERT encoder with sentence-transformers' pooling, in
    inference.embeddings) cannot load the sentence-transformers folder at `path`; "" if it
    can: the loader's own checks (`BertConfig`), read from the small files only (no mlx here)."""
    try:
        BertConfig.from_dict(config)
        read_pipeline(path)
    except SentenceModelError as e:
        return str(e)
    if not weight_files:
        return "no safetensors weights"
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        return "no tokenizer.json or vocab.txt"
    return ""


def inspect_hf_dir(path: Path) -> dict[str, Any]:
    """Details of a Hugging Face-format (or MLX) model folder.

    `task` is "embed" for a folder sentence-transformers saved (as the catalogue decides) and
    "generate" otherwise; whether it is `loadable` is judged by the loader that would load it:
    the embedding loader for the one, mlx-lm for the other.
    """
    config = _read_json(path / "config.json")
    details = unreadable_details("")
    details["task"] = "embed" if is_sentence_transformer_dir(path) else "generate"
    details["has_chat_template"] = _has_chat_template(path)
    if config is None:
        details["load_problem"] = "no readable config.json"
        return details
    raw_text_config = config.get("text_config")
    text_config: dict[str, Any] = raw_text_config if isinstance(raw_text_config, dict) else {}
    model_type = str(config.get("model_type") or text_config.get("model_type") or "")
    architectures = config.get("architectures") or []
    details["model_type"] = model_type
    details["architecture"] = str(architectures[0]) if architectures else model_type
    bits, group, detail = _quantization(config)
    details.update(quant_bits=bits, quant_group_size=group, quant_detail=detail)
    details["dtype"] = str(config.get("torch_dtype") or config.get("dtype") or "")
    context = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    details["context_length"] = int(context) if isinstance(context, int) else None

    weight_files = sorted(path.glob("*.safetensors"))
    if weight_files:
        metadata = _header_or_empty(weight_files[0]).get("__metadata__") or {}
        details["is_mlx"] = metadata.get("format") == "mlx"
    index = _read_json(path / "model.safetensors.index.json") or {}
    counted = (index.get("metadata") or {}).get("total_parameters")
    details["parameter_count"] = (
        int(counted) if isinstance(counted, int) else _parameter_count(weight_files, bits)
    )

    missing = sorted(
        name
        for name in set((index.get("weight_map") or {}).values())
        if isinstance(name, str) and not (path / name).exists()
    )
    problem = ""
    if missing:
        problem = f"incomplete: {len(missing)} weight file(s) missing ({missing[0]}...)"
    elif not model_type:
        problem = "config.json names no model_type"
    elif details["task"] == "embed":
        problem = _embedding_problem(path, config, weight_files)
    elif not mlx_lm_supports(model_type):
        problem = f"mlx-lm does not implement model type {model_type!r}"
    elif config.get("model_file"):
        problem = "needs custom model code (trust_remote_code is never used)"
    elif not weight_files:
        problem = "no safetensors weights"
    details["loadable"] = not problem
    details["load_problem"] = problem
    return details


def _file_type(value: Any) -> str | None:
    """llama.cpp's `general.file_type` as a type name ("Q4_K_M", "F16"), or None."""
    import gguf

    if not isinstance(value, int):
        return None
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return None
    if name == "GUESSED":
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Details of a GGUF file, from its header (the tensors are not read)."""
    details = unreadable_details("")
    try:
        summary = read_summary(path)
    except (OSError, GGUFError) as e:  # a damaged file must not break the page
        details["load_problem"] = f"unreadable GGUF: {e}"[:300]
        return details
    metadata, types = summary.metadata, summary.tensor_types
    arch = str(metadata.get("general.architecture") or "")
    details["architecture"] = details["model_type"] = arch
    details["has_chat_template"] = bool(metadata.get("tokenizer.chat_template"))
    context = metadata.get(f"{arch}.context_length")
    details["context_length"] = int(context) if isinstance(context, int) else None
    details["parameter_count"] = sum(types.values()) or None
    if types:
        # The file's declared type (llama.cpp's general.file_type, e.g. Q4_K_M) names the mix;
        # counting parameters would name whatever holds the most, often an 8-bit embedding.
        main_type = _file_type(metadata.get("general.file_type")) or max(
            types, key=lambda k: types[k]
        )
        details["quant_detail"] = main_type
        digits = "".join(c for c in main_type.split("_")[0] if c.isdigit())
        if main_type.startswith(("Q", "IQ")) and digits:
            details["quant_bits"] = int(digits)
            details["quant_group_size"] = 32 if main_type in {"Q4_0", "Q4_1", "Q8_0"} else None
        else:
            details["dtype"] = main_type.lower()
    unsupported = sorted(set(types) - _GGUF_MLX_TYPES)
    if arch != "llama":
        details["load_problem"] = f"GGUF architecture {arch or '?'!r}: import it to convert"
    elif unsupported:
        details["load_problem"] = f"tensor types {', '.join(unsupported)}: import it to convert"
    details["loadable"] = not details["load_problem"]
    return details
