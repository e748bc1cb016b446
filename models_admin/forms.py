"""Validation of job requests, shared by the Models page and `manage.py models`.

Each form's `job_params()` is exactly the keyword arguments of its job kind's service function.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from inference.services import CONVERT_DTYPES, QUANT_BITS, QUANT_GROUP_SIZES, QUANT_RECIPES
from models_admin import services
from models_admin.models import LibraryModel

# Hub ids: "namespace/name", letters, digits, '-', '_', '.'; no "--" or ".." (as the hub says).
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}$")

BITS_CHOICES = [(b, f"{b}-bit") for b in QUANT_BITS]
GROUP_CHOICES = [(g, str(g)) for g in QUANT_GROUP_SIZES]
RECIPE_CHOICES = [("", "the same bits for every layer")] + [(r, r) for r in QUANT_RECIPES]
DTYPE_CHOICES = [("", "as the source")] + [(d, d) for d in CONVERT_DTYPES]


def _check_new_name(name: str) -> str:
    if not re.match(services.NAME_PATTERN, name) or name in {".", ".."}:
        raise forms.ValidationError(
            "Use letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(at most 100 characters)."
        )
    path = Path(settings.MLXWEB_MODELS_DIR) / name
    if path.exists() or path.is_symlink():
        raise forms.ValidationError(f"A model named {name!r} already exists.")
    return name


class PullForm(forms.Form):
    """Pull a repo from the Hugging Face hub."""

    repo_id = forms.CharField(
        label="Repository",
        max_length=193,
        widget=forms.TextInput(attrs={"placeholder": "mlx-community/SmolLM2-135M-Instruct-8bit"}),
    )
    revision = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"placeholder": "main"}),
        help_text="A branch, tag or commit; main if empty.",
    )
    name = forms.CharField(
        required=False,
        max_length=100,
        help_text="Its name in the models folder; the repo's name if empty.",
    )

    def clean_repo_id(self) -> str:
        repo_id = self.cleaned_data["repo_id"].strip()
        if not REPO_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise forms.ValidationError(
                "Give a hub repository id as namespace/name, e.g. mlx-community/Llama-3.2-1B."
            )
        return repo_id

    def clean_revision(self) -> str:
        revision = self.cleaned_data["revision"].strip()
        if revision and (not REVISION_RE.match(revision) or ".." in revision):
            raise forms.ValidationError("A revision is a branch, tag or commit hash.")
        return revision

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        return _check_new_name(name) if name else ""

    def job_params(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "repo_id": data["repo_id"],
            "revision": data["revision"] or None,
            "name": data["name"] or None,
        }


def _embedding_refusal(source: LibraryModel, done: str) -> str:
    return (
        f"{source.name} is an embedding model: it is served as it is, and cannot be {done} "
        "(mlx-lm's conversions are for models that generate text)."
    )


class _SourceForm(forms.Form):
    """A form about one library model, named by code, name, chat id, repo id or path."""

    source = forms.CharField(max_length=1000, widget=forms.HiddenInput)
    source_model: LibraryModel

    def clean_source(self) -> str:
        try:
            self.source_model = services.library_find(ref=self.cleaned_data["source"])
        except services.LibraryError as e:
            raise forms.ValidationError(str(e)) from e
        return self.source_model.path


class ConvertForm(_SourceForm):
    """Convert a Hugging Face safetensors model to MLX."""

    name = forms.CharField(
        required=False, max_length=100, help_text="The new model's name; made up if empty."
    )
    dtype = forms.ChoiceField(choices=DTYPE_CHOICES, required=False, label="Data type")
    quantize = forms.BooleanField(required=False)
    bits = forms.TypedChoiceField(choices=BITS_CHOICES, coerce=int, initial=4)
    group_size = forms.TypedChoiceField(choices=GROUP_CHOICES, coerce=int, initial=64)
    recipe = forms.ChoiceField(
        choices=RECIPE_CHOICES,
        required=False,
        label="Mixed precision",
        help_text="mlx-lm's recipes: more bits for the layers that matter most.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "source" not in data:
            return data
        if self.source_model.is_embedding:
            self.add_error("source", _embedding_refusal(self.source_model, "converted"))
            return data
        if not self.source_model.loadable:
            self.add_error(
                "source",
                f"mlx-lm cannot load {self.source_model.name}: {self.source_model.load_problem}",
            )
            return data
        if self.source_model.source == LibraryModel.Source.GGUF:
            self.add_error("source", "This is a GGUF file: import it instead.")
            return data
        if data.get("recipe") and not data.get("quantize"):
            self.add_error("recipe", "Mixed precision quantizes: tick Quantize too.")
        if not data.get("name") and not self.errors:
            if data.get("quantize"):
                suffix = data.get("recipe") or f"{data.get('bits')}bit"
            else:
                suffix = data.get("dtype") or "mlx"
            data["name"] = services.default_model_name(self.source_model.name, suffix)
        if data.get("name"):
            try:
                data["name"] = _check_new_name(data["name"])
            except forms.ValidationError as e:
                self.add_error("name", e)
        return data

    def job_params(self) -> dict[str, Any]:
        data = self.cleaned_data
        quantize = bool(data["quantize"])
        return {
            "source": data["source"],
            "name": data["name"],
            "dtype": data["dtype"] or None,
            "quantize": quantize,
            "bits": data["bits"] if quantize else None,
            "group_size": data["group_size"] if quantize else None,
            "recipe": (data["recipe"] or None) if quantize else None,
        }


class QuantizeForm(_SourceForm):
    """Quantize an MLX model to fewer bits."""

    name = forms.CharField(
        required=False, max_length=100, help_text="The new model's name; made up if empty."
    )
    bits = forms.TypedChoiceField(choices=BITS_CHOICES, coerce=int, initial=4)
    group_size = forms.TypedChoiceField(choices=GROUP_CHOICES, coerce=int, initial=64)
    recipe = forms.ChoiceField(choices=RECIPE_CHOICES, required=False, label="Mixed precision")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "source" not in data or "bits" not in data:
            return data
        source = self.source_model
        if source.is_embedding:
            self.add_error("source", _embedding_refusal(source, "quantized"))
            return data
        if not source.is_mlx:
            self.add_error("source", f"{source.name} is not an MLX model: convert it instead.")
            return data
        if (
            source.quant_bits is not None
            and not data.get("recipe")
            and data["bits"] >= source.quant_bits
        ):
            self.add_error(
                "bits", f"{source.name} is {source.quant_bits}-bit already: choose fewer bits."
            )
            return data
        if not data.get("name"):
            suffix = data.get("recipe") or f"{data['bits']}bit"
            base = re.sub(r"-(\d+bit|mixed_\d_\d|mlx|float16|bfloat16|float32)$", "", source.name)
            data["name"] = services.default_model_name(base, suffix)
        try:
            data["name"] = _check_new_name(data["name"])
        except forms.ValidationError as e:
            self.add_error("name", e)
        return data

    def job_params(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "source": data["source"],
            "name": data["name"],
            "bits": data["bits"],
            "group_size": data["group_size"],
            "recipe": data["recipe"] or None,
        }


KEEP_BITS = "keep"
IMPORT_BITS_CHOICES = [(KEEP_BITS, "as in the file")] + [(str(b), f"{b}-bit") for b in QUANT_BITS]


class ImportGGUFForm(forms.Form):
    """Import a GGUF file (a path the server may read, or an upload) as an MLX model."""

    path = forms.CharField(
        required=False,
        max_length=1000,
        label="Path on this machine",
        widget=forms.TextInput(attrs={"placeholder": "/path/to/model.Q4_K_M.gguf"}),
    )
    upload = forms.FileField(
        required=False,
        label="or upload a file",
        widget=forms.ClearableFileInput(attrs={"accept": ".gguf"}),
    )
    keep_upload = forms.BooleanField(
        required=False,
        label="Keep the uploaded GGUF",
        help_text="in the models folder; otherwise it is removed when the import ends.",
    )
    bits = forms.ChoiceField(
        choices=IMPORT_BITS_CHOICES,
        initial=KEEP_BITS,
        help_text="Q4_0, Q4_1 and Q8_0 are always kept; other types (K-quants...) are "
        "re-quantized to these bits, or stored as floats.",
    )
    group_size = forms.TypedChoiceField(choices=GROUP_CHOICES, coerce=int, initial=64)
    name = forms.CharField(
        required=False, max_length=100, help_text="The new model's name; made up if empty."
    )
    source_path: Path | None = None

    def clean_path(self) -> str:
        raw = self.cleaned_data["path"].strip()
        if not raw:
            return ""
        try:
            path = services.library_check_import_path(path=raw)
        except services.LibraryError as e:
            raise forms.ValidationError(str(e)) from e
        if not services.has_gguf_magic(path):
            raise forms.ValidationError(
                f"{path.name} is not a GGUF file (it does not start with GGUF)."
            )
        self.source_path = path
        return str(path)

    def clean_upload(self) -> Any:
        upload = self.cleaned_data["upload"]
        if upload is None:
            return None
        limit = settings.MLXWEB_MAX_UPLOAD_BYTES
        if upload.size > limit:
            raise forms.ValidationError(
                f"{upload.name} is {filesizeformat(upload.size)}, larger than the upload limit "
                f"({filesizeformat(limit)}): import it by path instead.",
                code="too_large",
            )
        upload.seek(0)
        if upload.read(len(services.GGUF_MAGIC)) != services.GGUF_MAGIC:
            raise forms.ValidationError(
                f"{upload.name} is not a GGUF file (it does not start with GGUF)."
            )
        return upload

    def clean_bits(self) -> int | None:
        bits = self.cleaned_data["bits"]
        return None if bits == KEEP_BITS else int(bits)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        path, upload = data.get("path"), data.get("upload")
        if path and upload:
            self.add_error("path", "Give a path or upload a file, not both.")
            return data
        if not path and not upload:
            self.add_error("path", "Give the path of a GGUF file, or upload one.")
            return data
        if not data.get("name"):
            file_name = Path(path).name if path else str(getattr(upload, "name", ""))
            suffix = f"{data['bits']}bit" if data.get("bits") else "mlx"
            data["name"] = services.default_model_name(Path(file_name).stem, suffix)
        try:
            data["name"] = _check_new_name(data["name"])
        except forms.ValidationError as e:
            self.add_error("name", e)
        return data

    def job_params(
        self, *, source: Path | None = None, uploaded_as: str | None = None
    ) -> dict[str, Any]:
        """The job's parameters; an upload's `source` and `uploaded_as` come from
        `services.upload_accept`, once the view has moved the file on."""
        data = self.cleaned_data
        bits = data["bits"]
        return {
            "source": str(source) if source is not None else data["path"],
            "name": data["name"],
            "bits": bits,
            "group_size": data["group_size"],
            "uploaded_as": uploaded_as,
        }


class ValidateForm(_SourceForm):
    """Compare a model made here with what it was made from."""

    n_tokens = forms.IntegerField(
        label="Tokens per answer",
        min_value=1,
        max_value=256,
        initial=32,
        help_text="Each prompt's greedy answer is compared over this many tokens.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "source" not in data:
            return data
        source = self.source_model
        if source.is_embedding:
            self.add_error("source", _embedding_refusal(source, "validated"))
        elif not source.is_mlx:
            self.add_error("source", f"{source.name} is not an MLX model.")
        elif services.library_source_record(path=source.path) is None:
            self.add_error(
                "source",
                f"{source.name} was not imported, converted or quantized here, so there is no "
                "record of its source to compare it with.",
            )
        return data

    def job_params(self) -> dict[str, Any]:
        return {"source": self.cleaned_data["source"], "n_tokens": self.cleaned_data["n_tokens"]}


EXPORT_TYPE_CHOICES = [
    ("q8_0", "Q8_0: 8-bit blocks, close to the source"),
    ("q4_0", "Q4_0: 4-bit blocks, smallest (embeddings stay Q8_0)"),
    ("f16", "F16: 16-bit floats, as exact as the source allows"),
]


class ExportGGUFForm(_SourceForm):
    """Export a model folder as a GGUF file for llama.cpp, into the models folder."""

    file_type = forms.ChoiceField(choices=EXPORT_TYPE_CHOICES, initial="q8_0", label="Type")
    path = forms.CharField(
        required=False,
        max_length=1000,
        label="File",
        widget=forms.TextInput(attrs={"placeholder": "my-model-Q8_0.gguf"}),
        help_text="A .gguf file name in the models folder (or one of its folders); made up "
        "if empty.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "source" not in data or "file_type" not in data:
            return data
        source = self.source_model
        if source.source == LibraryModel.Source.GGUF:
            self.add_error("source", f"{source.name} is a GGUF file already.")
        elif not source.loadable:
            self.add_error("source", f"mlx-lm cannot load {source.name}: {source.load_problem}")
        elif source.model_type not in services.EXPORTABLE_MODEL_TYPES:
            self.add_error(
                "source",
                f"{source.name} is a {source.model_type or 'model of unknown type'}: the GGUF "
                "export knows llama-family (Llama, Mistral, SmolLM2) and Gemma 3 models.",
            )
        if self.errors:
            return data
        path = data.get("path") or services.gguf_export_default_name(
            source.name, data["file_type"]
        )
        try:
            data["path"] = str(services.gguf_export_path(path))
        except services.LibraryError as e:
            self.add_error("path", str(e))
        return data

    def job_params(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {"source": data["source"], "path": data["path"], "file_type": data["file_type"]}


class DeleteForm(_SourceForm):
    """Delete a model from disk."""

    def job_params(self) -> dict[str, Any]:
        return {"path": self.cleaned_data["source"], "repo_id": self.source_model.repo_id}
