"""A database that is briefly down (a restart, a failover) answers 503 with a retry message, never a traceback."""

from __future__ import annotations

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.template.loader import render_to_string

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


class DatabaseUnavailableMiddleware:
    """Turns a lost database connection into 503 + Retry-After; htmx pages show the message in place
    (static/pairloop/app.js). Submits are idempotent, so sending the same choice again is safe."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        log.warning("database unavailable for %s %s: %s", request.method, request.path, exception)
        htmx = request.headers.get("HX-Request") == "true"
        # Rendered without the request: the context processors would ask the database for the user.
        body = render_to_string("db_unavailable.html", {"fragment": htmx, "retry": RETRY_AFTER_SECONDS})
        response = HttpResponse(body, status=503)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
