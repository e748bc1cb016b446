from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from chat.urls import auth_urlpatterns
from inference.api import ollama, openai
from models_admin.api import router as library_api

# Ollama's /api/pull and /api/delete are model library jobs (models_admin); the rest of the
# Ollama-compatible API is the inference app's.
ollama.api.add_router("", library_api)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("models/", include("models_admin.urls")),
    path("v1/", openai.api.urls),
    path("api/", ollama.api.urls),
    path("", include("inference.api.urls")),
    path("", include("chat.urls")),
    *auth_urlpatterns,
]
