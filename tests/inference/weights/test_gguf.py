"""Reading GGUF files into MLX: metadata, weights, tokenizer, bad files, and real generation."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, cast

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from inference.weights.convert import GGUFModel, build_model, read_gguf
from inference.weights.gguf import GGUFError, UnsupportedArchitecture, read_header
from inference.weights.gguf.tensors import load_tensors, unpermute_rows
from inference.weights.gguf.tokenizer import build_tokenizer

QType = gguf.GGMLQuantizationType
PARIS_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


def _greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


def _write_gguf(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Any]], **kv: Any
) -> Path:
    """A GGUF file with the given tensors ((array, raw type or None)) and metadata."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, raw_type) in tensors.items():
        if raw_type is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------- the real model


def test_it_reads_the_hyperparameters_into_an_mlx_lm_config(smollm2_in_memory: GGUFModel) -> None:
    config = smollm2_in_memory.config
    assert smollm2_in_memory.architecture == "llama"
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["intermediate_size"] == 1536
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == [2]
    quantization = config["quantization"]
    assert quantization["group_size"] == 32 and quantization["bits"] == 4
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quantization["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}


def test_it_maps_every_tensor_to_an_mlx_lm_name(smollm2_in_memory: GGUFModel) -> None:
    weights = smollm2_in_memory.weights
    assert not [name for name in weights if not name.startswith("model.")]
    q = "model.layers.0.self_attn.q_proj"
    assert weights[f"{q}.weight"].dtype == mx.uint32
    assert weights[f"{q}.weight"].shape == (576, 576 * 4 // 32)
    assert weights[f"{q}.scales"].shape == (576, 576 // 32)
    assert weights[f"{q}.biases"].shape == (576, 576 // 32)
    assert weights["model.embed_tokens.weight"].shape == (49152, 576 * 8 // 32)
    assert weights["model.layers.29.post_attention_layernorm.weight"].dtype == mx.float32
    assert weights["model.norm.weight"].shape == (576,)


def test_it_builds_the_tokenizer_from_metadata(smollm2_in_memory: GGUFModel) -> None:
    tokenizer = smollm2_in_memory.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    text = "Héllo wörld: 你好 🎉, it's 12345!"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # SmolLM2 splits digits one by one.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    # Control tokens are single special tokens, never split into pieces.
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert smollm2_in_memory.chat_template and "<|im_start|>" in smollm2_in_memory.chat_template


def test_it_answers_greedily_in_memory(smollm2_built: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2_built
    prompt = tokenizer.apply_chat_template(PARIS_PROMPT, add_generation_prompt=True)
    tokens = _greedy(model, prompt, 16)
    eos = tokenizer.eos_token_ids
    reply = tokenizer.decode([t for t in tokens if t not in eos])
    assert "Paris" in reply


# --------------------------------------------------------------------------- synthetic models


def _tokenizer_metadata(smollm2_gguf: Path) -> dict[str, Any]:
    meta = read_header(smollm2_gguf).metadata
    return {
        "tokenizer.ggml.model": meta["tokenizer.ggml.model"],
        "tokenizer.ggml.pre": meta["tokenizer.ggml.pre"],
        "tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"],
        "tokenizer.ggml.token_type": [int(t) for t in meta["tokenizer.ggml.token_type"]],
        "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": meta["tokenizer.chat_template"],
    }


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q and K rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama_cpp_rope_factors(head_dim: int, base: float) -> np.ndarray:
    """The rope_freqs.weight tensor llama.cpp writes for Llama 3.1 (factor 8)."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * base ** (i / head_dim)
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize(
    ("arch", "rope_scaling"), [("llama", None), ("qwen2", None), ("llama", LLAMA3_ROPE)]
)
def test_it_converts_a_model_to_the_same_logits(
    arch: str, rope_scaling: dict[str, Any] | None, smollm2_gguf: Path, tmp_path: Path
) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "max_position_embeddings": 1024,
        "rope_theta": 500000.0 if rope_scaling else 10000.0,
        "tie_word_embeddings": arch == "qwen2",
    }
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    model_class, args_class = _get_classes(config)
    mx.random.seed(7)
    original = model_class(args_class.from_dict(config))
    mx.eval(original.parameters())

    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    parameters = cast(list[tuple[str, mx.array]], tree_flatten(original.parameters()))
    for name, value in parameters:
        array = np.array(value.astype(mx.float32))
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = (array, None)
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = (array, None)
        elif name == "lm_head.weight":
            tensors["output.weight"] = (array, None)
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            part = _TO_GGUF[module]
            if arch == "llama" and part in ("attn_q", "attn_k"):
                array = _llama_cpp_permute(array, 4 if part == "attn_q" else 2)
            tensors[f"blk.{layer}.{part}.{suffix}"] = (array, None)
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors
    if rope_scaling:
        tensors["rope_freqs.weight"] = (_llama_cpp_rope_factors(16, 500000.0), None)
    path = _write_gguf(
        tmp_path / f"{arch}.gguf",
        arch,
        tensors,
        **{
            f"{arch}.embedding_length": 64,
            f"{arch}.block_count": 2,
            f"{arch}.feed_forward_length": 96,
            f"{arch}.attention.head_count": 4,
            f"{arch}.attention.head_count_kv": 2,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{arch}.context_length": 1024,
            f"{arch}.rope.freq_base": float(config["rope_theta"]),
        },
        **_tokenizer_metadata(smollm2_gguf),
    )

    converted = read_gguf(path)
    assert converted.config["model_type"] == arch
    assert "quantization" not in converted.config
    assert converted.config.get("rope_scaling") == rope_scaling
    model, _ = build_model(converted)
    tokens = mx.array([[1, 4093, 198, 504, 3575, 282, 4649, 314]])
    assert mx.allclose(model(tokens), original(tokens), atol=1e-4).item()


def test_it_undoes_llama_cpp_q_k_permutation() -> None:
    rows = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    permuted = _llama_cpp_permute(rows, 6)
    assert not np.array_equal(permuted, rows)
    assert np.array_equal(np.array(unpermute_rows(mx.array(permuted), 6)), rows)


def test_it_keeps_q4_and_q8_blocks_quantized_when_other_types_need_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    native: dict[str, tuple[np.ndarray, Any]] = {}
    for name, qtype in (
        ("a.weight", QType.Q8_0),
        ("b.weight", QType.Q4_0),
        ("c.weight", QType.Q4_1),
    ):
        native[name] = (quantize(rng.standard_normal((8, 64)).astype(np.float32), qtype), qtype)
    native["n.weight"] = (rng.standard_normal(64).astype(np.float32), None)
    # Q4_K: mx.load would return it, but its Q4_K dequantization disagrees with llama.cpp's.
    k_quant = rng.integers(0, 40, size=(4, 2 * 144), dtype=np.uint8)  # 2 blocks per row
    mixed = dict(native, **{"k.weight": (k_quant, QType.Q4_K)})
    native_path = _write_gguf(tmp_path / "native.gguf", "llama", native)
    mixed_path = _write_gguf(tmp_path / "mixed.gguf", "llama", mixed)

    expected = mx.load(str(native_path))
    assert isinstance(expected, dict)
    loaded = load_tensors(mixed_path, read_header(mixed_path))
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype, name
        assert mx.array_equal(loaded[name], value).item(), name
    # The K-quant is dequantized with the gguf package, not with mx.load's float16 path.
    reference = dequantize(k_quant, QType.Q4_K).astype(np.float16)
    assert loaded["k.weight"].dtype == mx.float16
    assert np.array_equal(np.array(loaded["k.weight"]), reference)


def test_it_builds_a_sentencepiece_tokenizer_with_byte_fallback() -> None:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "▁he", "▁hello"]
    pieces += ["or", "ld", "▁w", "▁wor", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(len(pieces) - i) for i in range(len(pieces))]
    tokenizer = build_tokenizer(
        {
            "general.architecture": "llama",
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
            "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        }
    )
    ids = tokenizer.encode("hello world")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁world"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    accented = tokenizer.encode("hé", add_special_tokens=False)
    assert "<0xC3>" in tokenizer.convert_ids_to_tokens(accented)
    assert tokenizer.decode(accented) == "hé"


# --------------------------------------------------------------------------- bad files


def test_it_rejects_a_missing_path_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a file"):
        read_gguf(tmp_path)


def test_it_rejects_a_file_with_the_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(empty)


@pytest.mark.parametrize("size", [1000, 50_000_000])
def test_it_rejects_a_truncated_file(size: int, smollm2_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(GGUFError, match="truncated GGUF file"):
        read_gguf(path)


def test_it_rejects_an_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "mamba.gguf", "mamba", {"x.weight": (np.ones(4, np.float32), None)}
    )
    with pytest.raises(UnsupportedArchitecture, match="'mamba' is not supported") as error:
        read_gguf(path)
    assert error.value.architecture == "mamba"
    assert isinstance(error.value, GGUFError) and isinstance(error.value, ValueError)


def test_it_rejects_an_unknown_tensor_type(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "odd.gguf", "llama", {"x.weight": (np.ones(32, np.float32), None)}
    )
    data = bytearray(path.read_bytes())
    # The tensor table entry: name, n_dims, dims, then the type (F32 = 0) we overwrite.
    entry = data.index(b"x.weight") + len(b"x.weight") + 4 + 8
    assert struct.unpack_from("<I", data, entry) == (0,)
    struct.pack_into("<I", data, entry, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown type id 99"):
        read_gguf(path)
