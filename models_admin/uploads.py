"""GGUF uploads, streamed straight into the models folder's upload area.

Django's default handlers would spool a big upload into the temporary folder, and the view would
copy it again into the models folder. `GGUFUploadHandler` writes the `upload` field's bytes to
`<models folder>/.uploads/<uuid>.part` as they arrive instead, stops reading the body at the
first chunk that does not start with the GGUF magic bytes or goes past the size limit, and
removes what it wrote unless the view claims the file (a rename keeps it on the same disk). It
must be installed before the request body is read, so the view that uses it is CSRF-exempt and
checks CSRF itself after installing it (the pattern Django's documentation gives for upload
handlers).

On this route the ASGI handler (`mlxweb.asgi.StreamingUploadASGIHandler`) does not spool the body
either: the chunks reach this handler as the client sends them, so the file is written once.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import IO, Any

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile, StopUpload
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat

from models_admin.services.paths import GGUF_MAGIC

FIELD_NAME = "upload"


class GGUFUpload(UploadedFile):
    """An uploaded GGUF file, already on disk at `path` (the form reads its first bytes)."""

    def __init__(self, *, path: Path, name: str, size: int, content_type: str | None) -> None:
        self.path = path
        super().__init__(
            file=path.open("rb"), name=name, content_type=content_type, size=size, charset=None
        )


class GGUFUploadHandler(FileUploadHandler):
    """Writes the `upload` file field into `directory`; other file fields are skipped.

    After the body is parsed, `problem` says why the file was refused (`too_large`, not a
    GGUF, cut short), if it was. `discard()` removes the file unless `claim()` was called.
    """

    def __init__(self, request: HttpRequest, *, directory: Path, max_bytes: int) -> None:
        super().__init__(request)
        self.directory = directory
        self.max_bytes = max_bytes
        self.problem = ""
        self.too_large = False
        self.path: Path | None = None
        self._file: IO[bytes] | None = None
        self._head = b""
        self._claimed = False

    def new_file(self, field_name: str, file_name: str, *args: Any, **kwargs: Any) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if field_name != FIELD_NAME or self.path is not None:
            raise SkipFile()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{uuid.uuid4()}.part"
        self._file = self.path.open("wb")

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        assert self._file is not None
        if len(self._head) < len(GGUF_MAGIC):
            self._head += raw_data[: len(GGUF_MAGIC) - len(self._head)]
            if not GGUF_MAGIC.startswith(self._head):
                self._refuse(f"{self.file_name} is not a GGUF file (it does not start with GGUF).")
                # Reading the rest would only be thrown away: stop reading the body here.
                raise StopUpload(connection_reset=True)
        if start + len(raw_data) > self.max_bytes:
            self.too_large = True
            self._refuse(
                f"{self.file_name} is larger than the upload limit, "
                f"{filesizeformat(self.max_bytes)}: put it in a folder GGUF files may be "
                "imported from and import it by path."
            )
            raise StopUpload(connection_reset=True)
        self._file.write(raw_data)
        return None

    def file_complete(self, file_size: int) -> GGUFUpload | None:
        if self._file is None or self.path is None or self.problem:
            return None
        self._file.close()
        self._file = None
        if len(self._head) < len(GGUF_MAGIC):
            self._refuse(f"{self.file_name} is not a GGUF file (it is too short).")
            return None
        return GGUFUpload(
            path=self.path,
            name=str(self.file_name),
            size=file_size,
            content_type=self.content_type,
        )

    def upload_interrupted(self) -> None:
        # The body ended inside the file.
        if self.path is not None and not self.problem:
            self._refuse(f"The upload of {self.file_name} did not finish.")

    def claim(self) -> None:
        """The view took the file (moved it on): `discard` leaves it alone."""
        self._claimed = True

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None and not self._claimed:
            self.path.unlink(missing_ok=True)

    def _refuse(self, problem: str) -> None:
        self.problem = problem
        self.discard()
