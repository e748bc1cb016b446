"""The GGUF reader against hostile files: deep nesting, impossible counts, truncation, fuzzing.

A file the reader cannot read must raise its GGUFError with a clear message, whatever the bytes:
never RecursionError, MemoryError or an IndexError, and never work out of proportion to the
file's size. The property tests run `MLXWEB_FUZZ_EXAMPLES` examples each (300 by default, a
few seconds); a long run, from the repository root:

    MLXWEB_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest \
        tests/inference/weights/test_gguf_reader.py
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.weights.gguf import GGUFError, read_header, read_summary
from inference.weights.gguf.reader import (
    GGUF_MAGIC,
    MAX_NESTING_DEPTH,
    parse_header,
    parse_summary,
)
from inference.weights.inspect import inspect_gguf

FUZZ_EXAMPLES = int(os.environ.get("MLXWEB_FUZZ_EXAMPLES", "300"))
_ARRAY, _UINT32, _STRING = 9, 4, 8


def _head(*, tensors: int = 0, kvs: int = 1) -> bytes:
    return GGUF_MAGIC + struct.pack("<IQQ", 3, tensors, kvs)


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def nested_arrays(depth: int) -> bytes:
    """A GGUF whose one metadata value is an array of an array of ... `depth` deep."""
    body = _key("evil") + struct.pack("<I", _ARRAY)
    body += struct.pack("<IQ", _ARRAY, 1) * (depth - 1) + struct.pack("<IQ", _UINT32, 0)
    return _head() + body


def _write(tmp_path: Path, data: bytes, name: str = "hostile.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_it_refuses_arrays_nested_a_thousand_deep_without_recursing(tmp_path: Path) -> None:
    data = nested_arrays(1000)
    assert len(data) < 13_000
    path = _write(tmp_path, data)

    with pytest.raises(GGUFError, match=f"nests arrays more than {MAX_NESTING_DEPTH} deep"):
        read_header(path)
    with pytest.raises(GGUFError, match="nests arrays"):
        read_summary(path)


def test_it_reads_arrays_nested_within_the_limit(tmp_path: Path) -> None:
    path = _write(tmp_path, nested_arrays(MAX_NESTING_DEPTH))

    value = read_header(path).metadata["evil"]
    for _ in range(MAX_NESTING_DEPTH - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert isinstance(value, np.ndarray) and value.size == 0
    assert read_summary(path).metadata["evil"] is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_head(kvs=2**62), "the metadata claims 4611686018427387904 items"),
        (_head(tensors=2**40, kvs=0), "the tensor table claims 1099511627776 items"),
        (
            _head() + _key("tokens") + struct.pack("<IIQ", _ARRAY, _STRING, 2**60),
            "metadata 'tokens' claims 1152921504606846976 items",
        ),
        (
            _head() + _key("scores") + struct.pack("<IIQ", _ARRAY, 6, 2**61),
            "metadata 'scores' claims",
        ),
    ],
)
def test_it_refuses_counts_the_file_cannot_hold(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path, data + bytes(64))
    with pytest.raises(GGUFError, match=message):
        read_header(path)
    with pytest.raises(GGUFError, match=message):
        read_summary(path)


def test_it_refuses_a_string_longer_than_the_file(tmp_path: Path) -> None:
    data = _head() + struct.pack("<Q", 2**63) + b"key" + bytes(16)
    with pytest.raises(GGUFError, match="truncated GGUF file: metadata key #0"):
        read_header(_write(tmp_path, data))


def test_it_refuses_an_alignment_that_is_not_a_power_of_two(tmp_path: Path) -> None:
    data = _head() + _key("general.alignment") + struct.pack("<II", _UINT32, 0)
    with pytest.raises(GGUFError, match="general.alignment 0 is not a power of two"):
        read_header(_write(tmp_path, data))


def _valid_gguf(path: Path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.context_length", 2048)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    writer.add_tensor("token_embd.weight", np.ones((3, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((32,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _valid_gguf(tmp_path_factory.mktemp("gguf") / "valid.gguf")


def test_it_reads_every_truncation_of_a_valid_file_as_a_clean_error(valid_gguf: bytes) -> None:
    header = parse_header(valid_gguf, Path("valid.gguf"))
    assert [t.name for t in header.tensors] == ["token_embd.weight", "output_norm.weight"]
    summary = parse_summary(valid_gguf, Path("valid.gguf"))
    assert summary.tensor_types == {"F32": 3 * 32 + 32}
    assert summary.metadata["general.architecture"] == "llama"
    assert summary.metadata["general.name"] is True  # present, not kept

    for end in range(len(valid_gguf)):
        with pytest.raises(GGUFError):
            parse_header(valid_gguf[:end], Path("cut.gguf"))


def test_the_models_page_inspector_shows_a_hostile_file_as_unreadable(tmp_path: Path) -> None:
    details = inspect_gguf(_write(tmp_path, nested_arrays(1000)))
    assert details["loadable"] is False
    assert details["load_problem"].startswith("unreadable GGUF: hostile.gguf: metadata 'evil'")


def _reads_cleanly(data: bytes) -> None:
    for parse in (parse_header, parse_summary):
        with contextlib.suppress(GGUFError):
            parse(data, Path("fuzz.gguf"))


_FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=1000,  # ms: work bounded by the input's size, never by what its counts claim
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@_FUZZ
@given(body=st.binary(max_size=4096))
def test_any_bytes_after_the_magic_read_cleanly(body: bytes) -> None:
    _reads_cleanly(GGUF_MAGIC + body)
    _reads_cleanly(GGUF_MAGIC + struct.pack("<I", 3) + body)


@_FUZZ
@given(data=st.data())
def test_a_mutated_valid_file_reads_cleanly(valid_gguf: bytes, data: st.DataObject) -> None:
    mutated = bytearray(valid_gguf)
    edits = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(mutated) - 1), st.integers(0, 255)), min_size=1, max_size=8
        )
    )
    for position, byte in edits:
        mutated[position] = byte
    end = data.draw(st.integers(0, len(mutated)))
    _reads_cleanly(bytes(mutated[:end]))
