"""Request bodies over their cap are refused with 413 before they are read, on the real servers that
docs/operations.md runs (daphne for ASGI, gunicorn for WSGI): a declared Content-Length at once, a chunked body as soon as
it passes the cap, and the server's memory does not grow by the body."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import psutil
import pytest
import requests

from api.actions import create_token
from tests.conftest import make_campaign, make_user
from tests.services import SERVERS, database_url, serve_app

MiB = 1024 * 1024
UPLOAD_CAP = 8 * MiB  # the servers' PAIRLOOP_MAX_UPLOAD_BYTES; elsewhere the default 5 MiB holds


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request, django_db_setup, django_db_blocker):
    from django.db import connection

    with django_db_blocker.unblock():
        url_of_db = database_url(connection.settings_dict)
    with serve_app(url_of_db, request.param, PAIRLOOP_MAX_UPLOAD_BYTES=str(UPLOAD_CAP)) as served:
        yield request.param, served.port, served.process


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/v1/campaigns/shop/pairs", "/api/v1/campaigns/shop/imports",
                                  "/campaigns/shop/import/", "/accounts/login/"])
def test_it_refuses_a_300_mb_content_length_before_the_body_is_sent(server, path):
    _, port, _ = server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head(path, {"Content-Length": str(300 * MiB), "Content-Type": "application/json"}))
        answer = _answer(sock)  # not one byte of the body was sent: a server waiting for it times out here
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5


def _send_chunked_until_answered(port: int, path: str, limit: int) -> tuple[bytes, int]:
    """Sends 1 MiB chunks until the server answers (or `limit` bytes went); the answer and the bytes sent."""
    chunk = b"x" * MiB
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(_head(path, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}))
        while sent < limit:
            if select.select([sock], [], [], 0)[0]:
                return _answer(sock), sent
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        if sent >= limit:
            sock.sendall(b"0\r\n\r\n")
        return _answer(sock), sent


@pytest.mark.django_db(transaction=True)
def test_it_stops_reading_a_chunked_body_once_it_passes_the_cap(server):
    name, port, process = server
    path = "/api/v1/campaigns/shop/pairs"  # no token: refused anyway, but only once the body is read
    _send_chunked_until_answered(port, path, 1 * MiB)  # warm up: the URL resolver, the API's imports
    before = psutil.Process(process.pid).memory_info().rss
    answer, sent = _send_chunked_until_answered(port, path, 96 * MiB)
    grown = psutil.Process(process.pid).memory_info().rss - before
    if name == "daphne":
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"PAIRLOOP_MAX_REQUEST_BYTES" in answer
    else:  # Django reads no body without a Content-Length under WSGI: the token is refused at once
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent < 96 * MiB  # answered while the body was still coming
    assert grown < 24 * MiB, f"the server grew by {grown / MiB:.0f} MiB"


@pytest.mark.django_db(transaction=True)
def test_it_takes_an_upload_under_the_import_cap_it_was_given_and_refuses_one_over(server):
    _, port, _ = server
    admin = make_user("ada-admin", is_staff=True, is_superuser=True)
    make_campaign("shop")
    token = create_token(admin, "uploads", ["import"])[1]
    row = '{"prompt": "%d?", "response_a": "%s", "response_b": "b"}\n'
    jsonl = "".join(row % (i, "a" * 1000) for i in range(6 * 1024)).encode()  # 6 MiB: over the 5 MiB elsewhere
    auth = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}/api/v1/campaigns/shop"
    upload = requests.post(f"{base}/imports", headers=auth, files={"file": ("pairs.jsonl", jsonl)}, timeout=60)
    assert upload.status_code == 202, upload.text
    assert upload.json()["file_name"] == "pairs.jsonl"
    over = jsonl * 2  # 12 MiB: past the 8 MiB this server was given, so the setting is the one in force
    refused = requests.post(f"{base}/imports", headers=auth, files={"file": ("big.jsonl", over)}, timeout=60)
    assert refused.status_code == 413 and "PAIRLOOP_MAX_UPLOAD_BYTES" in refused.text, refused.text[:300]
    as_json = requests.post(f"{base}/pairs", headers={**auth, "Content-Type": "application/json"},
                            data=b'{"rows": [' + b"0," * (3 * MiB) + b"0]}", timeout=60)
    assert as_json.status_code == 413 and "PAIRLOOP_MAX_REQUEST_BYTES" in as_json.json()["detail"]


def test_the_asgi_wrapper_stops_pulling_a_body_past_the_cap(settings):
    from pairloop.asgi import application

    pulled, sent = [], []

    async def receive():
        pulled.append(MiB)
        return {"type": "http.request", "body": b"x" * MiB, "more_body": len(pulled) < 300}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/accounts/login/", "raw_path": b"/accounts/login/",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5000), "headers": [(b"host", b"127.0.0.1")], "http_version": "1.1",
             "asgi": {"version": "3.0"}}
    asyncio.run(application(scope, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
    assert sum(pulled) <= settings.MAX_REQUEST_BYTES + MiB
