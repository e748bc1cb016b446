from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from chat.urls import auth_urlpatterns

urlpatterns = [
    path("admin/", admin.site.urls),
    path("models/", include("models_admin.urls")),
    path("", include("chat.urls")),
    *auth_urlpatterns,
]
