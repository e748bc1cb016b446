"""inference.weights.export: a model folder to GGUF, read back by our own importer.

The peer test (llama.cpp loads the files and agrees with MLX) is test_export_llama_cpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.testing import build_tiny_model
from inference.weights.convert import build_model, read_gguf
from inference.weights.export import GGUFExportError, export_gguf, permute_rows
from inference.weights.gguf.reader import read_header
from inference.weights.gguf.tensors import unpermute_rows
from inference.weights.progress import ConversionCancelled
from tests.support.hf_model import SENTENCES, tiny_hf_model_files
from tests.support.progress import RecordingProgress


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Hugging Face-format llama (float16 safetensors, byte-level BPE)."""
    path = tmp_path_factory.mktemp("export") / "tiny-hf"
    path.mkdir()
    for name, data in tiny_hf_model_files().items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The tiny mlx-lm llama, MLX-quantized to 4 bits (group size 32), SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp("export") / "tiny-4bit"
    return build_tiny_model(folder, smollm2_gguf, quantize_bits=4)


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids])).astype(mx.float32)[0])


def _source(path: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    loaded = load(str(path))
    return loaded[0], loaded[1]


def test_it_round_trips_a_float_model_through_our_importer(tiny_hf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tiny-F16.gguf"

    result = export_gguf(tiny_hf, dest, file_type="f16")

    assert result.architecture == "llama"
    assert result.tensor_types == {"F16": 16, "F32": 5}
    assert dest.stat().st_size == result.size_bytes
    source, tokenizer = _source(tiny_hf)
    model, exported_tokenizer = build_model(read_gguf(dest, dequantize=True))
    for text in SENTENCES:
        assert exported_tokenizer.encode(text) == tokenizer.encode(text)
    ids = tokenizer.encode(SENTENCES[0])
    # Float16 weights stay float16: only the order of the float32 sums differs.
    np.testing.assert_allclose(_logits(model, ids), _logits(source, ids), atol=5e-3)


def test_it_round_trips_an_mlx_quantized_model_within_q8_0_s_rounding(
    tiny_4bit: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "tiny-Q8_0.gguf"

    result = export_gguf(tiny_4bit, dest, file_type="q8_0")

    assert result.tensor_types == {"F32": 5, "Q8_0": 16}
    source, tokenizer = _source(tiny_4bit)
    model, _ = build_model(read_gguf(dest, dequantize=True))
    ids = tokenizer.encode("The capital of France is Paris.")
    ours, theirs = _logits(model, ids), _logits(source, ids)
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0


def test_q4_0_keeps_the_embeddings_and_output_at_q8_0(tiny_hf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tiny-Q4_0.gguf"

    export_gguf(tiny_hf, dest, file_type="q4_0")

    types = {t.name: t.type_id for t in read_header(dest).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == 8  # Q8_0
    assert types["blk.0.attn_q.weight"] == 2  # Q4_0
    assert types["blk.0.attn_norm.weight"] == 0  # F32


def test_it_writes_the_hyperparameters_and_the_tokenizer(tiny_hf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tiny.gguf"
    export_gguf(tiny_hf, dest, file_type="f16")

    metadata = read_header(dest).metadata

    config = json.loads((tiny_hf / "config.json").read_text())
    tokenizer = json.loads((tiny_hf / "tokenizer.json").read_text())
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == config["num_hidden_layers"]
    assert metadata["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert metadata["llama.rope.dimension_count"] == 32
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert len(metadata["tokenizer.ggml.tokens"]) == config["vocab_size"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    assert list(metadata["tokenizer.ggml.merges"]) == merges
    # The five special tokens are control tokens, the rest normal.
    assert list(metadata["tokenizer.ggml.token_type"][:6]) == [3, 3, 3, 3, 3, 1]
    assert metadata["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    assert metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_q_and_k_rows_are_permuted_as_llama_cpp_s_converter_does() -> None:
    rows = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)

    permuted = permute_rows(rows, 4)

    # Per head, the first half of the rows (the rotation's x) and the second (its y) interleave.
    assert list(permuted[:4, 0]) == [0.0, 12.0, 3.0, 15.0]
    import mlx.core as mx

    assert np.array_equal(np.array(unpermute_rows(mx.array(permuted), 4)), rows)


def test_a_cancel_leaves_nothing_behind(tiny_hf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "tiny.gguf"
    work = tmp_path / ".staging-job"
    steps: list[tuple[str, int, int]] = []

    with pytest.raises(ConversionCancelled):
        progress = RecordingProgress(steps, cancel_after=5)
        export_gguf(tiny_hf, dest, progress=progress, work_path=work)

    assert [s[0] for s in steps[:2]] == ["loading tiny-hf", "writing tiny.gguf"]
    assert list(tmp_path.iterdir()) == []


def test_it_reports_the_bytes_it_writes(tiny_hf: Path, tmp_path: Path) -> None:
    steps: list[tuple[str, int, int]] = []

    result = export_gguf(tiny_hf, tmp_path / "t.gguf", progress=RecordingProgress(steps))

    writing = [s for s in steps if s[0] == "writing t.gguf"]
    assert writing[-1][1] == writing[-1][2] > 0
    assert len(writing) == result.tensors + 1
    assert writing[-1][2] <= result.size_bytes


def test_it_refuses_an_existing_file_and_a_folder_without_a_model(
    tiny_hf: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"x")

    with pytest.raises(FileExistsError):
        export_gguf(tiny_hf, taken)
    with pytest.raises(GGUFExportError, match="no config.json"):
        export_gguf(tmp_path, tmp_path / "out.gguf")
    assert taken.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_it_refuses_a_model_type_it_does_not_know(tiny_hf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_hf.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "smollm3"}))

    with pytest.raises(GGUFExportError, match="smollm3"):
        export_gguf(other, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
