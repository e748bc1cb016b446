"""Exporting a library model to a GGUF file that llama.cpp (and what is built on it) loads.

The reverse of the GGUF import (`gguf.architectures`, `gguf.tensors`, `gguf.tokenizer`):

- mlx-lm module paths become llama.cpp's tensor names (the import's table, inverted);
- the Q and K projections of llama-family models get back llama.cpp's per-head row order
  (its converter permutes them; the import undoes it), biases included;
- Gemma 3's norm weights get back the +1 that llama.cpp folds into them (mlx-lm, like Hugging
  Face, scales by `1 + weight`; llama.cpp's RMS norm by `weight`);
- the config becomes `<arch>.*` hyperparameters, Llama 3.1-style rope scaling a
  `rope_freqs.weight` tensor as llama.cpp's converter writes it;
- the tokenizer becomes `tokenizer.ggml.*`: byte-level BPE ("gpt2": tokens, merges, token types
  and llama.cpp's name for the pre-tokenizer) or SentencePiece-style BPE ("llama": tokens, scores
  and token types, as Gemma's are), with the special token ids and the chat template.

Weights are written as F16, Q8_0 or Q4_0 with the `gguf` package's quantizers (one-dimensional
tensors stay F32, as llama.cpp keeps them; a matrix whose rows do not split into blocks of 32
is written as F16). Q4_0 keeps the token embeddings and the output layer at Q8_0, as llama.cpp's
own Q4_0 files keep their output layer at a higher precision. MLX-quantized models are
dequantized first, one tensor at a time: memory holds the lazily loaded model and one tensor in
float32.

The file is written under a temporary name next to its destination and renamed into place when
complete; an error or a cancel removes it. mlx, mlx-lm and transformers are imported inside the
functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# The import's name tables and pre-tokenizer patterns: one definition for both directions.
from inference.weights.convert import parameters, release_memory
from inference.weights.gguf.architectures import _BLOCK_NAMES, _GEMMA3_BLOCK_NAMES, _TOP_NAMES
from inference.weights.gguf.reader import GGUFError
from inference.weights.gguf.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT
from inference.weights.progress import Progress, check_cancelled

if TYPE_CHECKING:
    import mlx.nn as nn

logger = logging.getLogger(__name__)

# What a model can be exported as: the GGUF file types llama.cpp calls MOSTLY_F16, MOSTLY_Q8_0
# and MOSTLY_Q4_0.
EXPORT_TYPES = ("f16", "q8_0", "q4_0")
# mlx-lm model type -> GGUF architecture. llama.cpp writes Mistral and SmolLM as "llama" too.
EXPORT_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
# Bytes in a block of 32 weights: Q8_0 (a float16 scale, 32 int8), Q4_0 (a scale, 16 bytes).
_BLOCK = 32

# Token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
# llama.cpp's name for GPT-2's pre-tokenizer (its "default" splits digits and punctuation
# differently; "gpt2" is unknown to it).
_GPT2_PRE = "gpt-2"


class GGUFExportError(GGUFError):
    """The model cannot be exported to GGUF (an architecture, a tokenizer or a setting that
    llama.cpp's file has no place for); the message says which."""


@dataclass
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    source: Path
    architecture: str
    file_type: str
    tensors: int
    # GGML type name -> how many tensors have it ("Q8_0": 210, "F32": 61).
    tensor_types: dict[str, int]
    parameters: int
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable (paths as strings)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["source"] = str(self.source)
        return data


@dataclass
class _Tensor:
    """One tensor of the file: its GGUF name, shape (numpy order), type, and how to compute it
    (float32, already in llama.cpp's layout)."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    compute: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        from gguf.quants import quant_shape_to_byte_shape

        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype)))


# --------------------------------------------------------------------------- the export


def export_gguf(
    source: Path,
    dest: Path,
    *,
    file_type: str = "q8_0",
    progress: Progress | None = None,
    overwrite: bool = False,
    work_path: Path | None = None,
) -> ExportResult:
    """Export the model folder `source` (an mlx-lm or Hugging Face safetensors folder, float
    or MLX-quantized) as the GGUF file `dest`, with weights as `file_type` (`EXPORT_TYPES`).

    Reports "loading", "writing" (bytes of the file, one advance per tensor) and checks for a
    cancel between tensors (`ConversionCancelled`). The file is written at `work_path` (by
    default a hidden name next to `dest`) and renamed to `dest` when complete; after an error or
    a cancel nothing is left at either. An existing `dest` is an error unless `overwrite`.
    Raises `GGUFExportError` for a model llama.cpp's format has no place for.
    """
    started = time.perf_counter()
    source, dest = Path(source), Path(dest)
    if file_type not in EXPORT_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(EXPORT_TYPES)}, not {file_type!r}")
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dest} already exists")
    work = Path(work_path) if work_path is not None else dest.parent / f".export-{uuid.uuid4().hex}"

    if progress is not None:
        progress.step(f"loading {source.name}")
    try:
        architecture, tensors = _write(source, dest, work, file_type, progress, overwrite)
    finally:
        release_memory()

    types = Counter(t.qtype.name for t in tensors)
    result = ExportResult(
        path=dest,
        source=source,
        architecture=architecture,
        file_type=file_type,
        tensors=len(tensors),
        tensor_types=dict(sorted(types.items())),
        parameters=sum(int(np.prod(t.shape)) for t in tensors if t.name != "rope_freqs.weight"),
        size_bytes=dest.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "exported %s as %s (%s, %s) in %.1fs",
        source.name,
        dest,
        architecture,
        file_type,
        result.seconds,
    )
    return result


def _write(
    source: Path,
    dest: Path,
    work: Path,
    file_type: str,
    progress: Progress | None,
    overwrite: bool,
) -> tuple[str, list[_Tensor]]:
    """Load the model, write the file at `work`, rename it to `dest`; its architecture and
    tensors."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    model, config, tokenizer = _load(source)
    model_type = config.get("model_type", "")
    architecture = EXPORT_ARCHITECTURES.get(model_type)
    if architecture is None:
        supported = ", ".join(sorted(EXPORT_ARCHITECTURES))
        raise GGUFExportError(
            f"{source.name}: exporting a {model_type or 'model of unknown type'} model to GGUF "
            f"is not supported (supported: {supported})"
        )
    args = _text_args(model)
    tensors = _tensor_plan(model, args, architecture, file_type, source)
    vocab_rows = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    check_cancelled(progress)

    # The writer tells at INFO level which endianness and temporary file it writes: chatter
    # that would land between a command's progress bars. What it warns about still shows.
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_name(source.name)
    writer.add_type("model")
    writer.add_file_type(_FILE_TYPES[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hyperparameters(writer, architecture, args, source)
    _write_tokenizer(writer, tokenizer, config, vocab_rows, source, progress)
    f32, f16, _, _ = _ggml_types()
    for t in tensors:
        if t.qtype in (f32, f16):
            dtype = np.dtype(np.float32 if t.qtype == f32 else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, t.nbytes)
        else:
            shape = quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)

    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(work)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if progress is not None:
            total = sum(t.nbytes for t in tensors)
            progress.step(f"writing {dest.name}", total=total, unit="bytes")
        for t in tensors:
            check_cancelled(progress)
            writer.write_tensor_data(gguf.quants.quantize(t.compute(), t.qtype))
            if progress is not None:
                progress.advance(t.nbytes)
        writer.close()
        check_cancelled(progress)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            os.replace(work, dest)
        else:
            _rename_new(work, dest)
    except BaseException:
        writer.close()
        work.unlink(missing_ok=True)
        if progress is not None:
            progress.log("removed the unfinished file")
        raise
    # What computes each tensor holds the model: the caller keeps only names, shapes, types.
    for t in tensors:
        t.compute = _spent
    return architecture, tensors


def _spent() -> np.ndarray:
    raise RuntimeError("this tensor was written already")


def _rename_new(work: Path, dest: Path) -> None:
    """Move `work` to `dest`, refusing to replace a file that appeared meanwhile."""
    try:
        os.link(work, dest)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: check, then rename (a race is unlikely here).
        if dest.exists():
            raise FileExistsError(f"{dest} already exists") from None
        os.rename(work, dest)
        return
    work.unlink()


_FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2}  # gguf.LlamaFileType


def _ggml_types() -> tuple[Any, Any, Any, Any]:
    from gguf import GGMLQuantizationType as T

    return T.F32, T.F16, T.Q8_0, T.Q4_0


# --------------------------------------------------------------------------- loading


def _load(source: Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """The model (lazily loaded, quantized layers as they are), its config and its Hugging
    Face tokenizer."""
    from mlx_lm.utils import load_model, load_tokenizer

    if not (source / "config.json").is_file():
        raise GGUFExportError(f"{source.name} is not a model folder (no config.json)")
    try:
        model, config = load_model(source, lazy=True, trust_remote_code=False)
        wrapper = load_tokenizer(source, {"trust_remote_code": False})
    except (ValueError, OSError) as e:
        raise GGUFExportError(f"{source.name}: mlx-lm cannot load it: {e}") from e
    return model, config, wrapper._tokenizer


def _text_args(model: nn.Module) -> Any:
    """The text model's arguments (mlx-lm's `ModelArgs`, defaults filled in)."""
    language_model = getattr(model, "language_model", None)
    return (language_model or model).args


# --------------------------------------------------------------------------- tensors


def _gguf_names(architecture: str) -> dict[str, str]:
    """mlx-lm module path inside a block (or at the top) -> GGUF name, the import's inverted."""
    block = _GEMMA3_BLOCK_NAMES if architecture == "gemma3" else _BLOCK_NAMES
    names = {module: part for part, module in block.items()}
    names.update({module: part for part, module in _TOP_NAMES.items()})
    return names


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _tensor_plan(
    model: nn.Module, args: Any, architecture: str, file_type: str, source: Path
) -> list[_Tensor]:
    """Every tensor of the file, in llama.cpp's order, with what computes it."""
    f32, f16, q8_0, q4_0 = _ggml_types()
    names = _gguf_names(architecture)
    modules = dict(model.named_modules())
    prefix = "language_model." if hasattr(model, "language_model") else ""
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    permute = architecture == "llama" and not getattr(args, "rope_traditional", False)
    if getattr(args, "mlp_bias", False):
        raise GGUFExportError(f"{source.name}: MLP biases are not supported in the GGUF export")

    # Module path -> the names of its parameters ("weight", "scales", "biases", "bias").
    grouped: dict[str, set[str]] = {}
    for path, _value in parameters(model):
        module, _, part = path.rpartition(".")
        grouped.setdefault(module, set()).add(part)

    plan: list[tuple[tuple[int, int], _Tensor]] = []
    for module_path, parts in grouped.items():
        inner = module_path.removeprefix(prefix)
        layer = _LAYER.match(inner)
        key = layer.group(2) if layer else inner
        gguf_part = names.get(key)
        if gguf_part is None:
            raise GGUFExportError(
                f"{source.name}: {module_path} has no counterpart in llama.cpp's {architecture} "
                "model"
            )
        base = f"blk.{layer.group(1)}.{gguf_part}" if layer else gguf_part
        module = modules[module_path]
        quantized = "scales" in parts
        for suffix in ("weight", "bias"):
            if suffix not in parts:
                continue
            shape = _logical_shape(module, suffix, quantized)
            if len(shape) == 1:
                qtype = f32
            elif file_type == "f16" or shape[-1] % _BLOCK:
                qtype = f16
            elif file_type == "q8_0" or gguf_part in ("token_embd", "output"):
                qtype = q8_0
            else:
                qtype = q4_0
            if gguf_part in ("attn_q", "attn_k") and permute:
                n = heads if gguf_part == "attn_q" else kv_heads
            else:
                n = 0
            shift = 1.0 if architecture == "gemma3" and gguf_part.endswith("norm") else 0.0
            compute = _computer(module, suffix, quantized, permute_heads=n, shift=shift)
            order = int(layer.group(1)) if layer else (-1 if gguf_part == "token_embd" else 1 << 30)
            plan.append(((order, 0), _Tensor(f"{base}.{suffix}", shape, qtype, compute)))

    rope_freqs = _llama3_rope_factors(args, architecture, source)
    if rope_freqs is not None:
        rope = _Tensor("rope_freqs.weight", rope_freqs.shape, f32, lambda: rope_freqs)
        plan.append(((-2, 0), rope))
    plan.sort(key=lambda item: (item[0], item[1].name))
    tensors = [t for _, t in plan]
    if not any(t.name == "token_embd.weight" for t in tensors):
        raise GGUFExportError(f"{source.name}: the model has no token embeddings")
    return tensors


def _logical_shape(module: Any, suffix: str, quantized: bool) -> tuple[int, ...]:
    value = module[suffix]
    if suffix == "weight" and quantized:
        rows = value.shape[0]
        return (rows, module["scales"].shape[-1] * module.group_size)
    return tuple(value.shape)


def _computer(
    module: Any, suffix: str, quantized: bool, *, permute_heads: int, shift: float
) -> Callable[[], np.ndarray]:
    """A function computing one tensor as float32 numpy, in llama.cpp's layout."""

    def compute() -> np.ndarray:
        import mlx.core as mx

        value = module[suffix]
        if suffix == "weight" and quantized:
            value = mx.dequantize(
                value,
                module["scales"],
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=getattr(module, "mode", "affine"),
            )
        value = value.astype(mx.float32)
        if shift:
            value = value + shift
        array = np.array(value, copy=True)
        if permute_heads:
            array = permute_rows(array, permute_heads)
        return array

    return compute


def permute_rows(x: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's per-head reordering of Q/K rows ((2, d/2) stored as (d/2, 2)); the inverse
    of `gguf.tensors.unpermute_rows`."""
    rows = x.shape[0]
    rest = x.shape[1:]
    return np.ascontiguousarray(
        x.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


def _llama3_rope_factors(args: Any, architecture: str, source: Path) -> np.ndarray | None:
    """Llama 3.1's per-frequency rope factors as llama.cpp's converter writes them, or None."""
    scaling = getattr(args, "rope_scaling", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if architecture != "llama" or kind != "llama3":
        return None
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelens = 2 * math.pi * float(args.rope_theta) ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (context / wavelens - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelens < context / high, 1.0, np.where(wavelens > context / low, factor, medium)
    )
    return factors.astype(np.float32)


# --------------------------------------------------------------------------- metadata


def _write_hyperparameters(writer: Any, architecture: str, args: Any, source: Path) -> None:
    """`<arch>.*`: what llama.cpp reads, from mlx-lm's arguments."""
    from gguf import RopeScalingType

    hidden, heads = args.hidden_size, args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or hidden // heads
    writer.add_context_length(int(args.max_position_embeddings or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_rope_freq_base(float(args.rope_theta))
    if architecture == "llama":
        writer.add_vocab_size(args.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(int(args.sliding_window))
        writer.add_rope_freq_base_swa(float(args.rope_local_base_freq))
        if int(args.sliding_window_pattern) != 6:
            # llama.cpp makes every sixth Gemma 3 layer global, whatever the file says.
            raise GGUFExportError(
                f"{source.name}: a sliding window pattern of {args.sliding_window_pattern} "
                "(llama.cpp's Gemma 3 has one global layer in six)"
            )
        if float(args.query_pre_attn_scalar) != head_dim:
            writer.add_attention_scale(1.0 / math.sqrt(float(args.query_pre_attn_scalar)))
    scaling = getattr(args, "rope_scaling", None) or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default", "llama3") or (kind == "llama3" and architecture != "llama"):
        raise GGUFExportError(f"{source.name}: rope scaling {kind!r} is not supported")


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _write_tokenizer(
    writer: Any,
    tokenizer: Any,
    config: dict[str, Any],
    vocab_rows: int,
    source: Path,
    progress: Progress | None,
) -> None:
    """`tokenizer.ggml.*` and the chat template, from the Hugging Face tokenizer."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"{source.name}: a {model.get('type') or 'non-BPE'} tokenizer cannot be exported "
            "(byte-level BPE or SentencePiece-style BPE)"
        )
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_rows:
        raise GGUFExportError(
            f"{source.name}: the tokenizer has ids up to {max(vocab.values())} but the "
            f"embeddings only {vocab_rows} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [_UNUSED] * vocab_rows
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = _NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_rows:
            types[i] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    byte_level = _has_byte_level(spec)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, source, progress))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        if not model.get("byte_fallback"):
            raise GGUFExportError(
                f"{source.name}: a BPE tokenizer that is neither byte-level nor "
                "SentencePiece-style (byte fallback) cannot be exported"
            )
        for i, token in enumerate(tokens):
            if types[i] == _NORMAL and _BYTE_TOKEN.match(token):
                types[i] = _BYTE
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, merges))
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))

    ids = _special_ids(tokenizer, config)
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if ids[key] is not None:
            add(ids[key])
    writer.add_add_bos_token(_adds_bos(tokenizer, ids["bos"]))
    writer.add_add_eos_token(False)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)
    elif progress is not None:
        progress.log("the model has no chat template: the file carries none")


def _has_byte_level(spec: dict[str, Any]) -> bool:
    def types(node: Any) -> list[str]:
        if not isinstance(node, dict):
            return []
        found = [node.get("type", "")]
        for child in node.get("pretokenizers") or node.get("decoders") or []:
            found += types(child)
        return found

    return "ByteLevel" in types(spec.get("pre_tokenizer")) + types(spec.get("decoder"))


def _pre_tokenizer_name(spec: dict[str, Any], source: Path, progress: Progress | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level BPE's pre-tokenizer.

    llama.cpp's converter recognises a tokenizer by hashing how it splits a test text; the
    few pre-tokenizers the import knows are recognised here by their structure.
    """
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2_PRE
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    message = (
        f"{source.name}: its pre-tokenizer ({', '.join(map(str, kinds))}) is not one llama.cpp "
        "names here; the file says GPT-2's, and llama.cpp may split some text differently"
    )
    logger.warning(message)
    if progress is not None:
        progress.log(message)
    return _GPT2_PRE


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Llama 2: yes;
    Gemma: no)."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    if any(s.get("type") == "Prepend" for s in steps if isinstance(s, dict)):
        return True
    pre = spec.get("pre_tokenizer") or {}
    pre_steps = pre.get("pretokenizers", [pre])
    return any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
        for s in pre_steps
        if isinstance(s, dict)
    )


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp merge as the BPE merges do.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores
    highest; a BPE merges the pair of lowest rank. A piece's score is minus the rank of the
    first merge that makes it (the import derives merges from scores the same way round);
    pieces no merge makes never win a merge, and score below all the others.
    """
    index = {token: i for i, token in reversed(list(enumerate(tokens)))}
    scores = [-float(len(merges) + 1)] * len(tokens)
    seen: set[int] = set()
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        i = index.get(left + right)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank)
    return scores


def _special_ids(tokenizer: Any, config: dict[str, Any]) -> dict[str, int | None]:
    def first(value: Any) -> int | None:
        if isinstance(value, list):
            value = value[0] if value else None
        return None if value is None else int(value)

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": first(config.get("bos_token_id") if bos is None else bos),
        "eos": first(config.get("eos_token_id") if eos is None else eos),
        "unk": first(tokenizer.unk_token_id),
        "pad": first(tokenizer.pad_token_id),
    }


def _adds_bos(tokenizer: Any, bos: int | None) -> bool:
    """Whether the tokenizer starts every text with the BOS token (llama.cpp then does too)."""
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
