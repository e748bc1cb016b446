"""GGUF files turned into MLX models, in memory or as mlx-lm directories, without torch.

A GGUF file holds a model's hyperparameters, its tokenizer and its tensors. This module reads all
three and hands back what mlx-lm needs: a config dict in mlx-lm's (Hugging Face's) layout, weights
under mlx-lm's names and a `transformers` fast tokenizer built with the `tokenizers` library.

Tensors of the block types MLX has a native layout for (Q4_0, Q4_1, Q8_0: group size 32) stay
quantized, exactly as `mx.load` returns them, and the model gets `QuantizedLinear` /
`QuantizedEmbedding` layers with per-layer bits. Every other type (K-quants, BF16, ...) is
dequantized with the `gguf` package; `import_gguf` can then re-quantize those to MLX's affine
format at the bits and group size asked for. transformers' own GGUF loader is never used: it
imports torch.

Mapped architectures: the llama family (`llama`, which llama.cpp also uses for Mistral, SmolLM and
TinyLlama, and `qwen2`) and `gemma3` (its text model); anything else raises
`UnsupportedArchitecture`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import mmap
import re
import shutil
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# GGUF v1 used 32-bit lengths; every converter since 2023 writes v2 or v3.
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF block types whose bytes `mx.load` turns into MLX's affine layout (group size 32).
QUANT_GROUP_SIZE = 32
# GGML type ids (gguf.GGMLQuantizationType): F32, F16, Q4_0, Q4_1, Q8_0.
_F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16 = 0, 1, 2, 3, 8, 30
_MLX_NATIVE_TYPES = frozenset({_F32, _F16, _Q4_0, _Q4_1, _Q8_0})
_MLX_QUANT_TYPES = frozenset({_Q4_0, _Q4_1, _Q8_0})

# What `import_gguf` can re-quantize to (mx.quantize's affine mode).
REQUANT_BITS = (2, 3, 4, 5, 6, 8)
REQUANT_GROUP_SIZES = (32, 64, 128)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")
# Architecture in the file -> mlx-lm model_type. llama.cpp writes Mistral 7B, SmolLM and
# TinyLlama as "llama"; "mistral" is accepted for hand-made files that say so.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

# GGUF tensor name (inside a block) -> mlx-lm module path.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block and per-head Q/K norms. llama.cpp calls the norm before
# the MLP `ffn_norm` here too, but in Gemma it is the *pre*-feed-forward one.
_GEMMA3_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp writes for its own use that have no place in the mlx-lm model.
_IGNORED_TENSORS = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias|scales|biases)$")

# Token types in `tokenizer.ggml.token_type` (gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_TOKEN_UNUSED = 5
_TOKEN_BYTE = 6

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` values (from llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Gemma's chat format, for Gemma files that carry no template (base models converted by
# llama.cpp often don't). Same turns as Google's template: a system message is folded into the
# first user turn and the model's role is called "model".
_GEMMA_END_OF_TURN = "<end_of_turn>"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

Progress = Callable[[str, int, int], None]
ShouldCancel = Callable[[], bool]


class GGUFError(ValueError):
    """The file is not a GGUF model this module can read; the message says why."""


class NotGGUFFile(GGUFError):
    """The path is missing, not a file, or does not start with the GGUF magic bytes."""


class TruncatedGGUF(GGUFError):
    """The file ends before its header or one of its tensors does (an incomplete download)."""


class UnsupportedTensorType(GGUFError):
    """A tensor has a GGML type that cannot be read or dequantized."""

    def __init__(self, path: Path, tensor: str, type_name: str, *, unknown: bool = False) -> None:
        self.tensor = tensor
        self.type_name = type_name
        what = (
            f"an unknown type id {type_name}"
            if unknown
            else f"type {type_name}, which cannot be read or dequantized"
        )
        super().__init__(f"{Path(path).name}: tensor {tensor!r} has {what}")


class UnsupportedArchitecture(GGUFError):
    """The GGUF file is fine but its architecture has no mapping onto an mlx-lm model."""

    def __init__(self, architecture: str, path: Path | None = None) -> None:
        self.architecture = architecture
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        where = f"{Path(path).name}: " if path is not None else ""
        super().__init__(
            f"{where}GGUF architecture {architecture!r} is not supported (supported: {supported})"
        )


class ConversionCancelled(Exception):
    """`should_cancel` said stop; nothing was left behind."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in the file and how to read them."""

    name: str
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores the dimensions reversed)
    type_id: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file except the tensor data."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


@dataclass
class GGUFModel:
    """A GGUF model read into memory, in mlx-lm's terms."""

    architecture: str
    config: dict[str, Any]
    weights: dict[str, mx.array]
    tokenizer: PreTrainedTokenizerFast
    chat_template: str | None
    # mlx-lm module path -> the GGML type its weight had in the file ("Q4_K", "F32", ...).
    source_types: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportResult:
    """What `import_gguf` wrote: the MLX directory and how each tensor got there."""

    out_dir: Path
    source: Path
    architecture: str
    model_type: str
    parameters: int
    # {"kept": {"Q8_0": n, ...}, "requantized": {"bits", "group_size", "tensors", "from"},
    #  "float": n}; see `_WeightSink.summary`.
    quantization: dict[str, Any]
    size_bytes: int
    source_size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable (paths as strings)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["source"] = str(self.source)
        return data


# --------------------------------------------------------------------------- header


class _Cursor:
    """Reads little-endian GGUF values from a buffer, failing clearly at its end."""

    _SCALARS = {
        0: struct.Struct("<B"),
        1: struct.Struct("<b"),
        2: struct.Struct("<H"),
        3: struct.Struct("<h"),
        4: struct.Struct("<I"),
        5: struct.Struct("<i"),
        6: struct.Struct("<f"),
        7: struct.Struct("<?"),
        10: struct.Struct("<Q"),
        11: struct.Struct("<q"),
        12: struct.Struct("<d"),
    }
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
    _NUMPY |= {10: "<u8", 11: "<i8", 12: "<f8"}
    _STRING, _ARRAY = 8, 9
    _U64 = struct.Struct("<Q")

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise TruncatedGGUF(
                f"{self.path.name}: truncated GGUF file: {what} extends past the end of the file "
                f"({self.size} bytes); is the download incomplete?"
            )

    def scalar(self, type_id: int, what: str) -> Any:
        fmt = self._SCALARS[type_id]
        self._need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))

    def string(self, what: str) -> str:
        self._need(8, what)
        (n,) = self._U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        self._need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, type_id: int, what: str) -> Any:
        if type_id == self._STRING:
            return self.string(what)
        if type_id == self._ARRAY:
            item_type = self.u32(what)
            count = self.u64(what)
            if item_type in self._NUMPY:
                dtype = np.dtype(self._NUMPY[item_type])
                self._need(count * dtype.itemsize, what)
                array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return array
            if item_type in (self._STRING, self._ARRAY):
                return [self.value(item_type, what) for _ in range(count)]
            raise GGUFError(f"{self.path.name}: {what} has an unknown value type {item_type}")
        if type_id in self._SCALARS:
            return self.scalar(type_id, what)
        raise GGUFError(f"{self.path.name}: {what} has an unknown value type {type_id}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise NotGGUFFile(f"{path}: no such file")
    if not path.is_file():
        raise NotGGUFFile(f"{path}: not a file")


@functools.cache
def _quant_sizes(type_id: int) -> tuple[str, int, int] | None:
    """(type name, block size in elements, block size in bytes) of a GGML type, or None."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    block, type_size = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, type_size


def read_header(path: Path) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF file, checking that the data is all there.

    Much faster than `gguf.GGUFReader` (which builds a numpy view per string: seconds for a
    50k-token vocabulary), and it fails with a `GGUFError` naming the problem instead of an
    IndexError when the file is truncated.
    """
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise NotGGUFFile(f"{path.name}: not a GGUF file (wrong magic bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, path)


def _parse_header(buf: mmap.mmap, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFError(f"{path.name}: GGUF version {version} is not supported{hint}")
    tensor_count = cur.u64("the tensor count")
    kv_count = cur.u64("the metadata count")

    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        metadata[key] = cur.value(cur.u32(f"metadata {key!r}"), f"metadata {key!r}")

    raw_tensors = []
    for i in range(tensor_count):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.u32(f"tensor {name!r}")
        dims = [cur.u64(f"tensor {name!r}") for _ in range(n_dims)]
        type_id = cur.u32(f"tensor {name!r}")
        offset = cur.u64(f"tensor {name!r}")
        raw_tensors.append((name, tuple(reversed(dims)), type_id, offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, type_id, offset in raw_tensors:
        sizes = _quant_sizes(type_id)
        if sizes is None:
            raise UnsupportedTensorType(path, name, str(type_id), unknown=True)
        type_name, block, type_size = sizes
        n = math.prod(shape)
        if n % block:
            raise GGUFError(
                f"{path.name}: tensor {name!r} ({type_name}, shape {shape}) is not a whole "
                f"number of {block}-element blocks"
            )
        info = TensorInfo(name, shape, type_id, data_start + offset, n // block * type_size)
        if info.offset + info.nbytes > cur.size:
            raise TruncatedGGUF(
                f"{path.name}: truncated GGUF file: tensor {name!r} extends past the end of "
                f"the file ({cur.size} bytes); is the download incomplete?"
            )
        tensors.append(info)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors)


# --------------------------------------------------------------------------- tensors


@functools.cache
def _can_dequantize(type_id: int) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    sizes = _quant_sizes(type_id)
    if sizes is None:
        return False
    try:
        dequantize(np.zeros((1, sizes[2]), dtype=np.uint8), GGMLQuantizationType(type_id))
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _type_name(type_id: int) -> str:
    sizes = _quant_sizes(type_id)
    return sizes[0] if sizes else str(type_id)


def _check_tensor_types(path: Path, header: GGUFHeader) -> None:
    for t in header.tensors:
        if t.type_id not in _MLX_NATIVE_TYPES and not _can_dequantize(t.type_id):
            raise UnsupportedTensorType(path, t.name, _type_name(t.type_id))


def _iter_raw_tensors(
    path: Path, header: GGUFHeader, *, dequantize_all: bool = False
) -> Iterator[tuple[TensorInfo, dict[str, mx.array]]]:
    """Each tensor of the file under its GGUF name, one at a time.

    Quantized Q4_0 / Q4_1 / Q8_0 tensors come as `{base}.weight/.scales/.biases` in MLX's affine
    layout; every other type is dequantized (float16, bfloat16 for BF16 sources, F32 stays
    float32). With `dequantize_all`, every tensor is float32, Q4_0 / Q4_1 / Q8_0 included.
    """
    import mlx.core as mx

    _check_tensor_types(path, header)
    if not dequantize_all and all(t.type_id in _MLX_NATIVE_TYPES for t in header.tensors):
        # The fast path: mx.load reads the whole file in one go (0.2 s for SmolLM2).
        try:
            loaded = mx.load(str(path), format="gguf")
        except RuntimeError as e:
            raise GGUFError(f"{path.name}: {e}") from e
        assert isinstance(loaded, dict)
        for t in header.tensors:
            if t.type_id in _MLX_QUANT_TYPES:
                base = t.name.removesuffix(".weight")
                yield t, {f"{base}.{s}": loaded.pop(f"{base}.{s}") for s in _QUANT_PARTS}
            else:
                yield t, {t.name: loaded.pop(t.name)}
        return
    # mx.load reads the whole file or nothing: one type it cannot return (Q5_0, IQ*, ...) or
    # returns wrongly (its Q4_K disagrees with llama.cpp's reference; BF16 comes back as
    # float16) sends the whole file through numpy instead, a tensor at a time.
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for t in header.tensors:
            yield t, _read_tensor(path, data, t, dequantize_all=dequantize_all)
    finally:
        del data


_QUANT_PARTS = ("weight", "scales", "biases")


def _read_tensor(
    path: Path, data: np.ndarray, t: TensorInfo, *, dequantize_all: bool
) -> dict[str, mx.array]:
    import mlx.core as mx
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = data[t.offset : t.offset + t.nbytes]
    if t.type_id == _F32:
        return {t.name: mx.array(raw.view("<f4").reshape(t.shape))}
    if t.type_id == _F16:
        values = mx.array(raw.view("<f2").reshape(t.shape))
        return {t.name: values.astype(mx.float32) if dequantize_all else values}
    if t.type_id in _MLX_QUANT_TYPES and not dequantize_all:
        if not t.name.endswith(".weight") or len(t.shape) != 2:
            raise GGUFError(f"{path.name}: quantized tensor {t.name!r} is not a 2-D weight")
        base = t.name.removesuffix(".weight")
        parts = _to_mlx_affine(raw, t.type_id, t.shape)
        return {f"{base}.{s}": mx.array(p) for s, p in zip(_QUANT_PARTS, parts, strict=True)}
    rows = raw.reshape(*t.shape[:-1], -1)
    values = mx.array(dequantize(rows, GGMLQuantizationType(t.type_id)).reshape(t.shape))
    if dequantize_all:
        return {t.name: values.astype(mx.float32)}
    # bfloat16 keeps BF16's range; the other types' block scales are float16 already.
    return {t.name: values.astype(mx.bfloat16 if t.type_id == _BF16 else mx.float16)}


def _load_tensors(path: Path, header: GGUFHeader) -> dict[str, mx.array]:
    """The file's tensors under their GGUF names, quantized ones as weight/scales/biases."""
    out: dict[str, mx.array] = {}
    for _, arrays in _iter_raw_tensors(path, header):
        out.update(arrays)
    return out


def _to_mlx_affine(
    raw: np.ndarray, type_id: int, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repack Q4_0 / Q4_1 / Q8_0 blocks into MLX's affine layout, as `mx.load` does.

    MLX dequantizes `scale * q + bias` with unsigned q packed little-end first into uint32;
    GGML stores signed (Q8_0) or offset (Q4_0) values, and Q4_0/Q4_1 put the first 16 values of a
    block in the low nibbles and the last 16 in the high ones.
    """
    rows, cols = shape
    n_blocks = cols // QUANT_GROUP_SIZE
    if type_id == _Q8_0:
        blocks = raw.reshape(rows, n_blocks, 34)
        d = blocks[..., :2].copy().view("<f2")[..., 0]
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scales, biases = d, d * np.float16(-128)
    else:
        head = 2 if type_id == _Q4_0 else 4
        blocks = raw.reshape(rows, n_blocks, head + 16)
        d = blocks[..., :2].copy().view("<f2")[..., 0]
        if type_id == _Q4_0:
            scales, biases = d, d * np.float16(-8)
        else:
            scales, biases = d, blocks[..., 2:4].copy().view("<f2")[..., 0]
        qs = blocks[..., head:]
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # block order, one per byte
        q = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    weight = np.ascontiguousarray(q).reshape(rows, -1).view("<u4")
    return weight, np.ascontiguousarray(scales), np.ascontiguousarray(biases)


def _unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head reordering of Q/K rows ((2, d/2) was stored as (d/2, 2))."""
    rows = x.shape[0]
    rest = tuple(x.shape[1:])
    return x.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _module_path(name: str, config: dict[str, Any], path: Path) -> tuple[str, str, str] | None:
    """(mlx-lm module path, GGUF part name, suffix) of a GGUF tensor; None for ignored ones."""
    if _IGNORED_TENSORS.match(name):
        return None
    match = _TENSOR_NAME.match(name)
    target = None
    part = suffix = ""
    if match is not None:
        block, part, suffix = match.groups()
        if block is None:
            target = _TOP_NAMES.get(part)
        else:
            names = _GEMMA3_BLOCK_NAMES if config["model_type"] == "gemma3_text" else _BLOCK_NAMES
            if part in names:
                target = f"model.layers.{block}.{names[part]}"
    if target is None:
        raise GGUFError(
            f"{path.name}: tensor {name!r} has no counterpart in mlx-lm's "
            f"{config['model_type']} model"
        )
    return target, part, suffix


def _to_mlx_tensor(
    info: TensorInfo, arrays: dict[str, mx.array], config: dict[str, Any], path: Path
) -> tuple[str, dict[str, mx.array]] | None:
    """One GGUF tensor as (module path, {"weight": ..., ...}) of mlx-lm's model, or None.

    Undoes what llama.cpp's converter did to it: the Q/K row permutation of llama models, and
    the +1 that it folds into every Gemma norm weight (mlx-lm's Gemma RMSNorm scales by
    `1 + weight`, as Hugging Face's does).
    """
    mapped = _module_path(info.name, config, path)
    if mapped is None:
        return None
    module, part, _ = mapped
    out = {name.rsplit(".", 1)[1]: value for name, value in arrays.items()}
    model_type = config["model_type"]
    if model_type == "llama" and part in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
        out = {k: _unpermute_rows(v, heads) for k, v in out.items()}
    elif model_type == "gemma3_text" and part.endswith("norm"):
        out = {k: v - 1.0 for k, v in out.items()}
    return module, out


def _quantization_config(layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not layers:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in layers.values()).most_common(1)[0][0]
    return {"group_size": common[0], "bits": common[1], "mode": "affine", **layers}


_REFINE_STEPS = 3
_CHUNK_ELEMENTS = 1 << 24
# The dtypes an imported model's scales, biases and float matrices can have. bfloat16 is left
# out: on a CPU it is emulated (10x slower here) and its 8-bit mantissa costs accuracy.
DTYPES = ("float16", "float32")


def affine_quantize(
    w: mx.array, *, bits: int, group_size: int, refine_steps: int = _REFINE_STEPS
) -> tuple[mx.array, mx.array, mx.array]:
    """`mx.quantize` (affine mode) with each group's scale and bias fitted to its values.

    `mx.quantize` maps each group's min and max onto the ends of the integer grid. Here that is
    the start: weighted least squares then re-fits (scale, bias) to the rounded integers and
    re-rounds, `refine_steps` times, keeping per group whichever fit has the smaller weighted
    squared error. The weights are llama.cpp's (`make_qkx2_quants`): rms(group) + |w|, so large
    weights, which matter most, are fitted more closely. A plain (unweighted) fit lowers the
    squared error further but lost perplexity on SmolLM2's 4-bit tied embeddings; this one gained
    everywhere we measured (docs/benchmarks.md: Gemma 3 270M at 4 bits 24.1 -> 19.8 against
    14.2 unquantized; SmolLM2 at 3 bits 122 -> 91). Returns MLX's packed layout:
    `mx.dequantize(*result, group_size=..., bits=...)` reads it. `refine_steps=0` is exactly
    `mx.quantize`.
    """
    import mlx.core as mx

    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns do not split into groups of {group_size}")
    step = max(1, _CHUNK_ELEMENTS // cols)
    parts = [
        _affine_quantize_rows(w[i : i + step], bits, group_size, refine_steps)
        for i in range(0, rows, step)
    ]
    if len(parts) == 1:
        return parts[0]
    packed, scales, biases = (mx.concatenate(list(p), axis=0) for p in zip(*parts, strict=True))
    return packed, scales, biases


def quantization_importance(groups: mx.array) -> mx.array:
    """How much each weight's error counts in `affine_quantize`: rms of its group + |w|."""
    import mlx.core as mx

    return mx.sqrt((groups * groups).mean(axis=-1, keepdims=True)) + mx.abs(groups)


def _affine_quantize_rows(
    w: mx.array, bits: int, group_size: int, refine_steps: int
) -> tuple[mx.array, mx.array, mx.array]:
    import mlx.core as mx

    rows, cols = w.shape
    top = 2**bits - 1
    w = w.astype(mx.float32)
    packed, scale, bias = mx.quantize(w, group_size=group_size, bits=bits)
    if refine_steps == 0:
        return packed, scale, bias
    g = w.reshape(rows, cols // group_size, group_size)
    scale, bias = scale[..., None], bias[..., None]
    importance = quantization_importance(g)
    total = importance.sum(axis=-1, keepdims=True)
    total = mx.where(total > 0, total, 1.0)  # an all-zero group: nothing to fit

    def fit(scale: mx.array, bias: mx.array) -> tuple[mx.array, mx.array]:
        # mx.quantize's scales can be negative (the bias is then the group's max). A constant
        # group has scale 0 and its value in the bias: q = 0 throughout.
        safe = mx.where(scale != 0, scale, 1.0)
        q = mx.where(scale != 0, mx.clip(mx.round((g - bias) / safe), 0, top), 0)
        return q, (importance * (q * scale + bias - g) ** 2).sum(axis=-1, keepdims=True)

    # Start from mx.quantize's own fit, so no group ever ends up worse than with it.
    q, err = fit(scale, bias)
    w_mean = (importance * g).sum(axis=-1, keepdims=True) / total
    for _ in range(refine_steps):
        q_mean = (importance * q).sum(axis=-1, keepdims=True) / total
        dq = q - q_mean
        var = (importance * dq * dq).sum(axis=-1, keepdims=True)
        cov = (importance * dq * (g - w_mean)).sum(axis=-1, keepdims=True)
        fitted = cov / mx.where(var > 0, var, 1.0)
        new_scale = mx.where((var > 0) & (fitted != 0), fitted, scale)
        new_bias = w_mean - new_scale * q_mean
        new_q, new_err = fit(new_scale, new_bias)
        better = new_err < err
        scale = mx.where(better, new_scale, scale)
        bias = mx.where(better, new_bias, bias)
        q = mx.where(better, new_q, q)
        err = mx.where(better, new_err, err)
        mx.eval(scale, bias, q, err)
    packed = _pack_bits(q.reshape(rows, cols).astype(mx.uint32), bits)
    return packed, scale.squeeze(-1), bias.squeeze(-1)


def _pack_bits(q: mx.array, bits: int) -> mx.array:
    """MLX's affine packing: each row's values as a little-endian bit stream, in uint32 words.

    Every 8 values make `bits` whole bytes, whatever the bit width; each half of an octet
    (4 values, at most 24 bits) is assembled in a uint32 and the bytes are cut from the two.
    """
    import mlx.core as mx

    rows, cols = q.shape
    octets = q.astype(mx.uint32).reshape(rows, cols // 8, 8)
    lo = octets[..., 0]
    hi = octets[..., 4]
    for i in range(1, 4):
        lo = lo | (octets[..., i] << (bits * i))
        hi = hi | (octets[..., 4 + i] << (bits * i))
    half = 4 * bits  # the bit where `hi` starts in the octet's stream
    out = []
    for k in range(bits):
        start = 8 * k
        byte = lo >> start if start < 32 else mx.zeros_like(lo)
        if start + 8 > half:
            byte = byte | (hi << (half - start) if half >= start else hi >> (start - half))
        out.append((byte & 0xFF).astype(mx.uint8))
    stream = mx.stack(out, axis=-1).reshape(rows, cols * bits // 8)
    return stream.view(mx.uint32)


class _WeightSink:
    """Collects an mlx-lm model's weights tensor by tensor, re-quantizing where asked.

    Q4_0 / Q4_1 / Q8_0 weights arrive quantized and their integers are kept bit for bit. Float
    2-D weights (K-quants and the other types after dequantization, F16, BF16, F32 matrices) are
    quantized with `affine_quantize` when `bits` is set, else kept as floats. `dtype` is the
    dtype of every scale, bias and float matrix (None: as read). 1-D tensors (norms, biases)
    stay as they are.
    """

    def __init__(
        self,
        bits: int | None,
        group_size: int,
        *,
        dtype: str | None = None,
        refine: bool = True,
    ) -> None:
        if bits is not None and bits not in REQUANT_BITS:
            raise ValueError(f"bits must be one of {REQUANT_BITS}, not {bits}")
        if group_size not in REQUANT_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {REQUANT_GROUP_SIZES}, not {group_size}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        self.bits = bits
        self.group_size = group_size
        self.dtype = dtype
        self.refine = refine
        self.weights: dict[str, mx.array] = {}
        self.layers: dict[str, dict[str, Any]] = {}
        self.source_types: dict[str, str] = {}
        self.kept: Counter[str] = Counter()
        self.requantized: Counter[str] = Counter()
        self.floats: Counter[str] = Counter()

    def add(self, module: str, parts: dict[str, mx.array], type_name: str) -> None:
        import mlx.core as mx

        weight = parts.get("weight")
        if weight is not None:
            self.source_types[module] = type_name
        if "scales" in parts:
            assert weight is not None
            self.kept[type_name] += 1
            bits = weight.shape[-1] * 32 // (parts["scales"].shape[-1] * QUANT_GROUP_SIZE)
            self.layers[module] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
            parts = dict(parts, scales=self._cast(parts["scales"]))
            parts["biases"] = self._cast(parts["biases"])
        elif weight is not None and weight.ndim == 2:
            if self.bits is not None and weight.shape[-1] % self.group_size == 0:
                steps = _REFINE_STEPS if self.refine else 0
                wq, scales, biases = affine_quantize(
                    weight, bits=self.bits, group_size=self.group_size, refine_steps=steps
                )
                # Without a dtype, the scales take the one GGUF's Q4_0/Q8_0 blocks carry.
                dtype = getattr(mx, self.dtype or "float16")
                parts = dict(parts, weight=wq, scales=scales.astype(dtype))
                parts["biases"] = biases.astype(dtype)
                self.layers[module] = {"group_size": self.group_size, "bits": self.bits}
                self.requantized[type_name] += 1
            else:
                parts = dict(parts, weight=self._cast(weight))
                self.floats[type_name] += 1
        for suffix, value in parts.items():
            self.weights[f"{module}.{suffix}"] = value
        mx.eval(list(parts.values()))

    def _cast(self, x: mx.array) -> mx.array:
        import mlx.core as mx

        return x if self.dtype is None else x.astype(getattr(mx, self.dtype))

    def quantization(self) -> dict[str, Any] | None:
        """mlx-lm's `quantization` config: defaults plus an entry for every quantized layer."""
        if self.bits is not None and self.requantized:
            return {
                "group_size": self.group_size,
                "bits": self.bits,
                "mode": "affine",
                **self.layers,
            }
        return _quantization_config(self.layers)

    def summary(self) -> dict[str, Any]:
        """How each weight matrix was stored, by its GGML type in the file."""
        return {
            "kept": dict(sorted(self.kept.items())),
            "requantized": {
                "bits": self.bits,
                "group_size": self.group_size if self.bits is not None else None,
                "tensors": sum(self.requantized.values()),
                "from": dict(sorted(self.requantized.items())),
            },
            "float": sum(self.floats.values()),
            "float_from": dict(sorted(self.floats.items())),
            "dtype": self.dtype,
        }


# --------------------------------------------------------------------------- config


def _architecture(metadata: dict[str, Any], path: Path) -> str:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path.name}: no general.architecture in the metadata")
    if arch not in _MODEL_TYPES:
        raise UnsupportedArchitecture(arch, path)
    return arch


def _build_config(
    metadata: dict[str, Any], architecture: str, tensors: dict[str, TensorInfo], path: Path
) -> dict[str, Any]:
    def hp(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{architecture}.{key}", default)
        if value is None:
            raise GGUFError(f"{path.name}: metadata {architecture}.{key} is missing")
        if isinstance(value, np.ndarray):
            raise GGUFError(
                f"{path.name}: metadata {architecture}.{key} varies per layer, which the "
                f"{architecture} model does not support"
            )
        return value

    model_type = _MODEL_TYPES[architecture]
    hidden = int(hp("embedding_length"))
    heads = int(hp("attention.head_count"))
    kv_heads = int(hp("attention.head_count_kv", heads))
    embed = tensors.get("token_embd.weight")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{architecture}.vocab_size") or (
        embed.shape[0] if embed is not None else len(tokens or [])
    )
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "hidden_size": hidden,
        "num_hidden_layers": int(hp("block_count")),
        "intermediate_size": int(hp("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(hp("context_length", 4096)),
        "rope_theta": float(hp("rope.freq_base", 10000.0 if model_type == "llama" else 1e6)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if metadata.get(f"{architecture}.{key}"):
            raise GGUFError(
                f"{path.name}: {architecture}.{key} is set, which mlx-lm's {model_type} "
                "model does not implement"
            )
    head_dim = metadata.get(f"{architecture}.attention.key_length")
    if model_type == "gemma3_text":
        pattern = metadata.get(f"{architecture}.attention.sliding_window_pattern")
        layers = config["num_hidden_layers"]
        config.update(_gemma3_config(hp, pattern, hidden, heads, layers, path))
    elif head_dim is not None and int(head_dim) != hidden // heads:
        if model_type != "llama":
            raise GGUFError(f"{path.name}: a head size other than hidden/heads is not supported")
        config["head_dim"] = int(head_dim)
    if model_type == "llama" and any(n.endswith("attn_q.bias") for n in tensors):
        config["attention_bias"] = True

    scaling = metadata.get(f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"{path.name}: rope scaling {scaling!r} is not supported")
        config["rope_scaling"] = {"type": "linear", "factor": float(hp("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = _llama3_rope_scaling(path, config, tensors["rope_freqs.weight"])

    ids = _special_token_ids(metadata, architecture)
    if ids["bos"] is not None:
        config["bos_token_id"] = ids["bos"]
    if ids["eos"]:
        config["eos_token_id"] = ids["eos"]
    return config


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _gemma3_config(
    hp: Callable[..., Any], pattern: Any, hidden: int, heads: int, layers: int, path: Path
) -> dict[str, Any]:
    """Gemma 3's own hyperparameters, with llama.cpp's defaults where the file has none.

    llama.cpp (src/llama-model.cpp) hard-codes what older converters did not write: every sixth
    layer global, the others sliding-window with rope base 10000; attention scaled by
    1/sqrt(head_dim), except the 27B (62 layers) which uses 1/sqrt(hidden/heads).
    """
    head_dim = int(hp("attention.key_length", 256))
    if int(hp("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path.name}: gemma3 with different key and value head sizes")
    scale = hp("attention.scale", 0.0)
    # transformers' Gemma3TextConfig (which AutoTokenizer reads) insists on an int here.
    if scale:
        query_pre_attn_scalar = round(1.0 / float(scale) ** 2)
    else:
        query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim
    return {
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "rope_local_base_freq": float(hp("rope.freq_base_swa", 10000.0)),
        "sliding_window": int(hp("attention.sliding_window", 512)),
        "sliding_window_pattern": _sliding_window_pattern(pattern, layers, path),
    }


def _sliding_window_pattern(value: Any, layers: int, path: Path) -> int:
    """mlx-lm's period of global layers, from an int or llama.cpp's per-layer "is SWA" flags."""
    if value is None:
        return 6
    if not isinstance(value, np.ndarray | list):
        return int(value)
    flags = [bool(v) for v in value]
    period = flags.index(False) + 1 if False in flags else len(flags) + 1
    if len(flags) != layers or flags != [(i + 1) % period != 0 for i in range(layers)]:
        raise GGUFError(
            f"{path.name}: this per-layer sliding window pattern is not supported: mlx-lm's "
            "gemma3 model needs one global layer every N"
        )
    return period


def _llama3_rope_scaling(path: Path, config: dict[str, Any], info: TensorInfo) -> dict[str, Any]:
    """Recognise Llama 3.1's rope frequency factors and name them the way mlx-lm wants.

    llama.cpp stores the per-frequency factors as a tensor; mlx-lm computes them from four
    numbers. Meta's released models all use the same three, so fit the factor and check.
    """
    if info.type_id != _F32:
        raise GGUFError(f"{path.name}: rope_freqs.weight is not float32")
    with path.open("rb") as f:
        f.seek(info.offset)
        factors = np.frombuffer(f.read(info.nbytes), dtype="<f4")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    wavelens = 2 * math.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    low, high = 8192 / 1.0, 8192 / 4.0
    smooth = (8192 / wavelens - 1.0) / (4.0 - 1.0)
    factor = float(factors.max())
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    medium = 1 / ((1 - smooth) / factor + smooth)
    expected = np.where(wavelens < high, 1.0, np.where(wavelens > low, factor, medium))
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise GGUFError(f"{path.name}: rope frequency factors of an unknown kind")
    return scaling


# --------------------------------------------------------------------------- tokenizer


def _special_token_ids(metadata: dict[str, Any], architecture: str | None = None) -> dict[str, Any]:
    def get(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    eos = [i for i in (get("eos"), get("eot"), get("eom")) if i is not None]
    if (architecture or metadata.get("general.architecture")) == "gemma3":
        # Gemma ends a turn with <end_of_turn>, which the file does not mark as end of text:
        # llama.cpp finds it by name, and so does this.
        tokens = metadata.get("tokenizer.ggml.tokens") or []
        if _GEMMA_END_OF_TURN in tokens:
            eos.append(tokens.index(_GEMMA_END_OF_TURN))
    return {
        "bos": get("bos"),
        "eos": list(dict.fromkeys(eos)),
        "unk": get("unknown"),
        "pad": get("padding"),
    }


def build_tokenizer(metadata: dict[str, Any], path: Path | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer from `tokenizer.ggml.*` metadata: byte-level BPE or SentencePiece BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    where = f"{path.name}: " if path else ""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{where}the file has no tokenizer (tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.ones(len(tokens), dtype=np.int32)
    # Some converters write a token twice; the first id wins, as in llama.cpp.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    ids = _special_token_ids(metadata)

    def token_at(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token_at(ids["bos"])
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        pre_name = metadata.get("tokenizer.ggml.pre", "default")
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=pre_name == "llama-bpe",
            )
        )
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre_name)
        if pre_name == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError(f"{where}a SentencePiece tokenizer without tokenizer.ggml.scores")
        tokenizer = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_spm_merges(vocab, tokens, scores, types),
                unk_token=token_at(ids["unk"]),
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        spm_decoders = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
            )
            spm_decoders.append(decoders.Strip(" ", 1, 0))
        else:
            # Gemma: no dummy prefix, so a leading space is real and decoding keeps it.
            tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.decoder = decoders.Sequence(spm_decoders)
    else:
        raise GGUFError(f"{where}tokenizer model {kind!r} is not supported (gpt2 or llama)")

    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab[bos])],
        )
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _TOKEN_USER_DEFINED
        ]
    )
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is None and {"<start_of_turn>", _GEMMA_END_OF_TURN} <= vocab.keys():
        chat_template = GEMMA_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token_at(ids["eos"][0] if ids["eos"] else None),
        unk_token=token_at(ids["unk"]),
        pad_token=token_at(ids["pad"]),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context is not None else None,
    )


def _byte_level_pre_tokenizer(pre_name: str) -> Any:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pre

    if pre_name in ("llama-bpe", "qwen2"):
        split = _LLAMA3_SPLIT if pre_name == "llama-bpe" else _QWEN2_SPLIT
        return pre.Sequence(
            [
                pre.Split(Regex(split), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_name == "smollm":
        # llama.cpp's smollm pre-tokenizer splits digits one by one before the GPT-2 regex.
        return pre.Sequence([pre.Digits(individual_digits=True), byte_level])
    if pre_name not in ("default", "gpt2"):
        logger.warning("unknown GGUF pre-tokenizer %r: using GPT-2's", pre_name)
    return byte_level


def _spm_merges(
    vocab: dict[str, int], tokens: list[str], scores: np.ndarray, types: Any = None
) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's score-ordered merging (as transformers does).

    Control, unused and byte tokens are never the result of a merge: SentencePiece does not
    produce them from text (Gemma's `<unused0>`... pieces score higher than every real word).
    """
    skip = {_TOKEN_CONTROL, _TOKEN_UNUSED, _TOKEN_BYTE}
    kinds = [1] * len(tokens) if types is None else [int(t) for t in types]
    ranks = [-float(x) for x in scores]
    get = vocab.get
    pairs: list[tuple[str, str]] = []
    keys: list[tuple[float, int, int]] = []
    for i, piece in enumerate(tokens):
        if len(piece) < 2 or kinds[i] in skip or get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left = get(piece[:cut])
            if left is None:
                continue
            right = get(piece[cut:])
            if right is not None:
                pairs.append((piece[:cut], piece[cut:]))
                keys.append((ranks[i], left, right))
    # Highest score first, ties by the ids of the two halves (a 262k-token vocabulary makes
    # half a million merges: sort indices, not tuples of strings).
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [pairs[i] for i in order]


def read_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Only the tokenizer of a GGUF file (no tensor data is read)."""
    header = read_header(Path(path))
    return build_tokenizer(header.metadata, Path(path))


def _detokenizer_class(tokenizer: PreTrainedTokenizerFast) -> Any:
    """The streaming detokenizer mlx_lm.load would pick for this tokenizer's decoder."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return BPEStreamingDetokenizer
    if not any(d.get("type") == "Strip" for d in decoder.get("decoders", [])):
        return functools.partial(SPMStreamingDetokenizer, trim_space=False)
    return SPMStreamingDetokenizer


# --------------------------------------------------------------------------- public API


def _check_cancel(should_cancel: ShouldCancel | None) -> None:
    if should_cancel is not None and should_cancel():
        raise ConversionCancelled("the conversion was cancelled")


def default_dtype(model_type: str) -> str:
    """The dtype of an imported model's scales and float weights, by mlx-lm model type.

    float16, what GGUF blocks carry, except for Gemma: its activations overflow float16 (they
    follow the scales' dtype), which cost Gemma 3 270M 3% of perplexity at 8 bits.
    """
    return "float32" if model_type == "gemma3_text" else "float16"


def _read(
    path: Path,
    make_sink: Callable[[str], _WeightSink],
    *,
    dequantize_all: bool = False,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> tuple[GGUFModel, _WeightSink]:
    """Read a GGUF file tensor by tensor into the sink made for its model type."""
    header = read_header(path)
    architecture = _architecture(header.metadata, path)
    _check_tensor_types(path, header)
    infos = {t.name: t for t in header.tensors}
    config = _build_config(header.metadata, architecture, infos, path)
    sink = make_sink(config["model_type"])
    tokenizer = build_tokenizer(header.metadata, path)
    total = len(header.tensors)
    _check_cancel(should_cancel)
    if progress is not None:
        progress("tensors", 0, total)
    tensors = _iter_raw_tensors(path, header, dequantize_all=dequantize_all)
    for done, (info, arrays) in enumerate(tensors, 1):
        mapped = _to_mlx_tensor(info, arrays, config, path)
        if mapped is not None:
            sink.add(*mapped, _type_name(info.type_id))
        if progress is not None:
            progress("tensors", done, total)
        _check_cancel(should_cancel)
    quantization = sink.quantization()
    if quantization is not None:
        config["quantization"] = quantization
    gguf_model = GGUFModel(
        architecture=architecture,
        config=config,
        weights=sink.weights,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        source_types=sink.source_types,
    )
    return gguf_model, sink


def read_gguf(path: Path, *, dequantize: bool = False) -> GGUFModel:
    """Read a GGUF model file into memory in mlx-lm's terms. Raises `GGUFError`.

    Q4_0 / Q4_1 / Q8_0 weights stay quantized and other types are dequantized to float16 (or
    bfloat16; float32 for Gemma, see `default_dtype`), unless `dequantize` is set: then every
    tensor is float32, the reference a converted model is compared with.
    """

    def make_sink(model_type: str) -> _WeightSink:
        dtype = None if dequantize or model_type != "gemma3_text" else default_dtype(model_type)
        return _WeightSink(None, REQUANT_GROUP_SIZES[0], dtype=dtype)

    return _read(Path(path), make_sink, dequantize_all=dequantize)[0]


def _instantiate(gguf_model: GGUFModel) -> nn.Module:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes

    config = gguf_model.config
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(gguf_model.weights)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization") or {}

    def quantized_here(path: str, module: nn.Module) -> bool | dict[str, int]:
        params = quantization.get(path)
        return dict(params) if isinstance(params, dict) else False

    if quantization:
        nn.quantize(model, class_predicate=quantized_here)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GGUFError(f"the weights do not fit the {config['model_type']} model: {e}") from e
    mx.eval(model.parameters())
    return model


def build_model(gguf_model: GGUFModel) -> tuple[nn.Module, TokenizerWrapper]:
    """An mlx-lm model and tokenizer, ready to generate, from a model read by `read_gguf`."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model = _instantiate(gguf_model)
    wrapper = TokenizerWrapper(
        gguf_model.tokenizer,
        _detokenizer_class(gguf_model.tokenizer),
        eos_token_ids=gguf_model.config.get("eos_token_id"),
    )
    return model, wrapper


def _staging_dir(out_dir: Path) -> Path:
    # Hidden, next to the target: the catalogue skips dot-directories and the rename is atomic.
    return out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"


def _write_model_dir(
    gguf_model: GGUFModel,
    out_dir: Path,
    *,
    overwrite: bool,
    progress: Progress | None,
    should_cancel: ShouldCancel | None,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write `gguf_model` as an mlx-lm directory through a staging directory; its parameters.

    The weights are loaded into the real mlx-lm model first (strictly), so a directory is only
    ever written for weights that fit.
    """
    from mlx_lm.utils import get_total_parameters, save_config, save_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(out_dir)
    try:
        model = _instantiate(gguf_model)
        parameters = int(get_total_parameters(model))
        _check_cancel(should_cancel)
        if progress is not None:
            progress("save", 0, 1)
        save_model(staging, model)
        del model
        save_config(copy.deepcopy(gguf_model.config), staging / "config.json")
        gguf_model.tokenizer.save_pretrained(staging)
        if provenance is not None:
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _check_cancel(should_cancel)
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} already exists")
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        if progress is not None:
            progress("save", 1, 1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return parameters


# Written next to the weights by `import_gguf`: where the model came from and how it was stored.
PROVENANCE_FILE = "mlxweb_import.json"


def save_mlx_dir(
    gguf_model: GGUFModel,
    out_dir: Path,
    *,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    refine: bool = True,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> Path:
    """Write an mlx-lm model directory that `mlx_lm.load` reads back to the same model.

    Q4_0 / Q4_1 / Q8_0 weights are written as they are. The other weight matrices are
    re-quantized to `bits` (affine, `group_size`) when `bits` is given, else written as floats;
    norms and biases stay float32. `dtype` ("float16" or "float32") is the dtype of the scales,
    biases and float matrices, by default `default_dtype`; `refine` as in `import_gguf`.
    `progress(step, done, total)` is
    called per tensor ("quantize") and around the write ("save"); `should_cancel()` is checked
    between tensors and raises `ConversionCancelled`.

    Everything is written to a staging directory next to `out_dir` and renamed at the end, so a
    crash or a cancel never leaves a half-written model where a loader would find it. An
    existing `out_dir` is replaced.
    """
    out_dir = Path(out_dir)
    model_type = gguf_model.config["model_type"]
    sink = _WeightSink(bits, group_size, dtype=dtype or default_dtype(model_type), refine=refine)
    modules: dict[str, dict[str, mx.array]] = {}
    for name, value in gguf_model.weights.items():
        module, suffix = name.rsplit(".", 1)
        modules.setdefault(module, {})[suffix] = value
    _check_cancel(should_cancel)
    for done, (module, parts) in enumerate(modules.items(), 1):
        sink.add(module, parts, gguf_model.source_types.get(module, "unknown"))
        if progress is not None:
            progress("quantize", done, len(modules))
        _check_cancel(should_cancel)
    config = {k: v for k, v in gguf_model.config.items() if k != "quantization"}
    quantization = sink.quantization()
    if quantization is not None:
        config["quantization"] = quantization
    converted = GGUFModel(
        architecture=gguf_model.architecture,
        config=config,
        weights=sink.weights,
        tokenizer=gguf_model.tokenizer,
        chat_template=gguf_model.chat_template,
        source_types=sink.source_types,
    )
    _write_model_dir(
        converted, out_dir, overwrite=True, progress=progress, should_cancel=should_cancel
    )
    return out_dir


def import_gguf(
    path: Path,
    out_dir: Path,
    *,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    refine: bool = True,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import a GGUF file as an mlx-lm model directory at `out_dir`.

    Reads the file a tensor at a time, so memory holds the converted model plus one tensor
    in float32, never the whole model dequantized. Q4_0 / Q4_1 / Q8_0 are kept exactly;
    K-quants and the other types are dequantized, then re-quantized to `bits` in
    {2, 3, 4, 5, 6, 8} with `group_size` in {32, 64, 128} when `bits` is given, else stored as
    floats. Scales, biases and float matrices are `dtype` ("float16" or "float32"; by default
    `default_dtype`: float32 for Gemma). Re-quantization fits each group's scale and bias to its
    values (`affine_quantize`); `refine=False` takes `mx.quantize`'s min/max fit as it is
    (faster, less accurate). The tokenizer and chat template come from the file's metadata.

    `progress(step, done, total)` reports "tensors" (one per tensor read) then "save";
    `should_cancel()` is checked between tensors (raises `ConversionCancelled`). Bad files raise
    a `GGUFError` subclass naming the file and the problem; nothing is left at `out_dir` or in a
    staging directory after an error or a cancel. An existing `out_dir` is an error unless
    `overwrite`.
    """
    started = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    _WeightSink(bits, group_size, dtype=dtype)  # bad arguments fail before any work

    def make_sink(model_type: str) -> _WeightSink:
        dtype_here = dtype or default_dtype(model_type)
        return _WeightSink(bits, group_size, dtype=dtype_here, refine=refine)

    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")
    gguf_model, sink = _read(path, make_sink, progress=progress, should_cancel=should_cancel)
    summary = sink.summary()
    provenance = {
        "source": path.name,
        "source_size_bytes": path.stat().st_size,
        "architecture": gguf_model.architecture,
        "quantization": summary,
        "dtype": sink.dtype,
        "source_types": dict(Counter(sink.source_types.values())),
    }
    parameters = _write_model_dir(
        gguf_model,
        out_dir,
        overwrite=overwrite,
        progress=progress,
        should_cancel=should_cancel,
        provenance=provenance,
    )
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    result = ImportResult(
        out_dir=out_dir,
        source=path,
        architecture=gguf_model.architecture,
        model_type=gguf_model.config["model_type"],
        parameters=parameters,
        quantization=summary,
        size_bytes=size,
        source_size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "imported %s (%s, %d parameters) into %s in %.1fs",
        path.name,
        result.architecture,
        parameters,
        out_dir,
        result.seconds,
    )
    return result
