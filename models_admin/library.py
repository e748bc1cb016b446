"""Reading models from disk: the models folder, the Hugging Face cache and GGUF files.

Plain functions over paths, no database and no mlx: the web process calls them on every page
view, so they read only small files (config.json, tokenizer_config.json, safetensors headers,
GGUF metadata) and skip models whose files have not changed since the last scan.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# safetensors dtypes -> bytes per element.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# GGUF tensor types that MLX's own `mx.load` reads (quantized ones straight into its layout).
_GGUF_MLX_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}


@dataclass
class ScannedModel:
    """What the disk says about one model."""

    name: str
    source: str  # LibraryModel.Source value
    path: Path
    signature: str
    size_bytes: int
    modified_at: datetime | None
    repo_id: str = ""
    revision: str = ""
    # Details, None when the signature matched a previous scan and they were not read again.
    details: dict[str, Any] | None = field(default=None)


# Part of every signature: raised when what a scan reads from a model changes, so the next scan
# after an upgrade reads every model again instead of keeping details the old code read.
DETAILS_VERSION = 2


def path_signature(paths: list[Path]) -> tuple[str, int, datetime | None]:
    """A cheap fingerprint of a set of files (count, total size, newest mtime), their size."""
    total, newest = 0, 0
    count = 0
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        count += 1
        total += st.st_size
        newest = max(newest, st.st_mtime_ns)
    modified = datetime.fromtimestamp(newest / 1e9, tz=UTC) if newest else None
    return f"v{DETAILS_VERSION}:{count}:{total}:{newest}", total, modified


def _dir_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for root, _dirs, names in os.walk(path, followlinks=False):
        files.extend(Path(root) / n for n in names)
    return files


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


def inspect_hf_dir(path: Path) -> dict[str, Any]:
    """Details of a Hugging Face-format (or MLX) model folder."""
    config = _read_json(path / "config.json")
    details: dict[str, Any] = {
        "architecture": "",
        "model_type": "",
        "parameter_count": None,
        "quant_bits": None,
        "quant_group_size": None,
        "quant_detail": "",
        "dtype": "",
        "is_mlx": False,
        "loadable": False,
        "load_problem": "",
        "has_chat_template": _has_chat_template(path),
        "context_length": None,
    }
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
    elif not mlx_lm_supports(model_type):
        problem = f"mlx-lm does not implement model type {model_type!r}"
    elif config.get("model_file"):
        problem = "needs custom model code (trust_remote_code is never used)"
    elif not weight_files:
        problem = "no safetensors weights"
    details["loadable"] = not problem
    details["load_problem"] = problem
    return details


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_WANTED_SUFFIXES = ("general.architecture", ".context_length")


class _GGUFCursor:
    """Reads a GGUF header from a memory map, skipping arrays (the vocabulary) unbuilt."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8", "replace")
        self.pos += length
        return text

    def skip_string(self) -> None:
        length = self.unpack("<Q")
        self.pos += length

    def value(self, type_id: int, keep: bool) -> Any:
        if type_id in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[type_id])
        if type_id == _GGUF_STRING:
            if keep:
                return self.string()
            self.skip_string()
            return True  # present
        if type_id == _GGUF_ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _GGUF_SCALARS:
                self.pos += struct.calcsize(_GGUF_SCALARS[item_type]) * count
            else:
                for _ in range(count):
                    self.value(item_type, keep=False)
            return None
        raise ValueError(f"unknown GGUF value type {type_id}")


def read_gguf_summary(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The GGUF's metadata (strings kept only for the keys we show) and its element count per
    tensor type, read from the header alone."""
    import gguf

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _GGUFCursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            keep = key.endswith(_GGUF_WANTED_SUFFIXES)
            metadata[key] = cursor.value(cursor.unpack("<I"), keep)
        types: dict[str, int] = {}
        for _ in range(tensor_count):
            cursor.skip_string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            type_id = cursor.unpack("<I")
            cursor.unpack("<Q")  # offset
            try:
                name = gguf.GGMLQuantizationType(type_id).name
            except ValueError:
                name = f"type{type_id}"
            count = 1
            for dim in dims:
                count *= dim
            types[name] = types.get(name, 0) + count
    return metadata, types


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
    details: dict[str, Any] = {
        "architecture": "",
        "model_type": "",
        "parameter_count": None,
        "quant_bits": None,
        "quant_group_size": None,
        "quant_detail": "",
        "dtype": "",
        "is_mlx": False,
        "loadable": False,
        "load_problem": "",
        "has_chat_template": False,
        "context_length": None,
    }
    try:
        metadata, types = read_gguf_summary(path)
    except (OSError, ValueError, struct.error) as e:  # a damaged file must not break the page
        details["load_problem"] = f"unreadable GGUF: {e}"[:300]
        return details
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


def scan_models_dir(models_dir: Path, known: dict[str, str]) -> list[ScannedModel]:
    """Model folders and GGUF files in the models folder (GGUFs also one folder down).

    `known` maps paths to signatures from the last scan; unchanged models skip `details`.
    Links into the Hugging Face cache (made by pulls) are listed with the cache's entry instead.
    """
    found: list[ScannedModel] = []
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):
            continue  # staging and deleting folders, hidden files
        if child.is_symlink():
            continue
        if child.is_dir() and (child / "config.json").is_file():
            found.append(_scanned_dir(child, child.name, "models_dir", known))
        elif child.is_dir():
            for gguf in sorted(child.glob("*.gguf")):
                found.append(_scanned_gguf(gguf, f"{child.name}/{gguf.name}", known))
        elif child.suffix == ".gguf" and child.is_file():
            found.append(_scanned_gguf(child, child.name, known))
    return found


def _scanned_dir(path: Path, name: str, source: str, known: dict[str, str]) -> ScannedModel:
    signature, size, modified = path_signature(_dir_files(path))
    scanned = ScannedModel(
        name=name,
        source=source,
        path=path,
        signature=signature,
        size_bytes=size,
        modified_at=modified,
    )
    if known.get(str(path)) != signature:
        scanned.details = inspect_hf_dir(path)
    return scanned


def _scanned_gguf(path: Path, name: str, known: dict[str, str]) -> ScannedModel:
    signature, size, modified = path_signature([path])
    scanned = ScannedModel(
        name=name,
        source="gguf",
        path=path,
        signature=signature,
        size_bytes=size,
        modified_at=modified,
    )
    if known.get(str(path)) != signature:
        scanned.details = inspect_gguf(path)
    return scanned


def scan_hf_cache(cache_dir: Path, known: dict[str, str]) -> list[ScannedModel]:
    """One entry per cached revision of each model repo in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if not cache_dir.is_dir():
        return []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found: list[ScannedModel] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in revisions:
            name = repo.repo_id
            if len(revisions) > 1:
                name = f"{repo.repo_id}@{revision.commit_hash[:7]}"
            scanned = _scanned_dir(revision.snapshot_path, name, "hf_cache", known)
            # Blobs count once per revision here; the cache's own accounting is the truth.
            scanned.size_bytes = revision.size_on_disk
            scanned.repo_id = repo.repo_id
            scanned.revision = revision.commit_hash
            found.append(scanned)
    return found


def links_into(models_dir: Path, target: Path) -> list[Path]:
    """Symbolic links in the models folder that point into `target`."""
    links: list[Path] = []
    if not models_dir.is_dir():
        return links
    target = Path(os.path.realpath(target))
    for child in models_dir.iterdir():
        if child.is_symlink():
            real = Path(os.path.realpath(child))
            if real == target or target in real.parents:
                links.append(child)
    return links


def tree_size(path: Path) -> int:
    """Bytes used by a file or folder, not following links."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size if path.is_symlink() else path.stat().st_size
    total = 0
    for file in _dir_files(path):
        try:
            total += file.lstat().st_size
        except OSError:
            continue
    return total
