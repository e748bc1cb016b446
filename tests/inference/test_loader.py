"""Loading a catalogue spec: GGUF (converted once, then cached), MLX directories, the HF cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

import inference.weights.convert
from inference.catalogue import ModelSpec
from inference.loader import (
    LoadedModel,
    ModelLoadError,
    converted_path,
    float32_bytes,
    load_model,
    use_float32_on_cpu,
)
from inference.testing import build_tiny_model
from inference.weights.convert import parameters

MESSAGES = [{"role": "user", "content": "Hi"}]


def _gguf_spec(path: Path, **changes: object) -> ModelSpec:
    fields: dict = {"id": "smol", "name": "Smol", "kind": "gguf", "context_length": 4096}
    fields.update(path=path, **changes)
    return ModelSpec(**fields)


def _mlx_spec(path: Path, **changes: object) -> ModelSpec:
    fields: dict = {"id": "tiny", "name": "Tiny", "kind": "mlx", "context_length": 8192}
    fields.update(path=path, **changes)
    return ModelSpec(**fields)


def test_it_converts_a_gguf_once_and_then_loads_the_cached_directory(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _gguf_spec(smollm2_gguf)
    converted = tmp_path / "converted"

    first = load_model(spec, converted)
    assert isinstance(first, LoadedModel)
    target = converted_path(spec, converted)
    assert target.parent == converted and target.name.startswith("smol-")
    assert (target / "config.json").is_file()
    assert first.context_length == 4096  # the spec's limit, below the model's 8192
    assert first.tokenizer.eos_token_ids == {2}

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(inference.weights.convert, "import_gguf", no_conversion)
    second = load_model(spec, converted)
    prompt = first.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert second.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True) == prompt


def test_it_keys_the_converted_directory_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    spec = _gguf_spec(path)
    before = converted_path(spec, tmp_path / "converted")
    assert converted_path(spec, tmp_path / "converted") == before
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    assert converted_path(spec, tmp_path / "converted") != before
    path.write_bytes(b"GGUF" + bytes(61))
    assert converted_path(spec, tmp_path / "converted") != before


def test_it_loads_an_mlx_directory(tiny_model_dir: Path) -> None:
    loaded = load_model(_mlx_spec(tiny_model_dir), Path("/nonexistent"))
    assert loaded.context_length == 2048  # the model's own limit, below the spec's 8192
    assert loaded.spec.id == "tiny"
    prompt = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert loaded.tokenizer.decode(prompt).startswith("<|im_start|>system")


def test_it_applies_the_spec_chat_template(tiny_model_dir: Path) -> None:
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    )
    loaded = load_model(_mlx_spec(tiny_model_dir, chat_template=template), Path("/nonexistent"))
    prompt = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert loaded.tokenizer.decode(prompt) == "[user] Hi\n[assistant]"


def test_it_loads_a_hub_model_from_the_local_cache_only(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--mlx-community--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    spec = ModelSpec(
        id="tiny-hub", name="Tiny", kind="hub", context_length=1024, hub_repo="mlx-community/tiny"
    )
    loaded = load_model(spec, tmp_path / "converted")
    assert loaded.context_length == 1024

    missing = ModelSpec(
        id="gone", name="Gone", kind="hub", context_length=1024, hub_repo="mlx-community/gone"
    )
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model(missing, tmp_path / "converted")


def test_it_reports_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(_gguf_spec(tmp_path / "absent.gguf"), tmp_path)
    with pytest.raises(ModelLoadError, match="model directory .* not found"):
        load_model(_mlx_spec(tmp_path / "absent"), tmp_path)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(_mlx_spec(no_weights), tmp_path)


def test_it_reports_bad_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(_gguf_spec(bad_gguf), tmp_path / "converted")
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").iterdir())

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(_mlx_spec(corrupt), tmp_path)


# --------------------------------------------------------------------------- float32 on the CPU


@pytest.fixture(scope="module")
def tiny_4bit_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-4bit") / "tiny", smollm2_gguf, quantize_bits=4
    )


def _logits(loaded: LoadedModel) -> mx.array:
    tokens = mx.array([loaded.tokenizer.encode("The capital of France is")])
    logits = loaded.model(tokens)[0, -1].astype(mx.float32)
    mx.eval(logits)
    return logits


def test_it_serves_a_quantized_model_in_float32_when_it_fits(tiny_4bit_dir: Path) -> None:
    loaded = load_model(_mlx_spec(tiny_4bit_dir), tiny_4bit_dir.parent)
    quantized_logits = _logits(loaded)
    expected_bytes = float32_bytes(loaded.model)

    assert use_float32_on_cpu(loaded, expected_bytes) is True

    params = parameters(loaded.model)
    assert not any(name.endswith((".scales", ".biases")) for name, _ in params)
    assert {value.dtype for _, value in params} == {mx.float32}
    # float32_bytes predicted the size of the dequantized weights exactly.
    assert sum(value.nbytes for _, value in params) == expected_bytes
    # The same function: quantized matmuls compute with exactly these dequantized weights.
    dense_logits = _logits(loaded)
    assert mx.argmax(dense_logits).item() == mx.argmax(quantized_logits).item()
    assert mx.allclose(dense_logits, quantized_logits, atol=1e-3, rtol=1e-3).item()


@pytest.mark.parametrize("budget", ["one byte short", "off"])
def test_it_keeps_the_model_as_stored_when_float32_does_not_fit(
    tiny_4bit_dir: Path, budget: str
) -> None:
    loaded = load_model(_mlx_spec(tiny_4bit_dir), tiny_4bit_dir.parent)
    max_bytes = float32_bytes(loaded.model) - 1 if budget == "one byte short" else 0

    assert use_float32_on_cpu(loaded, max_bytes) is False

    assert any(name.endswith(".scales") for name, _ in parameters(loaded.model))


def test_it_leaves_a_float32_model_alone(tiny_model_dir: Path) -> None:
    loaded = load_model(_mlx_spec(tiny_model_dir), tiny_model_dir.parent)
    assert use_float32_on_cpu(loaded, 2**40) is False
