"""LoRA adapters in the library: an mlx-lm adapter folder (adapter_config.json +
adapters.safetensors) in the models directory is a catalogue entry served on top of its base
model, writing what mlx-lm's own `load(adapter_path=...)` writes; an adapter whose base is
missing, or whose weights do not fit the base, is a clear error."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from inference.catalogue import Catalogue
from inference.engine import Delta, Engine, Finished, GenerationRequest
from inference.loader import ModelLoadError, load_model
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig

pytestmark = pytest.mark.timeout(120)

MESSAGES = [{"role": "user", "content": "Write a few words about the sea."}]
MAX_TOKENS = 12
_ids = itertools.count()


def write_adapter(
    base_dir: Path, out: Path, *, base: str, rank: int = 4, config_rank: int | None = None
) -> Path:
    """Train-free adapter: mlx-lm's LoRA layers on the base, with random non-zero weights
    (lora_b starts at zero, which would change nothing), saved as mlx-lm's trainer saves them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = cast(tuple[Any, Any], load(str(base_dir)))
    model.freeze()
    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(7)
    trainable = cast(list[tuple[str, Any]], tree_flatten(model.trainable_parameters()))
    weights = {name: mx.random.normal(value.shape) * 0.05 for name, value in trainable}
    model.update(tree_unflatten(list(weights.items())))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {**lora, "rank": config_rank or rank},
        "model": base,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def models_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora") / "models"
    base = root / "tiny"
    base.mkdir(parents=True)
    for item in tiny_model_dir.iterdir():
        if item.is_file():
            os.link(item, base / item.name)
    # As mlx-lm's trainer writes it: "model" is the path the base was loaded from.
    write_adapter(base, root / "tiny-sea-lora", base=str(base))
    # Weights of rank 4 under a config that says 8: they do not fit the layers it makes.
    write_adapter(base, root / "tiny-bad-lora", base="tiny", config_rank=8)
    write_adapter(base, root / "orphan-lora", base="some-org/not-here")
    return root


@pytest.fixture(scope="module")
def catalogue(models_dir: Path) -> Catalogue:
    server = ServerConfig.model_validate({"default_model": "tiny"})
    return Catalogue(Config(server=server, models={}), models_dir)


@pytest.fixture(scope="module")
def engine(catalogue: Catalogue, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    converted = tmp_path_factory.mktemp("converted")
    engine = Engine(catalogue=catalogue, converted_dir=converted, max_loaded_models=4)
    engine.start()
    yield engine
    engine.stop()


def generate(engine: Engine, model_id: str) -> tuple[Finished, str]:
    done = threading.Event()
    events: list[Any] = []

    def emit(event: Any) -> None:
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    params = GenerationParams.model_validate({"temperature": 0, "max_tokens": MAX_TOKENS})
    engine.submit(GenerationRequest(f"lora-{next(_ids)}", model_id, MESSAGES, params), emit)
    assert done.wait(60), "no Finished within 60 s"
    finished = next(e for e in events if isinstance(e, Finished))
    text = "".join(e.text for e in events if isinstance(e, Delta))
    return finished, text


def mlx_lm_text(model_dir: Path, adapter: Path | None) -> str:
    """Greedy text of mlx-lm's own loader and generate, on the same templated prompt."""
    from mlx_lm import generate as mlx_generate
    from mlx_lm import load

    path = str(adapter) if adapter is not None else None
    model, tokenizer = cast(tuple[Any, Any], load(str(model_dir), adapter_path=path))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return str(mlx_generate(model, tokenizer, prompt=prompt, max_tokens=MAX_TOKENS))


def test_adapter_folders_are_catalogue_entries_on_their_base(catalogue: Catalogue) -> None:
    spec = catalogue.get("tiny-sea-lora")
    assert spec.base_id == "tiny"
    assert spec.adapter_path is not None and spec.adapter_path.name == "tiny-sea-lora"
    assert spec.task == "generate" and spec.is_available
    available = {s.id for s in catalogue.available()}
    assert {"tiny", "tiny-sea-lora", "tiny-bad-lora"} <= available
    assert "orphan-lora" not in available


def test_an_adapter_writes_what_mlx_lm_writes_with_it_and_not_what_the_base_writes(
    engine: Engine, models_dir: Path
) -> None:
    base_finished, base_text = generate(engine, "tiny")
    finished, text = generate(engine, "tiny-sea-lora")
    assert finished.finish_reason in ("eos", "max_tokens"), finished.error
    assert base_finished.finish_reason in ("eos", "max_tokens"), base_finished.error
    assert text != base_text
    assert text == mlx_lm_text(models_dir / "tiny", models_dir / "tiny-sea-lora")
    assert base_text == mlx_lm_text(models_dir / "tiny", None)
    # Both resident, the adapter's entry naming its base; it weighs more than the base.
    info = {i["model_id"]: i for i in engine.loaded_models()}
    assert info["tiny-sea-lora"]["base_model"] == "tiny"
    assert info["tiny"]["base_model"] is None
    assert info["tiny-sea-lora"]["bytes"] > info["tiny"]["bytes"]


def test_an_adapter_that_does_not_fit_its_base_is_a_clear_error(
    engine: Engine, catalogue: Catalogue, tmp_path: Path
) -> None:
    finished, _ = generate(engine, "tiny-bad-lora")
    assert finished.finish_reason == "error"
    error = finished.error or ""
    assert "adapter 'tiny-bad-lora' does not fit its base model 'tiny'" in error
    assert "shape" in error
    with pytest.raises(ModelLoadError, match="does not fit its base model"):
        load_model(catalogue.get("tiny-bad-lora"), tmp_path)


def test_an_adapter_whose_base_is_missing_is_a_clear_error(engine: Engine) -> None:
    finished, _ = generate(engine, "orphan-lora")
    assert finished.finish_reason == "error"
    assert "its base model 'some-org/not-here' is not in the catalogue" in (finished.error or "")


def test_an_adapter_config_without_a_base_is_a_clear_error(models_dir: Path) -> None:
    folder = models_dir.parent / "lonely" / "models"
    folder.mkdir(parents=True)
    adapter = folder / "no-base-lora"
    adapter.mkdir()
    (adapter / "adapters.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text(json.dumps({"num_layers": 2}))
    server = ServerConfig.model_validate({"default_model": "tiny"})
    spec = Catalogue(Config(server=server, models={}), folder).get("no-base-lora")
    assert not spec.is_available
    assert spec.problem is not None and "names no base model" in spec.problem
    with pytest.raises(ModelLoadError, match="names no base model"):
        load_model(spec, folder)


def test_an_adapter_on_a_gguf_base_shares_the_bases_conversion(tmp_path: Path) -> None:
    from inference.catalogue import ModelSpec
    from inference.loader import converted_path

    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    base = ModelSpec(id="smol", name="smol", kind="gguf", context_length=2048, path=gguf)
    adapter = ModelSpec(
        id="smol-lora",
        name="smol-lora",
        kind="gguf",
        context_length=2048,
        path=gguf,
        adapter_path=tmp_path / "smol-lora",
        base_id="smol",
    )
    assert converted_path(adapter, tmp_path) == converted_path(base, tmp_path)
