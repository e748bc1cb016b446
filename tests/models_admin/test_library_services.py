"""models_admin.services library_*: what the disk holds, as library rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone

from inference.models import Generation
from models_admin import services
from models_admin.models import LibraryModel, ModelJob
from tests.support.fake_hub import TINY_REPO, FakeHub

pytestmark = pytest.mark.django_db


def write_gguf(
    path: Path, *, arch: str = "llama", chat_template: bool = True, file_type: int | None = None
) -> Path:
    """A small valid GGUF file (two float32 tensors) written with the gguf package."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    if file_type is not None:
        writer.add_file_type(file_type)
    if chat_template:
        writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((32, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_it_lists_a_hugging_face_model_in_the_models_folder(
    library: Path, tiny_hf_dir: Path, tiny_files: dict[str, bytes]
) -> None:
    [entry] = services.library_scan()

    assert entry.name == "tiny-hf"
    assert entry.source == LibraryModel.Source.MODELS_DIR
    assert entry.path == str(tiny_hf_dir)
    assert entry.model_id == "tiny-hf"
    assert entry.architecture == "LlamaForCausalLM" and entry.model_type == "llama"
    config = json.loads(tiny_files["config.json"])
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    per_layer = 2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * inter + 2 * hidden
    assert entry.parameter_count == 2 * vocab * hidden + hidden + 2 * per_layer
    assert entry.size_bytes == sum(len(d) for d in tiny_files.values())
    assert entry.dtype == "float16" and entry.quant_bits is None
    assert entry.loadable and not entry.is_mlx
    assert entry.has_chat_template
    assert entry.context_length == 2048


def test_it_explains_why_a_model_cannot_be_loaded(library: Path) -> None:
    odd = library / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (odd / "model.safetensors").write_bytes(b"")
    remote = library / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "llama", "model_file": "x.py"}))

    rows = {row.name: row for row in services.library_scan()}

    assert not rows["odd"].loadable
    assert rows["odd"].load_problem == "mlx-lm does not implement model type 'no-such-arch'"
    assert not rows["remote"].loadable
    assert "trust_remote_code is never used" in rows["remote"].load_problem


def test_it_lists_gguf_files(library: Path) -> None:
    write_gguf(library / "smol" / "smol.Q8.gguf")
    write_gguf(library / "other.gguf", arch="gemma3", chat_template=False)

    rows = {row.name: row for row in services.library_scan()}

    smol = rows["smol/smol.Q8.gguf"]
    assert smol.source == LibraryModel.Source.GGUF
    assert smol.architecture == "llama" and smol.parameter_count == 32 * 16 + 16
    assert smol.has_chat_template and smol.context_length == 4096
    assert smol.dtype == "f32" and smol.loadable
    other = rows["other.gguf"]
    assert not other.loadable and not other.has_chat_template
    assert "import it" in other.load_problem


def test_it_names_a_gguf_quantization_by_the_file_type_it_declares(library: Path) -> None:
    import gguf

    # A Q4_K_M file keeps some tensors (often the large embedding) in other types: the type
    # holding the most parameters is not the file's quantization, its declared file type is.
    write_gguf(library / "mixed.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)

    (row,) = services.library_scan()

    assert row.quant_detail == "Q4_K_M"
    assert row.quant_bits == 4 and row.quant_group_size is None and row.dtype == ""


def test_it_reads_every_model_again_once_the_scanner_changes(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models_admin import library as library_module

    write_gguf(library / "smol.gguf")
    services.library_scan()
    LibraryModel.objects.update(architecture="as an older scanner read it")

    services.library_scan()  # same files: the row is kept as it is
    assert LibraryModel.objects.get().architecture == "as an older scanner read it"

    monkeypatch.setattr(library_module, "DETAILS_VERSION", library_module.DETAILS_VERSION + 1)
    services.library_scan()
    assert LibraryModel.objects.get().architecture == "llama"


@pytest.mark.django_db(transaction=True)
def test_it_lists_the_hugging_face_cache(library: Path, hf_cache: Path, fake_hub: FakeHub) -> None:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO}, enqueue=False)
    assert services.job_run(job=job).state == ModelJob.State.SUCCEEDED

    [entry] = services.library_scan()

    assert entry.name == TINY_REPO
    assert entry.source == LibraryModel.Source.HF_CACHE
    assert entry.repo_id == TINY_REPO
    assert entry.revision == fake_hub.repos[TINY_REPO].commit
    assert entry.path.startswith(str(hf_cache))
    # Pulled loadable models are linked into the models folder: that is their chat id.
    assert entry.model_id == "tiny-llama"


def test_it_keeps_codes_and_forgets_models_that_are_gone(library: Path, tiny_hf_dir: Path) -> None:
    [first] = services.library_scan()
    [again] = services.library_scan()
    assert again.code == first.code

    (tiny_hf_dir / "config.json").unlink()
    for child in tiny_hf_dir.iterdir():
        child.unlink()
    tiny_hf_dir.rmdir()

    assert services.library_scan() == []


def test_it_rereads_a_model_whose_files_changed(library: Path, tiny_hf_dir: Path) -> None:
    services.library_scan()
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (tiny_hf_dir / "config.json").write_text(json.dumps(config))

    [entry] = services.library_scan()

    assert entry.context_length == 4096


def test_it_shows_when_a_model_was_last_used(library: Path, tiny_hf_dir: Path) -> None:
    then = timezone.now() - timedelta(hours=3)
    Generation.objects.create(model_id="tiny-hf", created_at=then - timedelta(days=1))
    Generation.objects.create(model_id="tiny-hf", created_at=then)
    Generation.objects.create(model_id="someone-else", created_at=timezone.now())

    [entry] = services.library_scan()

    assert entry.last_used_at == then


def test_it_finds_a_model_by_code_name_id_or_path(library: Path, tiny_hf_dir: Path) -> None:
    [entry] = services.library_scan()

    for ref in (str(entry.code), "tiny-hf", str(tiny_hf_dir), f"{library}/../models/tiny-hf"):
        assert services.library_find(ref=ref) == entry


def test_it_refuses_paths_outside_the_library(library: Path, tmp_path: Path) -> None:
    with pytest.raises(services.PathRefused, match="outside the models folder"):
        services.library_find(ref=str(tmp_path))
    with pytest.raises(services.PathRefused):
        services.library_find(ref="/etc")
    with pytest.raises(services.LibraryError, match="No model 'nothing-here'"):
        services.library_find(ref="nothing-here")


def test_it_refuses_a_home_folder_of_no_such_user(library: Path) -> None:
    with pytest.raises(services.PathRefused, match="names a home folder that does not exist"):
        services.library_find(ref="~nosuchuser/model")
    with pytest.raises(services.PathRefused, match="names a home folder that does not exist"):
        services.library_check_import_path(path="~nosuchuser/model.gguf")


def test_it_previews_the_space_a_delete_frees(library: Path, tiny_hf_dir: Path) -> None:
    [entry] = services.library_scan()
    Generation.objects.create(model_id="tiny-hf", state=Generation.State.STREAMING)

    preview = services.library_delete_preview(entry=entry)

    assert preview.freed_bytes == entry.size_bytes
    assert preview.active_replies == 1
    assert preview.model_ids == ["tiny-hf"]


def test_it_ignores_staging_folders(library: Path, tiny_hf_dir: Path) -> None:
    staging = library / ".staging-1234"
    staging.mkdir()
    (staging / "config.json").write_text("{}")

    assert [row.name for row in services.library_scan()] == ["tiny-hf"]


def test_it_marks_a_model_with_missing_shards_incomplete(library: Path, tiny_hf_dir: Path) -> None:
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tiny_hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))

    [entry] = services.library_scan()

    assert not entry.loadable
    assert entry.load_problem.startswith("incomplete: 1 weight file(s) missing")


@pytest.mark.django_db(transaction=True)
def test_it_marks_a_repo_that_is_being_pulled(
    library: Path, hf_cache: Path, fake_hub: FakeHub
) -> None:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO}, enqueue=False)
    services.job_run(job=job)
    again = services.job_create(kind="pull", params={"repo_id": TINY_REPO})

    [entry] = services.library_scan()
    assert not entry.loadable and entry.load_problem == "being downloaded"

    services.job_cancel(job=again)
    [entry] = services.library_scan()
    assert entry.loadable
