"""The GGUF reader: a file's header (metadata and tensor table), in full or as a summary.

A GGUF file starts with its magic bytes, a version, a tensor count and a metadata count, then
the metadata (typed key/value pairs; arrays may hold arrays) and the tensor table (name, shape,
type, offset); the tensor data follows, aligned. The full mode (`read_header`) reads everything
the converter needs and checks that each tensor's bytes are in the file; the summary mode
(`read_summary`) is what the Models page reads on a page view: strings only for a few keys,
arrays skipped, elements counted per tensor type.

The file may come from anyone (an upload, a folder the library scans), so the reader trusts
none of its counts: every length is checked against the bytes left before anything is
allocated, arrays nest at most `MAX_NESTING_DEPTH` deep and are walked with an explicit stack
(no recursion), and whatever is wrong raises a `GGUFError` naming the file and the place. The
work is bounded by the file's size.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
# GGUF v1 used 32-bit lengths; every converter since 2023 writes v2 or v3.
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Arrays of arrays are allowed by the format; llama.cpp writes none (its arrays hold numbers or
# strings). A few levels leave room for hand-made files without letting a file nest 1,000 deep.
MAX_NESTING_DEPTH = 8
# GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions.
MAX_TENSOR_DIMS = 4
# Metadata keys whose strings the summary keeps; the others are only marked present.
SUMMARY_STRING_KEYS = ("general.architecture", ".context_length")

_STRING, _ARRAY = 8, 9
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
# The fewest bytes one value of each type takes: a string is at least its 8-byte length, an
# array its 4-byte item type and 8-byte count. Counts are checked against these.
_MIN_BYTES = {t: s.size for t, s in _SCALARS.items()} | {_STRING: 8, _ARRAY: 12}
# A metadata pair is at least a key (8), a type (4) and a one-byte value; a tensor entry a
# name (8), a dimension count (4), a type (4) and an offset (8).
_MIN_KV_BYTES = 13
_MIN_TENSOR_BYTES = 24
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """The file is not a GGUF model this package can read; the message says why."""


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


@dataclass(frozen=True)
class GGUFSummary:
    """What a listing shows of a GGUF file: its metadata (strings kept only for
    `SUMMARY_STRING_KEYS`, others `True`; arrays `None`) and its element count per tensor type."""

    version: int
    metadata: dict[str, Any]
    tensor_types: dict[str, int]


@functools.cache
def quant_sizes(type_id: int) -> tuple[str, int, int] | None:
    """(type name, block size in elements, block size in bytes) of a GGML type, or None."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    block, type_size = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, type_size


def type_name(type_id: int) -> str:
    """The GGML name of a tensor type ("Q4_K"), or its id as text when unknown."""
    sizes = quant_sizes(type_id)
    return sizes[0] if sizes else str(type_id)


class _Frame:
    """An array being read: its item type, how many items are left, what was read so far."""

    __slots__ = ("item_type", "remaining", "items")

    def __init__(self, item_type: int, remaining: int, items: list[Any] | None) -> None:
        self.item_type = item_type
        self.remaining = remaining
        self.items = items


_OPENED = object()  # `_open_array` pushed a frame instead of returning a value


class _Cursor:
    """Reads little-endian GGUF values from a buffer, checking every length against its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    @property
    def left(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise TruncatedGGUF(
                f"{self.path.name}: truncated GGUF file: {what} extends past the end of the file "
                f"({self.size} bytes); is the download incomplete?"
            )

    def check_count(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a count of items that the bytes left in the file could not hold."""
        if count * item_bytes > self.left:
            # A count too large for any file, or a file cut short: the same words for both.
            raise TruncatedGGUF(
                f"{self.path.name}: truncated GGUF file: {what} claims {count} items, more than "
                f"the {self.left} bytes left in the file can hold; is the download incomplete?"
            )

    def scalar(self, type_id: int, what: str) -> Any:
        fmt = _SCALARS[type_id]
        self._need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))

    def string(self, what: str, *, keep: bool = True) -> str | None:
        n = self.u64(what)
        self._need(n, what)
        start = self.pos
        self.pos += n
        if not keep:
            return None
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def value(self, type_id: int, what: str, *, keep: bool = True) -> Any:
        """One metadata value. Without `keep`, strings come back as True (present) and arrays
        as None, read only far enough to be skipped and checked."""
        if type_id != _ARRAY:
            return self._leaf(type_id, what, keep)
        stack: list[_Frame] = []
        result = self._open_array(stack, what, keep)
        if result is not _OPENED:
            return result
        # Arrays of strings and arrays: a frame per open array, never a recursive call.
        while True:
            frame = stack[-1]
            if frame.item_type == _STRING:
                # A vocabulary is one array of tens of thousands of strings: a tight loop.
                strings = [self.string(what, keep=keep) for _ in range(frame.remaining)]
                if frame.items is not None:
                    frame.items.extend(strings)
                frame.remaining = 0
            while frame.remaining:
                frame.remaining -= 1
                item = self._open_array(stack, what, keep)
                if item is _OPENED:
                    break
                if frame.items is not None:
                    frame.items.append(item)
            else:
                stack.pop()
                if not stack:
                    return frame.items
                if stack[-1].items is not None:
                    stack[-1].items.append(frame.items)

    def _leaf(self, type_id: int, what: str, keep: bool) -> Any:
        if type_id == _STRING:
            text = self.string(what, keep=keep)
            return text if keep else True
        if type_id in _SCALARS:
            return self.scalar(type_id, what)
        raise GGUFError(f"{self.path.name}: {what} has an unknown value type {type_id}")

    def _open_array(self, stack: list[_Frame], what: str, keep: bool) -> Any:
        """Read an array's head: a numeric array whole (None when not kept), or push a frame
        for an array of strings or arrays and return `_OPENED`."""
        if len(stack) >= MAX_NESTING_DEPTH:
            raise GGUFError(
                f"{self.path.name}: {what} nests arrays more than {MAX_NESTING_DEPTH} deep"
            )
        item_type = self.u32(what)
        count = self.u64(what)
        if item_type not in _MIN_BYTES:
            raise GGUFError(f"{self.path.name}: {what} has an unknown value type {item_type}")
        self.check_count(count, _MIN_BYTES[item_type], what)
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            start = self.pos
            self.pos += count * dtype.itemsize
            if not keep:
                return None
            return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
        stack.append(_Frame(item_type, count, [] if keep else None))
        return _OPENED


def _check_file(path: Path) -> None:
    if not path.exists():
        raise NotGGUFFile(f"{path}: no such file")
    if not path.is_file():
        raise NotGGUFFile(f"{path}: not a file")


def _open(path: Path, parse: Any) -> Any:
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise NotGGUFFile(f"{path.name}: not a GGUF file (wrong magic bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse(buf, path)


def read_header(path: Path) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF file, checking that the data is all there.

    Much faster than `gguf.GGUFReader` (which builds a numpy view per string: seconds for a
    50k-token vocabulary). Raises a `GGUFError` naming the problem.
    """
    return _open(path, parse_header)  # type: ignore[no-any-return]


def read_summary(path: Path) -> GGUFSummary:
    """The summary of a GGUF file (see `GGUFSummary`), from its header alone. Raises a
    `GGUFError` naming the problem, or an OSError."""
    return _open(path, parse_summary)  # type: ignore[no-any-return]


def _start(cur: _Cursor) -> tuple[int, int, int]:
    """(version, tensor count, metadata count), the counts checked against the file's size."""
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise NotGGUFFile(f"{cur.path.name}: not a GGUF file (wrong magic bytes)")
    cur.pos = 4
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFError(f"{cur.path.name}: GGUF version {version} is not supported{hint}")
    tensor_count = cur.u64("the tensor count")
    kv_count = cur.u64("the metadata count")
    cur.check_count(kv_count, _MIN_KV_BYTES, "the metadata")
    cur.check_count(tensor_count, _MIN_TENSOR_BYTES, "the tensor table")
    return version, tensor_count, kv_count


def _metadata(cur: _Cursor, kv_count: int, *, summary: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        assert key is not None
        keep = not summary or key.endswith(SUMMARY_STRING_KEYS)
        what = f"metadata {key!r}"
        metadata[key] = cur.value(cur.u32(what), what, keep=keep)
    return metadata


def _tensor_entry(
    cur: _Cursor, i: int, *, keep_name: bool
) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(f"tensor name #{i}", keep=keep_name) or f"#{i}"
    what = f"tensor {name!r}"
    n_dims = cur.u32(what)
    if n_dims > MAX_TENSOR_DIMS:
        raise GGUFError(
            f"{cur.path.name}: {what} has {n_dims} dimensions (at most {MAX_TENSOR_DIMS})"
        )
    dims = [cur.u64(what) for _ in range(n_dims)]
    type_id = cur.u32(what)
    offset = cur.u64(what)
    return name, tuple(reversed(dims)), type_id, offset


def parse_header(buf: mmap.mmap | bytes, path: Path) -> GGUFHeader:
    """`read_header` of a GGUF file already in memory (`path` names it in messages)."""
    cur = _Cursor(buf, Path(path))
    version, tensor_count, kv_count = _start(cur)
    metadata = _metadata(cur, kv_count, summary=False)
    raw_tensors = [_tensor_entry(cur, i, keep_name=True) for i in range(tensor_count)]

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise GGUFError(f"{cur.path.name}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, type_id, offset in raw_tensors:
        sizes = quant_sizes(type_id)
        if sizes is None:
            raise UnsupportedTensorType(cur.path, name, str(type_id), unknown=True)
        type_name, block, type_size = sizes
        n = math.prod(shape)
        if n % block:
            raise GGUFError(
                f"{cur.path.name}: tensor {name!r} ({type_name}, shape {shape}) is not a whole "
                f"number of {block}-element blocks"
            )
        info = TensorInfo(name, shape, type_id, data_start + offset, n // block * type_size)
        if info.offset + info.nbytes > cur.size:
            raise TruncatedGGUF(
                f"{cur.path.name}: truncated GGUF file: tensor {name!r} extends past the end of "
                f"the file ({cur.size} bytes); is the download incomplete?"
            )
        tensors.append(info)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors)


def parse_summary(buf: mmap.mmap | bytes, path: Path) -> GGUFSummary:
    """`read_summary` of a GGUF file already in memory (`path` names it in messages)."""
    cur = _Cursor(buf, Path(path))
    version, tensor_count, kv_count = _start(cur)
    metadata = _metadata(cur, kv_count, summary=True)
    types: dict[str, int] = {}
    for i in range(tensor_count):
        _, shape, type_id, _ = _tensor_entry(cur, i, keep_name=False)
        sizes = quant_sizes(type_id)
        name = sizes[0] if sizes else f"type{type_id}"
        types[name] = types.get(name, 0) + math.prod(shape)
    return GGUFSummary(version=version, metadata=metadata, tensor_types=types)
