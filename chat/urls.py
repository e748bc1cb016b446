from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from chat import views, views_presets, views_provenance, views_transfer

app_name = "chat"
REPLY = "c/<uuid:code>/r/<uuid:reply>/"

urlpatterns = [
    path("", views.index, name="index"),
    path("c/new/", views.conversation_create, name="create"),
    path("c/<uuid:code>/", views.conversation_detail, name="detail"),
    path("c/<uuid:code>/earlier/", views.conversation_earlier, name="earlier"),
    path("c/<uuid:code>/send/", views.conversation_send, name="send"),
    path("c/<uuid:code>/rename/", views.conversation_rename, name="rename"),
    path("c/<uuid:code>/delete/", views.conversation_delete, name="delete"),
    path("c/<uuid:code>/replies/<uuid:reply>/stop/", views.reply_stop, name="stop"),
    path("c/<uuid:code>/pin/", views.conversation_pin, name="pin"),
    path("c/<uuid:code>/m/<uuid:message>/regenerate/", views.message_regenerate, name="regenerate"),
    path("c/<uuid:code>/m/<uuid:message>/continue/", views.message_continue, name="continue"),
    path("c/<uuid:code>/m/<uuid:message>/switch/", views.branch_switch, name="switch"),
    path("c/<uuid:code>/m/<uuid:message>/edit/", views.message_edit, name="edit"),
    path("c/<uuid:code>/m/<uuid:message>/delete/", views.message_delete, name="delete_message"),
    path("c/<uuid:code>/m/<uuid:message>/fork/", views.conversation_fork, name="fork"),
    path("c/<uuid:code>/tools/<uuid:step>/", views.tool_decide, name="tool"),
    path("c/<uuid:code>/tools/<uuid:step>/files/<int:index>/", views.tool_file, name="tool_file"),
    # Search, export and import (chat.views_transfer).
    path("search/", views_transfer.search, name="search"),
    path("c/<uuid:code>/export/<str:kind>/", views_transfer.conversation_export, name="export"),
    path("export/", views_transfer.export_all, name="export_all"),
    path("import/", views_transfer.transfer_page, name="transfer"),
    # Presets, a conversation's settings panel and the composer's meter (chat.views_presets).
    path("presets/", views_presets.preset_list, name="presets"),
    path("presets/new/", views_presets.preset_create, name="preset_create"),
    path("presets/<str:name>/edit/", views_presets.preset_edit, name="preset_edit"),
    path("presets/<str:name>/delete/", views_presets.preset_delete, name="preset_delete"),
    path("c/<uuid:code>/settings/", views_presets.conversation_settings, name="settings"),
    path("c/<uuid:code>/meter/", views_presets.conversation_meter, name="meter"),
    # A reply's details, replay, compare and token fork (chat.views_provenance).
    path(f"{REPLY}prompt/", views_provenance.reply_prompt, name="reply_prompt"),
    path(f"{REPLY}tokens/", views_provenance.reply_tokens, name="reply_tokens"),
    path(f"{REPLY}fork/", views_provenance.reply_fork, name="reply_fork"),
    path(f"{REPLY}replay/", views_provenance.reply_replay, name="reply_replay"),
    path(f"{REPLY}replay/choose/", views_provenance.reply_replay_form, name="reply_replay_form"),
    path(f"{REPLY}compare/", views_provenance.reply_compare, name="reply_compare"),
]

auth_urlpatterns = [
    path("login/", views.login, name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
]
