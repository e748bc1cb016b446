"""ASGI entry point: HTTP through the body limits into Django, websockets through the chat
consumers, and the inference worker's named channel (served in-process by `manage.py serve`, or by
`manage.py inference_worker` when scaled out over Redis)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

import chat.routing  # noqa: E402
from inference.worker import InferenceWorker  # noqa: E402
from mlxweb.bodylimit import BodyLimitMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(chat.routing.websocket_urlpatterns))
        ),
        "channel": ChannelNameRouter({settings.INFERENCE_CHANNEL: InferenceWorker.as_asgi()}),
    }
)
