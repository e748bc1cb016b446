"""Sentence embeddings on the real all-MiniLM-L6-v2: the vectors against sentence-transformers'
own, batching, truncation, the folder's pooling settings, the catalogue and the engine."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.catalogue import Catalogue
from inference.embeddings import SentenceEmbedder, load_sentence_embedder
from inference.engine import Engine, Finished, GenerationRequest
from inference.loader import ModelLoadError, load_embedder
from inference.schemas import GenerationParams
from inference.weights.sentence import SentenceModelError, read_pipeline
from mlxweb.config import Config, ServerConfig
from tests.inference.conftest import MINILM_ID

pytestmark = pytest.mark.timeout(120)

REFERENCE = json.loads(Path(__file__).with_name("minilm_reference.json").read_text())


def _cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> SentenceEmbedder:
    return load_sentence_embedder(minilm_dir)


# --------------------------------------------------------------------------- the model


def test_it_matches_the_sentence_transformers_reference(embedder: SentenceEmbedder) -> None:
    items = REFERENCE["items"]
    result = embedder.embed([item["text"] for item in items])

    for item, vector in zip(items, result.vectors, strict=True):
        assert _cosine(vector, item["vector"]) >= 0.999, item["text"][:40]
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert result.prompt_tokens == sum(item["tokens"] for item in items)
    assert result.vectors.shape == (len(items), 384)


def test_it_scores_similar_sentences_higher_than_unrelated_ones(
    embedder: SentenceEmbedder,
) -> None:
    guitar, guitar_too, revenue, revenue_too = embedder.embed(
        [
            "A man is playing a guitar.",
            "Someone is playing an acoustic guitar on stage.",
            "The quarterly earnings report showed a sharp decline in revenue.",
            "Company revenue fell steeply in last quarter's financial results.",
        ]
    ).vectors

    assert _cosine(guitar, guitar_too) > 0.5 > _cosine(guitar, revenue)
    assert _cosine(revenue, revenue_too) > 0.5 > _cosine(revenue_too, guitar_too)


def test_it_gives_the_same_vectors_one_at_a_time_and_in_a_batch_of_32(
    embedder: SentenceEmbedder,
) -> None:
    # Sentences of 3 to 28 tokens: in the batch, most are padded.
    short = [item["text"] for item in REFERENCE["items"][:-1]]
    texts = [f"{i}: {short[i % len(short)]}" for i in range(32)]

    batched = embedder.embed(texts, batch_size=32).vectors
    alone = np.stack([embedder.embed([text], batch_size=1).vectors[0] for text in texts])

    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_it_truncates_inputs_at_256_tokens(embedder: SentenceEmbedder) -> None:
    long = REFERENCE["items"][-1]
    assert long["tokens"] == 256 and embedder.max_length == 256
    longer = long["text"] + " Anything past the limit is never seen by the model."

    result = embedder.embed([long["text"], longer])

    assert [len(ids) for ids in embedder.encode([long["text"], longer])] == [256, 256]
    assert result.prompt_tokens == 512
    np.testing.assert_allclose(result.vectors[0], result.vectors[1], atol=1e-6)
    assert _cosine(result.vectors[0], long["vector"]) >= 0.999


def test_it_embeds_an_empty_text_as_sentence_transformers_does(
    embedder: SentenceEmbedder,
) -> None:
    # [CLS] [SEP] only: a vector still, of unit length.
    result = embedder.embed([""])
    assert result.prompt_tokens == 2
    assert np.linalg.norm(result.vectors[0]) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- the folder's settings


def _copy_small_files(source: Path, dest: Path) -> Path:
    """The model folder without its weights: enough for `read_pipeline`."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest


def test_it_reads_pooling_normalization_and_length_from_the_folder(minilm_dir: Path) -> None:
    pipeline = read_pipeline(minilm_dir)
    assert (pipeline.pooling, pipeline.normalize, pipeline.max_seq_length) == ("mean", True, 256)


def test_it_follows_a_folder_that_pools_the_cls_token(minilm_dir: Path, tmp_path: Path) -> None:
    folder = _copy_small_files(minilm_dir, tmp_path / "cls")
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling/config.json").write_text(json.dumps(pooling))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize

    pipeline = read_pipeline(folder)

    assert (pipeline.pooling, pipeline.normalize) == ("cls", False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dense", "unsupported sentence-transformers module"),
        ("weighted", "unsupported pooling"),
    ],
)
def test_it_refuses_a_folder_it_cannot_reproduce(
    minilm_dir: Path, tmp_path: Path, change: str, message: str
) -> None:
    folder = _copy_small_files(minilm_dir, tmp_path / change)
    if change == "dense":
        modules = json.loads((folder / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "x.models.Dense"})
        (folder / "modules.json").write_text(json.dumps(modules))
    else:
        pooling = json.loads((folder / "1_Pooling/config.json").read_text())
        pooling["pooling_mode_weightedmean_tokens"] = True
        (folder / "1_Pooling/config.json").write_text(json.dumps(pooling))

    with pytest.raises(SentenceModelError, match=message):
        read_pipeline(folder)


# --------------------------------------------------------------------------- catalogue and loader


def _catalogue(models_dir: Path) -> Catalogue:
    from django.conf import settings

    model = settings.MLXWEB_CONFIG.models[MINILM_ID]
    server = ServerConfig.model_validate({"default_model": MINILM_ID})
    return Catalogue(Config(server=server, models={MINILM_ID: model}), models_dir)


@pytest.fixture
def models_dir(tmp_path: Path, minilm_dir: Path) -> Path:
    """The configured embedding model, a sentence-transformers folder found in the models
    folder, and a generation model folder (never loaded: its weights are empty)."""
    root = tmp_path / "models"
    root.mkdir()
    (root / MINILM_ID).symlink_to(minilm_dir)
    (root / "found-minilm").symlink_to(minilm_dir)
    chat = root / "chat-model"
    chat.mkdir()
    (chat / "config.json").write_text('{"model_type": "llama"}')
    (chat / "model.safetensors").write_bytes(b"")
    return root


def test_it_knows_embedding_models_by_config_and_by_folder(models_dir: Path) -> None:
    catalogue = _catalogue(models_dir)
    tasks = {spec.id: spec.task for spec in catalogue.all()}
    assert tasks == {MINILM_ID: "embed", "found-minilm": "embed", "chat-model": "generate"}
    assert catalogue.get(MINILM_ID).context_length == 256


def test_the_loader_loads_only_embedding_models_as_embedders(models_dir: Path) -> None:
    catalogue = _catalogue(models_dir)
    assert load_embedder(catalogue.get("found-minilm")).max_length == 256
    with pytest.raises(ModelLoadError, match="not an embedding model"):
        load_embedder(catalogue.get("chat-model"))


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def engine(models_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(catalogue=_catalogue(models_dir), converted_dir=tmp_path / "converted")
    engine.start()
    yield engine
    engine.stop()


def test_the_engine_embeds_on_its_own_thread(engine: Engine) -> None:
    threads: list[str] = []
    items = REFERENCE["items"]

    result = engine.embed_wait(MINILM_ID, [item["text"] for item in items])
    engine.embed(MINILM_ID, ["x"], lambda _: threads.append(threading.current_thread().name))
    engine.embed_wait(MINILM_ID, ["flush"])

    assert result.kind == "" and result.error == ""
    assert result.prompt_tokens == sum(item["tokens"] for item in items)
    for item, vector in zip(items, result.vectors, strict=True):
        assert _cosine(vector, item["vector"]) >= 0.999
    assert threads == ["mlx-engine"]
    assert [m["model_id"] for m in engine.loaded_models()] == [MINILM_ID]


def test_the_engine_answers_a_request_larger_than_one_batch_in_order(engine: Engine) -> None:
    texts = [f"sentence number {i}" for i in range(70)]
    result = engine.embed_wait(MINILM_ID, texts)
    alone = engine.embed_wait(MINILM_ID, texts[41:42])
    np.testing.assert_allclose(result.vectors[41], alone.vectors[0], atol=1e-5)
    assert len(result.vectors) == 70


@pytest.mark.parametrize(
    ("model_id", "kind"),
    [("no-such-model", "unknown_model"), ("chat-model", "not_embedding")],
)
def test_the_engine_refuses_what_it_cannot_embed_with(
    engine: Engine, model_id: str, kind: str
) -> None:
    result = engine.embed_wait(model_id, ["hello"])
    assert (result.kind, result.vectors) == (kind, [])
    assert model_id in result.error


def test_the_engine_refuses_to_generate_with_an_embedding_model(engine: Engine) -> None:
    finished = threading.Event()
    events: list[Any] = []

    def emit(event: Any) -> None:
        events.append(event)
        if isinstance(event, Finished):
            finished.set()

    request = GenerationRequest(
        "gen-1", MINILM_ID, [{"role": "user", "content": "hi"}], GenerationParams()
    )
    engine.submit(request, emit)

    assert finished.wait(30)
    assert events[-1].finish_reason == "error" and "embedding model" in events[-1].error


def test_the_engine_answers_embedding_requests_when_it_stops(engine: Engine) -> None:
    engine.stop()
    result = engine.embed_wait(MINILM_ID, ["too late"])
    assert result.kind == "error" and "stopped" in result.error
