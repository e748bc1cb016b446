from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from models_admin.models import LibraryModel, ModelJob


@admin.register(LibraryModel)
class LibraryModelAdmin(admin.ModelAdmin):
    """The library as last scanned; the disk is the truth, so rows are read-only here."""

    list_display = (
        "name",
        "source",
        "architecture",
        "parameter_count",
        "quantization",
        "size_bytes",
        "loadable",
        "has_chat_template",
        "last_used_at",
        "model_id",
    )
    list_filter = ("source", "loadable", "has_chat_template", "is_mlx")
    search_fields = ("name", "path", "repo_id", "model_id", "architecture")
    readonly_fields = [f.name for f in LibraryModel._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(ModelJob)
class ModelJobAdmin(admin.ModelAdmin):
    """Job records. Start, cancel and retry jobs from the Models page, which enqueues them."""

    list_display = ("title", "kind", "state", "percent", "created_by", "created_at", "finished_at")
    list_filter = ("kind", "state")
    search_fields = ("title", "code", "error")
    readonly_fields = [f.name for f in ModelJob._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
