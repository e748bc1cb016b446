"""Embedding models in the library: the scan knows a sentence-transformers folder is one, judges
it by the embedding loader, and the Models page shows its kind without mlx-lm's actions."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

from inference.services import model_fetch
from inference.weights.inspect import inspect_hf_dir
from models_admin import services
from models_admin.models import LibraryModel

pytestmark = pytest.mark.django_db

MINILM_ID = "all-minilm-l6-v2"
MODULES = [
    {"path": "", "type": "sentence_transformers.models.Transformer"},
    {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 32,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's folder as sentence-transformers saved it (fetched once into
    var/models, as the suite's other embedding tests do)."""
    model = django_settings.MLXWEB_CONFIG.models[MINILM_ID]
    path = model_fetch(model=model, models_dir=django_settings.MLXWEB_MODELS_DIR)
    assert path is not None
    return path


@pytest.fixture
def minilm_in_library(library: Path, minilm_dir: Path) -> Path:
    """A copy (hard links where it can) where its config expects it: a real folder, since the
    scan lists links into the models folder under the Hugging Face cache's entry instead."""
    dest = library / MINILM_ID

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(minilm_dir, dest, copy_function=link_or_copy)
    return dest


def write_sentence_folder(path: Path, **config: object) -> Path:
    """A small sentence-transformers folder: a BERT config (with `config` on top), the module
    list, mean pooling, a tokenizer and a safetensors file with one tensor."""
    (path / "1_Pooling").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**BERT, **config}))
    (path / "modules.json").write_text(json.dumps(MODULES))
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True})
    )
    (path / "tokenizer.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path


def test_it_knows_all_minilm_is_an_embedding_model_it_can_load(minilm_in_library: Path) -> None:
    [row] = services.library_scan()

    assert row.task == LibraryModel.Task.EMBED and row.is_embedding
    assert row.loadable and row.load_problem == ""
    assert row.model_type == "bert" and row.model_id == MINILM_ID


def test_a_chat_model_is_a_generation_model(library: Path, tiny_hf_dir: Path) -> None:
    [row] = services.library_scan()

    assert row.task == LibraryModel.Task.GENERATE and row.loadable


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"model_type": "roberta"}, "implements BERT encoders, not 'roberta'"),
        ({"position_embedding_type": "relative_key"}, "absolute position embeddings"),
        ({"hidden_act": "swish"}, "unsupported activation 'swish'"),
        ({"num_attention_heads": 3}, "not a multiple of num_attention_heads"),
        ({"vocab_size": None}, "lacks BERT setting(s): vocab_size"),
    ],
)
def test_the_embedding_loader_judges_an_embedding_folder(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    details = inspect_hf_dir(write_sentence_folder(tmp_path / "model", **change))

    assert details["task"] == "embed"
    assert not details["loadable"] and problem in details["load_problem"]


def test_it_says_what_else_an_embedding_folder_lacks(tmp_path: Path) -> None:
    good = write_sentence_folder(tmp_path / "good")
    assert inspect_hf_dir(good)["loadable"]

    dense = write_sentence_folder(tmp_path / "dense")
    modules = [*MODULES, {"path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    (dense / "modules.json").write_text(json.dumps(modules))
    assert "unsupported sentence-transformers module" in inspect_hf_dir(dense)["load_problem"]

    untokenized = write_sentence_folder(tmp_path / "untokenized")
    (untokenized / "tokenizer.json").unlink()
    assert inspect_hf_dir(untokenized)["load_problem"] == "no tokenizer.json or vocab.txt"


def test_rows_read_before_the_scanner_knew_the_task_are_read_again(
    minilm_in_library: Path,
) -> None:
    services.library_scan()
    # As the previous scanner left it (a signature of its version, mlx-lm's verdict).
    LibraryModel.objects.update(
        task=LibraryModel.Task.GENERATE,
        loadable=False,
        load_problem="mlx-lm does not implement model type 'bert'",
        signature="v2:1:2:3",
    )

    [row] = services.library_scan()

    assert row.task == LibraryModel.Task.EMBED and row.loadable


def test_the_page_shows_the_kind_and_no_mlx_lm_actions_for_it(
    admin_client: Client, minilm_in_library: Path, tiny_hf_dir: Path
) -> None:
    html = admin_client.get(reverse("models_admin:index")).content.decode()

    embed = services.library_find(ref=MINILM_ID)
    chat = services.library_find(ref="tiny-hf")
    assert 'class="badge kind-embed"' in html
    assert reverse("models_admin:convert", args=[chat.code]) in html
    for action in ("convert", "quantize", "validate", "export_gguf"):
        assert reverse(f"models_admin:{action}", args=[embed.code]) not in html
    assert reverse("models_admin:delete", args=[embed.code]) in html


@pytest.mark.parametrize("action", ["convert", "quantize", "validate"])
def test_the_forms_refuse_an_embedding_model(
    admin_client: Client, minilm_in_library: Path, action: str
) -> None:
    [row] = services.library_scan()

    fields = {"bits": "2", "group_size": "64", "n_tokens": "8"}
    response = admin_client.post(reverse(f"models_admin:{action}", args=[row.code]), fields)

    assert response.status_code == 400
    assert "is an embedding model" in response.content.decode()
