from __future__ import annotations

from django.urls import path

from inference.api import views

app_name = "api"

urlpatterns = [
    path("settings/keys/", views.keys, name="keys"),
    path("settings/keys/<uuid:code>/revoke/", views.key_revoke, name="key_revoke"),
    path("health", views.health, name="health"),
    path("metrics", views.metrics, name="metrics"),
]
