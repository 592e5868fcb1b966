"""Guards at the door of every request: a body over its cap is refused with 413 before it is read, and a
database that is briefly down (a restart, a failover) answers 503 with a retry message, never a traceback."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import unquote

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.template.loader import render_to_string
from django.urls import Resolver404, resolve

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


# Request bodies over the cap are refused with 413 before they are read: by their Content-Length at
# once, else (a chunked body) as soon as the bytes read pass the cap. Three doors, one rule (body_cap):
# daphne's request (Twisted reads a whole body, to a temp file, before the app sees any of it, then hands
# it to the app at once), an ASGI wrapper for other ASGI servers, and a WSGI wrapper for gunicorn.
UPLOAD_URL_NAMES = {"import_pairs", "api:import_upload"}
LINGER_SECONDS = 5  # after a 413, the rest of the body is read and dropped this long, so the client sees it


def body_cap(path: str) -> tuple[int, str]:
    """The largest request body accepted at `path` and the setting it comes from: an import upload's
    PAIRLOOP_MAX_UPLOAD_BYTES (plus the form around the file), PAIRLOOP_MAX_REQUEST_BYTES elsewhere."""
    try:
        match = resolve(path)
    except Resolver404:
        match = None
    if match is not None and match.view_name in UPLOAD_URL_NAMES:
        from annotate.transfer import CappedUpload  # annotate's models: wsgi.py loads this module before them

        return settings.PAIRLOOP["MAX_UPLOAD_BYTES"] + CappedUpload.FORM_SLACK, "PAIRLOOP_MAX_UPLOAD_BYTES"
    return settings.PAIRLOOP["MAX_REQUEST_BYTES"], "PAIRLOOP_MAX_REQUEST_BYTES"


def too_large(path: str) -> tuple[str, bytes]:
    """The 413 answer's content type and body for `path`: JSON under the API, plain text elsewhere."""
    from annotate.transfer import readable_size  # annotate's models: wsgi.py loads this module before them

    cap, setting = body_cap(path)
    detail = f"The request body is larger than the limit of {readable_size(cap)} here ({setting}): nothing was read."
    if path.startswith("/api/"):
        return "application/json", json.dumps({"detail": detail}).encode()
    return "text/plain; charset=utf-8", detail.encode()


def declared_length(value: str | bytes | None) -> int | None:
    """A Content-Length header's value as a number; None when absent or not a plain number."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return int(text) if text.strip().isdigit() else None


class BodyLimitASGI:
    """ASGI wrapper: answers 413 for a declared Content-Length over the cap without reading a byte, and
    stops reading a body that passes the cap (Django then sees a disconnect and answers nothing)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        cap, _ = body_cap(path)
        length = declared_length(dict(scope.get("headers") or ()).get(b"content-length"))
        if length is not None and length > cap:
            return await self._refuse(path, send)
        state = {"read": 0, "refused": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > cap:
                    state["refused"] = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, send)
        if state["refused"]:
            await self._refuse(path, send)

    @staticmethod
    async def _refuse(path: str, send) -> None:
        content_type, body = too_large(path)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def body_limit_wsgi(app):
    """WSGI wrapper: 413 for a declared Content-Length over the cap, before the app runs. A body without
    one (chunked) is never read by Django under WSGI (it reads CONTENT_LENGTH bytes, none here)."""

    def limited(environ, start_response):
        path = environ.get("PATH_INFO", "")
        length = declared_length(environ.get("CONTENT_LENGTH"))
        if length is not None and length > body_cap(path)[0]:
            content_type, body = too_large(path)
            start_response("413 Content Too Large", [("Content-Type", content_type),
                                                     ("Content-Length", str(len(body))), ("Connection", "close")])
            return [body]
        return app(environ, start_response)

    return limited


def install_daphne_body_limit() -> None:
    """Makes daphne build its requests from BodyLimitedRequest (daphne has no body limit of its own)."""
    from daphne import http_protocol  # daphne (and Twisted) only where daphne serves, never under gunicorn

    if getattr(http_protocol.WebRequest, "body_limited", False):
        return
    base = http_protocol.WebRequest

    class BodyLimitedRequest(base):
        """daphne's request, refusing a body over the cap as its headers arrive or as it grows, before
        Twisted stores it or daphne passes it on."""

        body_limited = True

        def gotLength(self, length):  # noqa: N802 (Twisted's name)
            self.body_read, self.body_refused = 0, False
            raw_path = getattr(self.channel, "_path", b"/").split(b"?", 1)[0]
            self.body_path = unquote(raw_path.decode("latin-1"))
            self.body_cap = body_cap(self.body_path)[0]
            if length is not None and length > self.body_cap:
                return self._refuse_body()
            super().gotLength(length)

        def handleContentChunk(self, data):  # noqa: N802 (Twisted's name)
            if self.body_refused:
                return
            self.body_read += len(data)
            if self.body_read > self.body_cap:
                return self._refuse_body()
            super().handleContentChunk(data)

        def process(self):
            if self.body_refused:
                return None
            return super().process()

        def _refuse_body(self):
            from twisted.internet import reactor  # importing it installs a reactor: only inside daphne's

            self.body_refused = True
            self.content = io.BytesIO()
            content_type, body = too_large(self.body_path)
            channel = self.channel
            transport = channel.transport
            transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Type: " + content_type.encode()
                            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                            + body)
            # Read and drop what the client still sends for a while (so it reads the answer rather than
            # a reset), then close; nothing more is parsed or kept.
            channel.dataReceived = lambda data: None
            transport.loseWriteConnection()
            reactor.callLater(LINGER_SECONDS, transport.loseConnection)

    http_protocol.WebRequest = BodyLimitedRequest
