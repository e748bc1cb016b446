from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class LibraryModel(models.Model):
    """One model on this machine, as last seen on disk by `services.library_scan()`.

    The disk is the truth: rows are created, refreshed and removed by scans. A row exists so that
    the page and the admin list the same objects and URLs can address a model by its `code`.
    """

    class Source(models.TextChoices):
        MODELS_DIR = "models_dir", "models folder"
        HF_CACHE = "hf_cache", "Hugging Face cache"
        GGUF = "gguf", "GGUF file"

    class Task(models.TextChoices):
        GENERATE = "generate", "generates text"
        EMBED = "embed", "embedding"

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=300)
    source = models.CharField(max_length=16, choices=Source.choices)
    path = models.CharField(max_length=1000, unique=True)
    # The id the chat and the worker know it by (blank if the catalogue does not list it).
    model_id = models.CharField(max_length=100, blank=True)
    repo_id = models.CharField(max_length=200, blank=True)
    revision = models.CharField(max_length=64, blank=True)

    # What the model is for: chat and completions, or sentence vectors (a sentence-transformers
    # folder). It decides which loader judges `loadable` and which actions the page offers.
    task = models.CharField(max_length=16, choices=Task.choices, default=Task.GENERATE)
    architecture = models.CharField(max_length=100, blank=True)
    model_type = models.CharField(max_length=100, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    quant_bits = models.PositiveSmallIntegerField(null=True, blank=True)
    quant_group_size = models.PositiveSmallIntegerField(null=True, blank=True)
    # "mixed" when layers have different bit widths, else the quantization mode or the file type.
    quant_detail = models.CharField(max_length=50, blank=True)
    dtype = models.CharField(max_length=20, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    is_mlx = models.BooleanField(default=False, help_text="saved by MLX (mlx-lm's layout)")
    loadable = models.BooleanField(
        default=False, help_text="mlx-lm (the embedding loader, for an embedding model) can load it"
    )
    load_problem = models.CharField(max_length=300, blank=True)
    has_chat_template = models.BooleanField(default=False)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    # The newest reply requested from it in the chat (from the inference app's rows, at scan).
    last_used_at = models.DateTimeField(null=True, blank=True)

    # Sizes and modification times of the files, to skip re-reading unchanged models.
    signature = models.CharField(max_length=100, blank=True)
    modified_at = models.DateTimeField(null=True, blank=True)
    first_seen_at = models.DateTimeField(default=timezone.now)
    scanned_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name = "library model"

    def __str__(self) -> str:
        return self.name

    @property
    def is_embedding(self) -> bool:
        """An embedding model: no chat, and none of mlx-lm's convert, quantize or validate."""
        return self.task == self.Task.EMBED

    @property
    def quantization(self) -> str:
        if self.quant_bits is None:
            return self.quant_detail or self.dtype or ""
        if self.quant_detail.startswith("mixed"):
            text = f"{self.quant_detail}-bit"
        else:
            text = f"{self.quant_bits}-bit"
        if self.quant_group_size:
            text += f", group {self.quant_group_size}"
        if self.quant_detail and not self.quant_detail.startswith("mixed"):
            text += f" ({self.quant_detail})"
        return text


class ModelJob(models.Model):
    """One library job (pull, convert, quantize, delete, ...): its request, progress and outcome.

    The row is the record: the Celery message only carries the code. Progress, the log tail and
    a heartbeat are written by the process running the job about once a second.
    """

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Unit(models.TextChoices):
        BYTES = "bytes"
        STEPS = "steps"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    RETRYABLE_STATES = (State.FAILED, State.CANCELLED)
    LOG_TAIL_LINES = 200

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # A registered kind (see models_admin.services.jobs); no choices: a new kind needs no migration.
    kind = models.CharField(max_length=32)
    title = models.CharField(max_length=300, blank=True)
    params = models.JSONField(default=dict)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    retry_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )

    step = models.CharField(max_length=300, blank=True)
    done = models.BigIntegerField(default=0)
    total = models.BigIntegerField(null=True, blank=True)
    unit = models.CharField(max_length=8, choices=Unit.choices, default=Unit.STEPS)
    speed = models.FloatField(null=True, blank=True, help_text="units per second")
    eta_seconds = models.FloatField(null=True, blank=True)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)

    cancel_requested = models.BooleanField(default=False)
    # The Celery task id of the message allowed to run this job, and who ran it.
    task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state"])]

    def __str__(self) -> str:
        return f"{self.title or self.kind} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def is_retryable(self) -> bool:
        return self.state in self.RETRYABLE_STATES

    @property
    def can_retry(self) -> bool:
        """Retryable, and not already being retried."""
        return self.is_retryable and not self.retries.filter(state__in=self.ACTIVE_STATES).exists()

    @property
    def percent(self) -> float | None:
        if not self.total:
            return 100.0 if self.state == self.State.SUCCEEDED else None
        return max(0.0, min(100.0, 100.0 * self.done / self.total))

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()

    @property
    def log_lines(self) -> list[str]:
        return self.log.splitlines()
