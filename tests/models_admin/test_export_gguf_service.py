"""models_admin.services.model_export_gguf: a library model to a GGUF file in the models folder,
and `manage.py models export-gguf`."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from inference import services as inference_services
from inference.weights.gguf.reader import read_header
from models_admin import services
from models_admin.models import LibraryModel, ModelJob

pytestmark = pytest.mark.django_db(transaction=True)


def _run(**params: Any) -> ModelJob:
    job = services.job_create(kind="export_gguf", params=params, enqueue=False)
    return services.job_run(job=job)


def test_it_exports_a_model_that_then_shows_in_the_library(
    library: Path, tiny_hf_dir: Path
) -> None:
    job = _run(source=str(tiny_hf_dir), path="tiny-Q8_0.gguf", file_type="q8_0")

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    dest = library / "tiny-Q8_0.gguf"
    assert job.result["path"] == str(dest)
    assert job.result["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert job.title == "Export tiny-hf to GGUF as tiny-Q8_0.gguf (Q8_0)"
    assert read_header(dest).metadata["general.file_type"] == 7
    row = LibraryModel.objects.get(path=str(dest))
    assert row.source == LibraryModel.Source.GGUF and row.architecture
    assert job.total and job.done == job.total
    # Nothing else was written: no staging file is left in the models folder.
    assert sorted(p.name for p in library.iterdir()) == ["tiny-Q8_0.gguf", "tiny-hf"]


def test_it_exports_into_a_folder_of_the_models_folder(library: Path, tiny_hf_dir: Path) -> None:
    job = _run(source=str(tiny_hf_dir), path=str(library / "gguf" / "tiny.gguf"), file_type="f16")

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert LibraryModel.objects.filter(name="gguf/tiny.gguf").exists()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/tmp/elsewhere.gguf", "an export goes into the models folder"),
        ("a/b/c.gguf", "an export goes into the models folder"),
        ("tiny.bin", "must end in .gguf"),
        ("tiny-hf/tiny.gguf", "tiny-hf is a model folder"),
        (".hidden.gguf", "use letters, digits"),
        ("../x.gguf", "an export goes into the models folder"),
    ],
)
def test_it_refuses_paths_the_library_would_not_list(
    library: Path, tiny_hf_dir: Path, path: str, message: str
) -> None:
    job = _run(source=str(tiny_hf_dir), path=path, file_type="q8_0")

    assert job.state == ModelJob.State.FAILED
    assert message in job.error
    assert sorted(p.name for p in library.iterdir()) == ["tiny-hf"]


def test_it_does_not_replace_an_existing_file(library: Path, tiny_hf_dir: Path) -> None:
    (library / "taken.gguf").write_bytes(b"GGUF")

    job = _run(source=str(tiny_hf_dir), path="taken.gguf", file_type="q8_0")

    assert job.state == ModelJob.State.FAILED
    assert "already exists" in job.error
    assert (library / "taken.gguf").read_bytes() == b"GGUF"


def test_a_cancel_mid_export_leaves_nothing_behind(
    library: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = inference_services.weights_export_gguf

    def cancel_after_the_first_tensor(*, progress: Any, **kwargs: Any) -> Any:
        class Cancelling:
            """The job's progress, cancelled as soon as the first tensor is written."""

            def step(self, *args: Any, **options: Any) -> None:
                progress.step(*args, **options)

            def advance(self, n: int = 1) -> None:
                progress.advance(n)
                progress.cancel()

            def log(self, line: str) -> None:
                progress.log(line)

            @property
            def cancelled(self) -> bool:
                return bool(progress.cancelled)

        return real(progress=Cancelling(), **kwargs)

    monkeypatch.setattr(inference_services, "weights_export_gguf", cancel_after_the_first_tensor)

    job = _run(source=str(tiny_hf_dir), path="tiny.gguf", file_type="q4_0")

    assert job.state == ModelJob.State.CANCELLED
    assert "removed the unfinished file" in job.log
    assert sorted(p.name for p in library.iterdir()) == ["tiny-hf"]


def run(*args: str) -> str:
    out = StringIO()
    call_command("models", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_the_command_exports_in_process(library: Path, tiny_hf_dir: Path) -> None:
    text = run("export-gguf", "tiny-hf", "tiny-Q4_0.gguf", "--type", "q4_0")

    assert "Export tiny-hf to GGUF as tiny-Q4_0.gguf (Q4_0) (job " in text
    assert f"Done: {library / 'tiny-Q4_0.gguf'} (" in text
    assert "llama, 5 F32, 14 Q4_0, 2 Q8_0)" in text
    assert (library / "tiny-Q4_0.gguf").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export-gguf", "tiny-hf", "/etc/x.gguf"], "path: /etc/x.gguf: an export goes into"),
        (["export-gguf", "tiny-hf", "x.txt"], "path: x.txt: the file name must end in .gguf"),
        (["export-gguf", "no-such-model", "x.gguf"], "source: No model 'no-such-model'"),
    ],
)
def test_the_command_refuses_bad_arguments_with_status_2(
    library: Path, tiny_hf_dir: Path, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as error:
        run(*args)

    assert error.value.returncode == 2
    assert message in str(error.value)
    assert not ModelJob.objects.exists()


def test_the_command_refuses_an_unknown_type(library: Path, tiny_hf_dir: Path) -> None:
    with pytest.raises(CommandError, match="invalid choice: 'q5_k'"):
        run("export-gguf", "tiny-hf", "x.gguf", "--type", "q5_k")
