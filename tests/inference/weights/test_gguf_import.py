"""Importing a GGUF file as an mlx-lm directory: kept blocks, re-quantization, progress, cancel,
bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import quantize

from inference.weights.convert import (
    PROVENANCE_FILE,
    build_model,
    import_gguf,
    read_gguf,
)
from inference.weights.gguf import (
    GGUFError,
    NotGGUFFile,
    TruncatedGGUF,
    UnsupportedArchitecture,
    UnsupportedTensorType,
)
from inference.weights.progress import ConversionCancelled
from inference.weights.quantize import affine_quantize, quantization_importance
from tests.inference.weights.test_gguf import PARIS_PROMPT, _tokenizer_metadata, _write_gguf
from tests.support.gguf_imports import SessionImport
from tests.support.progress import RecordingProgress

QType = gguf.GGMLQuantizationType


def _greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- the real model


# SmolLM2's import is the session's (tests/conftest.py): the `import_gguf` job's, whose call
# of `import_gguf` is what these tests look at.


def test_it_imports_smollm2_to_a_directory_that_answers_like_the_in_memory_model(
    smollm2_import: SessionImport, smollm2_built: tuple[Any, Any]
) -> None:
    from mlx_lm import load

    result = smollm2_import.result
    loaded_model, loaded_tokenizer = cast(tuple[Any, Any], load(str(result.out_dir)))
    model, tokenizer = smollm2_built

    prompt = tokenizer.apply_chat_template(PARIS_PROMPT, add_generation_prompt=True)
    assert loaded_tokenizer.apply_chat_template(PARIS_PROMPT, add_generation_prompt=True) == prompt
    assert loaded_tokenizer.eos_token_ids == tokenizer.eos_token_ids
    tokens = _greedy(loaded_model, prompt, 12)
    assert tokens == _greedy(model, prompt, 12)
    reply = loaded_tokenizer.decode([t for t in tokens if t not in loaded_tokenizer.eos_token_ids])
    assert "Paris" in reply


def test_it_keeps_q4_1_and_q8_0_blocks_and_reports_what_it_did(
    smollm2_import: SessionImport, smollm2_gguf: Path
) -> None:
    result = smollm2_import.result
    assert result.architecture == "llama" and result.model_type == "llama"
    assert result.quantization["kept"] == {"Q4_1": 210, "Q8_0": 1}
    assert result.quantization["requantized"]["tensors"] == 0
    assert result.quantization["float"] == 0
    assert 134_000_000 < result.parameters < 135_000_000
    assert result.source_size_bytes == smollm2_gguf.stat().st_size
    assert result.size_bytes > 90_000_000 and result.seconds > 0
    json.dumps(result.to_dict())  # a job stores it as its result

    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["quantization"]["model.layers.0.mlp.up_proj"] == {"group_size": 32, "bits": 4}
    provenance = json.loads((result.out_dir / PROVENANCE_FILE).read_text())
    assert provenance["source"] == smollm2_gguf.name
    assert provenance["quantization"] == result.quantization

    # Bit for bit the blocks of the file, as mx.load reads them.
    from safetensors.numpy import load_file

    saved = load_file(str(result.out_dir / "model.safetensors"))
    raw = mx.load(str(smollm2_gguf))
    assert isinstance(raw, dict)
    assert np.array_equal(
        saved["model.layers.3.mlp.down_proj.weight"], raw["blk.3.ffn_down.weight"]
    )
    assert np.array_equal(saved["model.embed_tokens.scales"], raw["token_embd.scales"])


def test_it_reports_progress_tensor_by_tensor_then_the_save(
    smollm2_import: SessionImport,
) -> None:
    steps = smollm2_import.steps
    tensors = [(done, total) for step, done, total in steps if step == "tensors"]
    assert tensors[0] == (0, 272) and tensors[-1] == (272, 272)
    assert [done for done, _ in tensors] == list(range(273))
    assert steps[-2:] == [("save", 0, 1), ("save", 1, 1)]


def test_it_refuses_an_existing_directory_unless_told_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_gguf(Path("/nonexistent.gguf"), target)
    assert (target / "keep.txt").read_text() == "mine"


def test_it_cancels_mid_import_and_leaves_nothing_behind(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    steps: list[tuple[str, int, int]] = []
    progress = RecordingProgress(steps, cancel_after=41)

    with pytest.raises(ConversionCancelled):
        import_gguf(smollm2_gguf, tmp_path / "smollm2", progress=progress)
    seen = [done for _, done, _ in steps]
    assert max(seen) == 40  # checked after every tensor
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- re-quantization


def _small_llama_gguf(path: Path, smollm2_gguf: Path, types: dict[str, Any]) -> Path:
    """A two-layer llama with random weights; `types` maps GGUF part names to tensor types."""
    rng = np.random.default_rng(3)
    hidden, ffn, vocab = 64, 128, 49152
    tensors: dict[str, tuple[np.ndarray, Any]] = {}

    def add(name: str, shape: tuple[int, ...], qtype: Any) -> None:
        array = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype in (QType.Q8_0, QType.Q4_1, QType.Q5_0, QType.BF16):
            tensors[name] = (quantize(array, qtype), qtype)
        elif qtype == QType.F16:
            tensors[name] = (array.astype(np.float16), None)
        else:
            tensors[name] = (array, None)

    add("token_embd.weight", (vocab, hidden), types.get("token_embd", QType.F16))
    add("output_norm.weight", (hidden,), None)
    for layer in range(2):
        for part, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (32, hidden)),
            ("attn_v", (32, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            add(f"blk.{layer}.{part}.weight", shape, types.get(part, QType.F16))
        add(f"blk.{layer}.attn_norm.weight", (hidden,), None)
        add(f"blk.{layer}.ffn_norm.weight", (hidden,), None)
    return _write_gguf(
        path,
        "llama",
        tensors,
        **{
            "llama.embedding_length": hidden,
            "llama.block_count": 2,
            "llama.feed_forward_length": ffn,
            "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.context_length": 1024,
        },
        **_tokenizer_metadata(smollm2_gguf),
    )


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32), (3, 32), (5, 64), (6, 64)])
def test_it_requantizes_dequantized_tensors_and_keeps_native_blocks(
    bits: int, group_size: int, smollm2_gguf: Path, tmp_path: Path
) -> None:
    from mlx_lm import load

    path = _small_llama_gguf(
        tmp_path / "mixed.gguf",
        smollm2_gguf,
        {"attn_q": QType.Q5_0, "attn_v": QType.Q8_0, "ffn_down": QType.Q4_1, "ffn_up": QType.BF16},
    )
    result = import_gguf(path, tmp_path / "out", bits=bits, group_size=group_size)
    summary = result.quantization
    assert summary["kept"] == {"Q4_1": 2, "Q8_0": 2}
    assert summary["requantized"] == {
        "bits": bits,
        "group_size": group_size,
        "tensors": 11,
        "from": {"BF16": 2, "F16": 7, "Q5_0": 2},
    }
    assert summary["float"] == 0 and summary["dtype"] == "float16"

    config = json.loads((result.out_dir / "config.json").read_text())["quantization"]
    assert config["bits"] == bits and config["group_size"] == group_size
    assert config["model.layers.0.self_attn.v_proj"] == {"group_size": 32, "bits": 8}
    assert config["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    assert config["model.layers.1.self_attn.q_proj"] == {"group_size": group_size, "bits": bits}
    assert config["model.embed_tokens"] == {"group_size": group_size, "bits": bits}

    model, _ = cast(tuple[Any, Any], load(str(result.out_dir)))
    reference, _ = build_model(read_gguf(path, dequantize=True))
    tokens = mx.array([[1, 4093, 198, 504, 3575, 282, 4649, 314]])
    ours, theirs = model(tokens).astype(mx.float32), reference(tokens)
    # The error shrinks with the bits; even 3 bits keeps the logits close on this model.
    error = float(cast(float, (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()))
    assert error < {3: 0.3, 4: 0.2, 5: 0.1, 6: 0.05, 8: 0.02}[bits]


def test_it_stores_dequantized_tensors_as_float16_without_bits(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    from mlx_lm import load

    path = _small_llama_gguf(tmp_path / "mixed.gguf", smollm2_gguf, {"attn_q": QType.Q5_0})
    result = import_gguf(path, tmp_path / "out")
    assert result.quantization["float"] == 15
    assert result.quantization["float_from"] == {"F16": 13, "Q5_0": 2}
    assert result.quantization["requantized"]["tensors"] == 0
    assert "quantization" not in json.loads((result.out_dir / "config.json").read_text())

    model, _ = cast(tuple[Any, Any], load(str(result.out_dir)))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    reference, _ = build_model(read_gguf(path, dequantize=True))
    tokens = mx.array([[1, 4093, 198, 504]])
    assert mx.allclose(model(tokens).astype(mx.float32), reference(tokens), atol=1e-2).item()


def test_it_leaves_matrices_whose_rows_do_not_split_into_groups_as_floats(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    path = _small_llama_gguf(tmp_path / "mixed.gguf", smollm2_gguf, {})
    result = import_gguf(path, tmp_path / "out", bits=4, group_size=128)
    # Only ffn_down has 128 input features; the rest (64) cannot make a group of 128.
    assert result.quantization["requantized"]["tensors"] == 2
    assert result.quantization["float"] == 13
    config = json.loads((result.out_dir / "config.json").read_text())["quantization"]
    assert config["model.layers.0.mlp.down_proj"] == {"group_size": 128, "bits": 4}
    assert "model.layers.0.mlp.up_proj" not in config


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_quantize_fits_better_than_mx_quantize_in_mlx_layout(bits: int) -> None:
    mx.random.seed(bits)
    w = mx.random.normal((96, 256)) * mx.random.uniform(shape=(96, 1))
    w[7] = 0.25  # a constant row: scale 0, exact
    packed, scales, biases = affine_quantize(w, bits=bits, group_size=64)
    plain = mx.quantize(w, group_size=64, bits=bits)
    assert packed.shape == plain[0].shape and packed.dtype == mx.uint32
    ours = mx.dequantize(packed, scales, biases, group_size=64, bits=bits)
    theirs = mx.dequantize(*plain, group_size=64, bits=bits)
    importance = quantization_importance(w.reshape(96, -1, 64))

    def group_errors(x: mx.array) -> mx.array:
        return (importance * ((x - w) ** 2).reshape(96, -1, 64)).sum(axis=-1)

    # Never worse than mx.quantize for any group, clearly better overall, in the weighted error
    # it minimizes; and the packing is MLX's (mx.dequantize reads it back).
    assert (group_errors(ours) <= group_errors(theirs) * (1 + 1e-5) + 1e-12).all().item()
    assert (group_errors(ours).sum() < 0.97 * group_errors(theirs).sum()).item()
    assert mx.array_equal(ours[7], w[7]).item()
    unrefined = affine_quantize(w, bits=bits, group_size=64, refine_steps=0)
    assert all(mx.array_equal(a, b).item() for a, b in zip(unrefined, plain, strict=True))


def test_affine_quantize_splits_big_matrices_into_row_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inference.weights.quantize

    mx.random.seed(0)
    w = mx.random.normal((100, 128))
    whole = affine_quantize(w, bits=4, group_size=32)
    # 4 chunks, the last short.
    monkeypatch.setattr(inference.weights.quantize, "_CHUNK_ELEMENTS", 30 * 128)
    chunked = affine_quantize(w, bits=4, group_size=32)
    assert all(mx.array_equal(a, b).item() for a, b in zip(whole, chunked, strict=True))


def test_it_rejects_bad_quantization_arguments(smollm2_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        import_gguf(smollm2_gguf, tmp_path / "x", bits=7)
    with pytest.raises(ValueError, match="group_size must be one of"):
        import_gguf(smollm2_gguf, tmp_path / "x", bits=4, group_size=48)
    with pytest.raises(ValueError, match="dtype must be one of"):
        import_gguf(smollm2_gguf, tmp_path / "x", dtype="bfloat16")
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- bad files


def test_it_names_the_file_when_the_magic_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "photo.gguf"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(NotGGUFFile, match=r"photo\.gguf: not a GGUF file"):
        import_gguf(path, tmp_path / "out")
    assert _leftovers(tmp_path) == ["photo.gguf"]


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_it_names_the_file_when_it_is_truncated(
    keep: float, smollm2_gguf: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cut.gguf"
    data = smollm2_gguf.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TruncatedGGUF, match=r"cut\.gguf: truncated GGUF file: tensor '"):
        import_gguf(path, tmp_path / "out")
    assert _leftovers(tmp_path) == ["cut.gguf"]


def test_it_names_a_tensor_type_it_cannot_read(tmp_path: Path) -> None:
    # Q8_K is a real GGML type (llama.cpp's activation format) that nothing can dequantize.
    odd = _write_gguf(
        tmp_path / "q8k.gguf",
        "llama",
        {"x.weight": (np.zeros((2, 292), dtype=np.uint8), QType.Q8_K)},
    )
    with pytest.raises(UnsupportedTensorType, match=r"q8k\.gguf: tensor 'x.weight' has type Q8_K"):
        import_gguf(odd, tmp_path / "out")
    with pytest.raises(UnsupportedTensorType) as error:
        read_gguf(odd)
    assert error.value.type_name == "Q8_K" and isinstance(error.value, GGUFError)
    assert _leftovers(tmp_path) == ["q8k.gguf"]


@pytest.mark.parametrize("arch", ["mamba", "phi3", "gemma2"])
def test_it_names_an_unsupported_architecture(arch: str, tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / f"{arch}.gguf", arch, {"x.weight": (np.ones(4, np.float32), None)}
    )
    with pytest.raises(UnsupportedArchitecture, match=f"'{arch}' is not supported") as error:
        import_gguf(path, tmp_path / "out")
    assert error.value.architecture == arch
    assert f"{arch}.gguf" in str(error.value) and "gemma3" in str(error.value)
    assert _leftovers(tmp_path) == [f"{arch}.gguf"]
