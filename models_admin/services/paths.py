"""Path policy of the library: which folders it may read, write, delete and import from, how a
new model's folder is named.

Everything a job writes into the models folder is first written to `.staging-<job code>` (by
inference.weights.convert, given the job's code as the tag) and renamed into place at the end,
so a cancelled or failed job leaves no half-written model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from inference import services as inference_services
from models_admin.progress import JobCancelled, JobError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
NAME_RE = re.compile(NAME_PATTERN)
GGUF_MAGIC = inference_services.GGUF_MAGIC


class LibraryError(Exception):
    """A model reference that names nothing in the library, or a refused path."""


class PathRefused(LibraryError):
    """A path the library may not use: outside the models folder and the Hugging Face cache
    (or the import folders), or one that cannot be made absolute (`~user` of no such user)."""


def _absolute(path: str | Path) -> Path:
    """`path` with `~` expanded and made absolute, links not resolved."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError as e:  # `~someone` for a user this machine does not know
        raise PathRefused(f"{path} names a home folder that does not exist: refused.") from e
    return Path(os.path.abspath(expanded))


def library_roots() -> list[Path]:
    """The folders the library may read, write and delete in."""
    return [Path(settings.MLXWEB_MODELS_DIR), Path(settings.MLXWEB_HF_CACHE)]


def library_check_path(*, path: str | Path) -> Path:
    """`path` made absolute if it lies inside an allowed folder (links resolved); else refused."""
    candidate = _absolute(path)
    real = Path(os.path.realpath(candidate))
    for root in library_roots():
        root_real = Path(os.path.realpath(root))
        if real != root_real and root_real in real.parents:
            return candidate
    models_dir, cache = library_roots()
    raise PathRefused(
        f"{path} is outside the models folder ({models_dir}) and the Hugging Face cache "
        f"({cache}): refused."
    )


def import_roots() -> list[Path]:
    """The folders GGUF files may be imported from: the library's and the configured ones."""
    return library_roots() + [Path(p) for p in settings.MLXWEB_IMPORT_DIRS]


def library_check_import_path(*, path: str | Path) -> Path:
    """`path` made absolute if it is a file inside a folder GGUFs may be imported from (links
    resolved, as for every library path); else PathRefused or LibraryError, saying why."""
    candidate = _absolute(path)
    real = Path(os.path.realpath(candidate))
    roots = import_roots()
    if not any(Path(os.path.realpath(root)) in real.parents for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise PathRefused(
            f"{path} is outside the folders GGUF files may be imported from ({allowed}): "
            "refused. Add its folder to library.import_dirs in configs/server.yaml to allow it."
        )
    if not real.is_file():
        raise LibraryError(f"{path} is not a file.")
    return candidate


def has_gguf_magic(path: Path) -> bool:
    """Whether the file starts with the bytes every GGUF file starts with."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def in_hf_cache(path: Path) -> bool:
    """Whether `path` (links resolved) lies in the Hugging Face cache."""
    cache = Path(os.path.realpath(settings.MLXWEB_HF_CACHE))
    return cache in Path(os.path.realpath(path)).parents


def new_model_path(name: str) -> Path:
    """Where a new model called `name` goes in the models folder; JobError if the name is not
    a usable folder name or is taken."""
    if not NAME_RE.match(name) or name in {".", ".."}:
        raise JobError(
            f"{name!r} is not a usable folder name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters."
        )
    path = Path(settings.MLXWEB_MODELS_DIR) / name
    if path.exists() or path.is_symlink():
        raise JobError(f"A model named {name!r} already exists in the models folder.")
    return path


def existing_model_dir(source: str) -> Path:
    """The model folder `source` names, checked to be in the library; else JobError."""
    try:
        path = library_check_path(path=source)
    except PathRefused as e:
        raise JobError(str(e)) from e
    if not (path / "config.json").is_file():
        raise JobError(f"{source} is not a model folder (no config.json).")
    return path


@contextmanager
def weights_errors(dest: Path) -> Iterator[None]:
    """What the weights layer raises, as the job's errors: a cancel, a file it cannot read, and
    a model of the same name that appeared while the job wrote into its staging folder."""
    try:
        yield
    except inference_services.ConversionCancelled as e:
        raise JobCancelled() from e
    except inference_services.GGUFError as e:
        raise JobError(str(e)) from e
    except FileExistsError as e:
        raise JobError(f"A model named {dest.name!r} appeared while this job ran.") from e


def default_model_name(source_name: str, suffix: str) -> str:
    """A folder name for a new model: the source's last path part with a suffix, made safe."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", source_name.split("/")[-1].split("@")[0])
    base = base.strip("-._") or "model"
    return f"{base[: 99 - len(suffix)]}-{suffix}" if suffix else base[:100]
