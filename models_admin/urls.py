from __future__ import annotations

from django.urls import path

from models_admin import views

app_name = "models_admin"

urlpatterns = [
    path("", views.index, name="index"),
    path("pull/", views.pull, name="pull"),
    path("import/", views.import_gguf, name="import_gguf"),
    path("<uuid:code>/convert/", views.convert, name="convert"),
    path("<uuid:code>/quantize/", views.quantize, name="quantize"),
    path("<uuid:code>/validate/", views.validate, name="validate"),
    path("<uuid:code>/export-gguf/", views.export_gguf, name="export_gguf"),
    path("<uuid:code>/delete/", views.delete, name="delete"),
    path("memory/", views.memory_panel, name="memory"),
    path("jobs/<uuid:code>/", views.job_detail, name="job_detail"),
    path("jobs/<uuid:code>/progress/", views.job_progress, name="job_progress"),
    path("jobs/<uuid:code>/cancel/", views.job_cancel, name="job_cancel"),
    path("jobs/<uuid:code>/retry/", views.job_retry, name="job_retry"),
]
