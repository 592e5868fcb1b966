"""WSGI entry point for the HTTP-only tier (gunicorn), the leanest path for labeling traffic.
WebSockets (live updates) are served by the ASGI app in pairloop/asgi.py."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
application = get_wsgi_application()
