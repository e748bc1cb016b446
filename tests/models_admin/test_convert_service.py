"""models_admin.services.model_convert: Hugging Face safetensors to MLX, via a staging folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models_admin import services
from models_admin.models import LibraryModel, ModelJob
from models_admin.progress import JobProgress

pytestmark = pytest.mark.django_db(transaction=True)


def _convert(source: Path, name: str, **options: Any) -> ModelJob:
    params = {"source": str(source), "name": name, **options}
    job = services.job_create(kind="convert", params=params, enqueue=False)
    return services.job_run(job=job)


def generate_a_few_tokens(path: Path) -> list[int]:
    """The tokens the model at `path` writes greedily after a chat prompt (up to 8, at least
    one), each from finite log-probabilities: a broken conversion (NaN or inf weights) fails."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))[:2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    tokens = []
    for response in stream_generate(model, tokenizer, prompt=prompt, max_tokens=8):
        assert mx.all(mx.isfinite(response.logprobs)).item(), f"{path.name}: non-finite logits"
        tokens.append(response.token)
    return tokens


def test_it_converts_to_float16_mlx_that_loads_and_generates(
    library: Path, tiny_hf_dir: Path
) -> None:
    job = _convert(tiny_hf_dir, "tiny-f16", dtype="float16")

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    out = library / "tiny-f16"
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert job.result["dtype"] == "float16"
    assert job.result["model_id"] == "tiny-f16"
    assert job.unit == ModelJob.Unit.STEPS and job.done == job.total == 6 + 2
    # float16 to float16: the same weights, so the same greedy answer as the source.
    assert generate_a_few_tokens(out) == generate_a_few_tokens(tiny_hf_dir)
    entry = LibraryModel.objects.get(path=str(out))
    assert entry.is_mlx and entry.loadable and entry.has_chat_template
    assert entry.model_id == "tiny-f16"
    assert not [p for p in library.iterdir() if p.name.startswith(".")]


def test_it_converts_and_quantizes_to_4_bits(library: Path, tiny_hf_dir: Path) -> None:
    job = _convert(tiny_hf_dir, "tiny-4bit", quantize=True, bits=4, group_size=64)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    out = library / "tiny-4bit"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 64
    assert generate_a_few_tokens(out)
    entry = LibraryModel.objects.get(path=str(out))
    assert (entry.quant_bits, entry.quant_group_size) == (4, 64)
    assert entry.parameter_count == LibraryModel.objects.get(path=str(tiny_hf_dir)).parameter_count


def test_it_applies_a_mixed_precision_recipe(library: Path, tiny_hf_dir: Path) -> None:
    job = _convert(tiny_hf_dir, "tiny-mixed", quantize=True, group_size=64, recipe="mixed_3_6")

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    entry = LibraryModel.objects.get(path=str(library / "tiny-mixed"))
    assert entry.quant_detail == "mixed 3-6" and entry.quant_bits == 6
    assert entry.quantization == "mixed 3-6-bit, group 64"
    assert generate_a_few_tokens(library / "tiny-mixed")


def test_it_leaves_nothing_behind_when_cancelled_mid_job(
    library: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = JobProgress.step

    def cancel_after_the_weights_are_written(self: JobProgress, text: str, **counts: Any) -> None:
        step(self, text, **counts)
        if text == "writing config and tokenizer":
            self.cancel()  # as the monitor does when it reads the job's cancel flag

    monkeypatch.setattr(JobProgress, "step", cancel_after_the_weights_are_written)

    job = _convert(tiny_hf_dir, "tiny-f16", dtype="float16")

    assert job.state == ModelJob.State.CANCELLED
    assert sorted(p.name for p in library.iterdir()) == ["tiny-hf"]
    assert "removed the unfinished output" in job.log


def test_it_removes_the_staging_folder_when_it_fails(
    library: Path, tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx_lm.utils

    def broken_save_config(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("disk went away")

    monkeypatch.setattr(mlx_lm.utils, "save_config", broken_save_config)

    job = _convert(tiny_hf_dir, "tiny-f16")

    assert job.state == ModelJob.State.FAILED
    assert job.error == "Unexpected error: RuntimeError: disk went away"
    assert sorted(p.name for p in library.iterdir()) == ["tiny-hf"]


def test_it_refuses_a_source_outside_the_allowed_folders(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")

    job = _convert(outside, "stolen")

    assert job.state == ModelJob.State.FAILED
    assert "outside the models folder" in job.error and "refused" in job.error
    assert not (library / "stolen").exists()


def test_it_refuses_a_link_that_leads_outside(library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (library / "sneaky").symlink_to(outside)

    job = _convert(library / "sneaky", "stolen")

    assert job.state == ModelJob.State.FAILED
    assert "refused" in job.error


def test_it_will_not_overwrite_an_existing_model(library: Path, tiny_hf_dir: Path) -> None:
    job = _convert(tiny_hf_dir, "tiny-hf")

    assert job.state == ModelJob.State.FAILED
    assert job.error == "A model named 'tiny-hf' already exists in the models folder."
