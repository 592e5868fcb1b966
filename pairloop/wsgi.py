"""WSGI entry point for the HTTP-only tier (gunicorn), the leanest path for labeling traffic.
WebSockets (live updates) are served by the ASGI app in pairloop/asgi.py. A request body over its cap is
refused with 413 before it is read (pairloop/middleware.py)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
from pairloop.middleware import body_limit_wsgi  # noqa: E402

application = body_limit_wsgi(get_wsgi_application())
