"""GGUF tensors as MLX arrays: read one at a time, kept in MLX's layout where it has one.

Q4_0 / Q4_1 / Q8_0 blocks (group size 32) are repacked into MLX's affine layout bit for bit, as
`mx.load` does; every other type is dequantized with the `gguf` package. mlx is imported inside
the functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.weights.gguf.reader import (
    GGUFError,
    GGUFHeader,
    TensorInfo,
    UnsupportedTensorType,
    quant_sizes,
    type_name,
)

if TYPE_CHECKING:
    import mlx.core as mx

# GGUF block types whose bytes `mx.load` turns into MLX's affine layout (group size 32).
QUANT_GROUP_SIZE = 32
# GGML type ids (gguf.GGMLQuantizationType): F32, F16, Q4_0, Q4_1, Q8_0.
F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16 = 0, 1, 2, 3, 8, 30
MLX_NATIVE_TYPES = frozenset({F32, _F16, _Q4_0, _Q4_1, _Q8_0})
MLX_QUANT_TYPES = frozenset({_Q4_0, _Q4_1, _Q8_0})


@functools.cache
def _can_dequantize(type_id: int) -> bool:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    sizes = quant_sizes(type_id)
    if sizes is None:
        return False
    try:
        dequantize(np.zeros((1, sizes[2]), dtype=np.uint8), GGMLQuantizationType(type_id))
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def check_tensor_types(path: Path, header: GGUFHeader) -> None:
    for t in header.tensors:
        if t.type_id not in MLX_NATIVE_TYPES and not _can_dequantize(t.type_id):
            raise UnsupportedTensorType(path, t.name, type_name(t.type_id))


def iter_raw_tensors(
    path: Path, header: GGUFHeader, *, dequantize_all: bool = False
) -> Iterator[tuple[TensorInfo, dict[str, mx.array]]]:
    """Each tensor of the file under its GGUF name, one at a time.

    Quantized Q4_0 / Q4_1 / Q8_0 tensors come as `{base}.weight/.scales/.biases` in MLX's affine
    layout; every other type is dequantized (float16, bfloat16 for BF16 sources, F32 stays
    float32). With `dequantize_all`, every tensor is float32, Q4_0 / Q4_1 / Q8_0 included.
    """
    import mlx.core as mx

    check_tensor_types(path, header)
    if not dequantize_all and all(t.type_id in MLX_NATIVE_TYPES for t in header.tensors):
        # The fast path: mx.load reads the whole file in one go (0.2 s for SmolLM2).
        try:
            loaded = mx.load(str(path), format="gguf")
        except RuntimeError as e:
            raise GGUFError(f"{path.name}: {e}") from e
        assert isinstance(loaded, dict)
        for t in header.tensors:
            if t.type_id in MLX_QUANT_TYPES:
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
    if t.type_id == F32:
        return {t.name: mx.array(raw.view("<f4").reshape(t.shape))}
    if t.type_id == _F16:
        values = mx.array(raw.view("<f2").reshape(t.shape))
        return {t.name: values.astype(mx.float32) if dequantize_all else values}
    if t.type_id in MLX_QUANT_TYPES and not dequantize_all:
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


def load_tensors(path: Path, header: GGUFHeader) -> dict[str, mx.array]:
    """The file's tensors under their GGUF names, quantized ones as weight/scales/biases."""
    out: dict[str, mx.array] = {}
    for _, arrays in iter_raw_tensors(path, header):
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


def unpermute_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head reordering of Q/K rows ((2, d/2) was stored as (d/2, 2))."""
    rows = x.shape[0]
    rest = tuple(x.shape[1:])
    return x.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
