"""models_admin.services.model_quantize: an MLX model to fewer bits, as a new model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models_admin import services
from models_admin.models import ModelJob

from .test_convert_service import generate_a_few_tokens

pytestmark = pytest.mark.django_db(transaction=True)


def _run(kind: str, **params: Any) -> ModelJob:
    job = services.job_create(kind=kind, params=params, enqueue=False)
    return services.job_run(job=job)


@pytest.fixture
def tiny_8bit(library: Path, tiny_hf_dir: Path) -> Path:
    job = _run(
        "convert", source=str(tiny_hf_dir), name="tiny-8bit", quantize=True, bits=8, group_size=64
    )
    assert job.state == ModelJob.State.SUCCEEDED, job.error
    return library / "tiny-8bit"


def test_it_requantizes_an_8_bit_model_to_4_bits(library: Path, tiny_8bit: Path) -> None:
    job = _run("quantize", source=str(tiny_8bit), name="tiny-4bit", bits=4, group_size=32)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    config = json.loads((library / "tiny-4bit" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["group_size"] == 32
    assert job.result["bits_per_weight"] < 8
    assert generate_a_few_tokens(library / "tiny-4bit")
    # The source is kept.
    assert json.loads((tiny_8bit / "config.json").read_text())["quantization"]["bits"] == 8


def test_it_quantizes_a_float16_mlx_model(library: Path, tiny_hf_dir: Path) -> None:
    assert _run("convert", source=str(tiny_hf_dir), name="tiny-f16").state == "succeeded"

    job = _run("quantize", source=str(library / "tiny-f16"), name="tiny-3bit", bits=3)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert generate_a_few_tokens(library / "tiny-3bit")


def test_it_refuses_more_bits_than_the_model_has(library: Path, tiny_8bit: Path) -> None:
    job = _run("quantize", source=str(tiny_8bit), name="tiny-8bit-again", bits=8)

    assert job.state == ModelJob.State.FAILED
    assert "already 8-bit" in job.error
    assert not (library / "tiny-8bit-again").exists()


def test_it_refuses_a_model_that_is_not_mlx(library: Path, tiny_hf_dir: Path) -> None:
    job = _run("quantize", source=str(tiny_hf_dir), name="nope", bits=4)

    assert job.state == ModelJob.State.FAILED
    assert job.error == "tiny-hf is not an MLX model: convert it instead."
