from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from chat import views, views_transfer

app_name = "chat"

urlpatterns = [
    path("", views.index, name="index"),
    path("c/new/", views.conversation_create, name="create"),
    path("c/<uuid:code>/", views.conversation_detail, name="detail"),
    path("c/<uuid:code>/send/", views.conversation_send, name="send"),
    path("c/<uuid:code>/rename/", views.conversation_rename, name="rename"),
    path("c/<uuid:code>/delete/", views.conversation_delete, name="delete"),
    path("c/<uuid:code>/replies/<uuid:reply>/stop/", views.reply_stop, name="stop"),
    path("c/<uuid:code>/tools/<uuid:step>/", views.tool_decide, name="tool"),
    path("c/<uuid:code>/tools/<uuid:step>/files/<int:index>/", views.tool_file, name="tool_file"),
    # Search, export and import (chat.views_transfer).
    path("search/", views_transfer.search, name="search"),
    path("c/<uuid:code>/export/<str:kind>/", views_transfer.conversation_export, name="export"),
    path("export/", views_transfer.export_all, name="export_all"),
    path("import/", views_transfer.transfer_page, name="transfer"),
]

auth_urlpatterns = [
    path("login/", views.login, name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
]
