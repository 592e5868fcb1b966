"""ASGI entry point: HTTP through Django, WebSockets through Channels (daphne or uvicorn serve it); a request
body over its cap is refused with 413 before it is read (pairloop/middleware.py), daphne's included."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from pairloop.middleware import BodyLimitASGI, install_daphne_body_limit  # noqa: E402
from pairloop.routing import websocket_urlpatterns  # noqa: E402

install_daphne_body_limit()

application = ProtocolTypeRouter(
    {
        "http": BodyLimitASGI(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
