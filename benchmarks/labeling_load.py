#!/usr/bin/env python
"""Labeling load: N simulated labelers over real HTTP against pairloop on PostgreSQL.

What it does, top to bottom:
  1. creates its own database (default `pairloop_bench`, dropped and made anew), migrates it, and
     seeds labelers and one campaign of --pairs pairs with bulk SQL (INSERT ... SELECT
     generate_series: 10 pairs per prompt, all pairs of 5 responses, as an import of `responses`
     lists makes them), then VACUUM ANALYZE;
  2. starts the server itself on a loopback port: gunicorn (WSGI, `pairloop.wsgi:application`,
     --workers sync workers) or, with --server asgi, one daphne process per worker (ASGI);
  3. logs every labeler in through /accounts/login/ (real session and CSRF cookies);
  4. runs the loads, each for --duration seconds after a --warmup that is not measured:
     saturation (every labeler submits again as soon as its answer arrives) and human pace (each
     labeler submits once every --pace seconds, start times spread evenly). Each judgment is ONE
     round trip: POST .../judge/ answers with the next pair's fragment (as htmx swaps it in), and
     the next assignment id is read from it. With --path api the labelers use the HTTP API instead,
     each with its own token: POST /api/v1/.../judgment?next=true answers with the next pair as JSON;
  5. prints p50/p95/p99 latency, judgments per second, CPU per judgment (server processes,
     PostgreSQL backends, this client), and an integrity check: stored judgments equal confirmed
     submits, no pair over k, no labeler twice on a pair, judgments_count equals the rows.
The last line is one JSON object with every figure.

The load generator is this process (a small asyncio HTTP/1.1 client, lighter than an HTTP
library), the server runs in its own processes. Loopback only.

    .venv/bin/python benchmarks/labeling_load.py --pairs 10000
    .venv/bin/python benchmarks/labeling_load.py --pairs 1000000
    .venv/bin/python benchmarks/labeling_load.py --pairs 10000,1000000 --repeat 2   # the 1M/10k ratios
    .venv/bin/python benchmarks/labeling_load.py --pairs 10000 --server asgi
    .venv/bin/python benchmarks/labeling_load.py --pairs 10000 --probe-only   # queries per request
    .venv/bin/python benchmarks/labeling_load.py --pairs 10000 --path api     # the API's labeling path
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLUG = "bench"
PASSWORD = "bench-labeler-password"
RESPONSES_PER_PROMPT = 5  # all pairs of 5 responses: 10 pairs per prompt
FIRST_AXIS = "overall"  # the campaign's first axis (annotate.models.DEFAULT_AXIS_KEY)


def axis_keys(args) -> list[str]:
    return [FIRST_AXIS, *(f"axis{i}" for i in range(2, args.axes + 1))]


def web_form(keys: list[str], choice: str, strength: int | None, ms: int, rng) -> dict:
    """The judge form the page posts: choice and strength, or with several axes choice-KEY per axis (the
    further ones choosing at random) and strength-KEY for the first."""
    if len(keys) == 1:
        form = {"choice": choice, "ms": str(ms)}
        if strength is not None:
            form["strength"] = str(strength)
        return form
    form = {"ms": str(ms), f"choice-{FIRST_AXIS}": choice}
    if strength is not None:
        form[f"strength-{FIRST_AXIS}"] = str(strength)
    for key in keys[1:]:
        form[f"choice-{key}"] = rng.choice(("a", "b", "tie", "both_bad"))
    return form


COMBOS = [(i, j) for i in range(1, RESPONSES_PER_PROMPT + 1) for j in range(i + 1, RESPONSES_PER_PROMPT + 1)]
ASSIGNMENT_RE = re.compile(rb'data-assignment="(\d*)"')
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pairs takes whole numbers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 10:
        raise argparse.ArgumentTypeError(f"--pairs needs sizes of 10 pairs or more, got {text!r}")
    return sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=_sizes, default=[10_000],
                   help="pairs in the campaign (10000, 1000000 ...); a comma list (10000,1000000) measures each "
                        "size in turn in one run and prints the largest size's figures as ratios of the smallest's")
    p.add_argument("--repeat", type=int, default=1,
                   help="with a list of sizes: measure them all this many times, interleaved (10k, 1M, 10k, 1M), "
                        "so that the box's drift falls on every size alike; the comparison takes medians")
    p.add_argument("--labelers", type=int, default=100, help="concurrent simulated labelers")
    p.add_argument("--overlap", type=int, default=3, help="judgments wanted per pair (k)")
    p.add_argument("--server", choices=("wsgi", "asgi"), default="wsgi",
                   help="wsgi: gunicorn sync workers; asgi: one daphne process per worker")
    p.add_argument("--workers", type=int, default=2, help="server processes")
    p.add_argument("--loads", default="saturation,human", help="comma list of: saturation, human")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per load")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the start of each load")
    p.add_argument("--pace", type=float, default=2.0, help="human pace: seconds between one labeler's judgments")
    p.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432",
                   help="PostgreSQL server URL (no database name); the benchmark creates its own database")
    p.add_argument("--db-name", default="pairloop_bench", help="database to (re)create")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="Redis for cache and channel layer")
    p.add_argument("--keep-db", action="store_true", help="leave the database in place at the end")
    p.add_argument("--probe-only", action="store_true",
                   help="seed, then only count queries and time the judge request in-process (no server)")
    p.add_argument("--profile", type=int, default=0,
                   help="in-process: profile this many judge requests with cProfile and print the top")
    p.add_argument("--login", choices=("http", "session"), default="http",
                   help="http: POST /accounts/login/ per labeler (each hashes a password on the server); "
                        "session: sign the session cookies here, as Django's test Client.force_login does")
    p.add_argument("--path", choices=("web", "api"), default="web",
                   help="web: the labeling page's htmx requests; api: /api/v1/ with a Bearer token each")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulated labelers")
    p.add_argument("--axes", type=int, default=1,
                   help="questions asked per pair: the campaign's own, then further axes (no strength), all "
                        "answered in one submit")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Database: create, migrate, seed with bulk SQL
# ---------------------------------------------------------------------------------------------

def recreate_database(args) -> str:
    import psycopg

    with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{args.db_name}"')
    return f"{args.postgres}/{args.db_name}"


def drop_database(args) -> None:
    import psycopg

    with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')


def django_setup(env: dict) -> None:
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")
    import django

    django.setup()


def seed(args) -> dict:
    """Labelers, one campaign and its prompts, responses and pairs, all in bulk SQL."""
    from django.contrib.auth.hashers import make_password
    from django.core.management import call_command
    from django.db import connection

    from annotate.models import Axis, Campaign, Pair

    timings = {}
    t = time.perf_counter()
    call_command("migrate", verbosity=0)
    timings["migrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    n_pairs = args.pairs
    n_prompts = -(-n_pairs // len(COMBOS))
    n_responses = n_prompts * RESPONSES_PER_PROMPT
    password_hash = make_password(PASSWORD)  # one hash for all: the same password, hashed once
    combos = ", ".join(f"({k}, {i}, {j})" for k, (i, j) in enumerate(COMBOS, start=1))
    filler = "Consider the trade-offs, name the assumptions, and give a short worked example. "
    bulk_tables = ["annotate_prompt", "annotate_response", "annotate_pair"]
    with connection.cursor() as cur:
        # Bulk-load habits: the rows are consistent by construction, so foreign-key triggers are off
        # for this session (replica role), and the plain indexes are built once after the load
        # instead of row by row. Primary keys and unique constraints stay on.
        cur.execute("SET session_replication_role = replica")
        cur.execute(
            """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
               WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisprimary
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)""",
            [bulk_tables],
        )
        plain_indexes = cur.fetchall()
        for name, _ in plain_indexes:
            cur.execute(f"DROP INDEX {name}")
        cur.execute(
            """INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email,
                                      is_staff, is_active, date_joined)
               SELECT %s, false, 'bench-' || lpad(g::text, 4, '0'), '', '', '', false, true, now()
               FROM generate_series(1, %s) g""",
            [password_hash, args.labelers + 1],  # +1: the in-process probe's labeler
        )
        # The campaign through the model, so every column a later migration adds gets the model's default.
        campaign_id = Campaign.objects.create(slug=SLUG, name="Load benchmark", overlap=args.overlap,
                                              instructions="Pick the **better** answer.").pk
        for position, key in enumerate(axis_keys(args)[1:], start=1):
            Axis.objects.create(campaign_id=campaign_id, key=key, position=position,
                                question=f"Question {position + 1}: which answer is better on this?")
        cur.execute(
            """INSERT INTO annotate_campaign_members (campaign_id, user_id)
               SELECT %s, id FROM auth_user WHERE username LIKE 'bench-%%'""",
            [campaign_id],
        )
        cur.execute(
            """INSERT INTO annotate_prompt (id, campaign_id, text, turns, hash, meta, created_at)
               SELECT g, %s, 'Question ' || g || ': how would you explain topic ' || (g %% 997) || ' to a
                      new colleague? Use **one** example.', NULL, 'bench-p' || lpad(g::text, 12, '0'), '{}'::jsonb, now()
               FROM generate_series(1, %s) g""",
            [campaign_id, n_prompts],
        )
        cur.execute(
            f"""INSERT INTO annotate_response (id, prompt_id, text, hash, source, round_id, checkpoint,
                                               generation, created_at)
               SELECT g, (g - 1) / {RESPONSES_PER_PROMPT} + 1,
                      'Answer ' || g || ' <b>draft</b>: ' || repeat(%s, 1 + g %% 4), 'bench-r' || lpad(g::text, 12, '0'), 'import',
                      NULL, '', '{{}}'::jsonb, now()
               FROM generate_series(1, %s) g""",
            [filler, n_responses],
        )
        cur.execute(
            f"""INSERT INTO annotate_pair (id, campaign_id, prompt_id, response_a_id, response_b_id, key, priority,
                                           round_id, gold_choice, gold_choices, judgments_count, is_open,
                                           created_at, extra_judgments, purpose)
               SELECT (p - 1) * {len(COMBOS)} + c.k, %s, p,
                      (p - 1) * {RESPONSES_PER_PROMPT} + c.i, (p - 1) * {RESPONSES_PER_PROMPT} + c.j,
                      'bench-' || lpad(((p - 1) * {len(COMBOS)} + c.k)::text, 12, '0'), 0, NULL, '', '{{}}'::jsonb, 0, true,
                      now(), 0, %s
               FROM generate_series(1, %s) p CROSS JOIN (VALUES {combos}) AS c(k, i, j)
               WHERE (p - 1) * {len(COMBOS)} + c.k <= %s""",
            [campaign_id, Pair.TRAINING, n_prompts, n_pairs],
        )
        for table in bulk_tables:
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        cur.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in plain_indexes:
            cur.execute(definition)
        cur.execute("RESET maintenance_work_mem")
        cur.execute("SET session_replication_role = DEFAULT")
    timings["seed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
    timings["vacuum_analyze_s"] = time.perf_counter() - t
    connection.close()
    return timings


# ---------------------------------------------------------------------------------------------
# In-process probe: queries and CPU time of one judge request (no HTTP server)
# ---------------------------------------------------------------------------------------------

def probe(args, n_requests: int = 200) -> dict:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    user = User.objects.get(username=f"bench-{args.labelers + 1:04d}")
    client = Client()
    client.force_login(user)
    url = f"/campaigns/{SLUG}/label/"
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    assignment = int(ASSIGNMENT_RE.search(page.content).group(1))

    def judge_once(assignment_id):
        response = client.post(f"{url}{assignment_id}/judge/", web_form(axis_keys(args), "b", 2, 1500, random.Random(0)), HTTP_HX_REQUEST="true")
        assert response.status_code == 200 and b'role="alert"' not in response.content, response.content[:500]
        return int(ASSIGNMENT_RE.search(response.content).group(1))

    with CaptureQueriesContext(connection) as queries:
        assignment = judge_once(assignment)
    sql = [q["sql"] for q in queries.captured_queries]

    t = time.process_time()
    wall = time.perf_counter()
    for _ in range(n_requests):
        assignment = judge_once(assignment)
    cpu_ms = (time.process_time() - t) / n_requests * 1000
    wall_ms = (time.perf_counter() - wall) / n_requests * 1000

    profile_text = ""
    if args.profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile(time.process_time)  # CPU time: waits on PostgreSQL do not count
        profiler.enable()
        for _ in range(args.profile):
            assignment = judge_once(assignment)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(r"annotate|template|render|middleware|auth|session", 40)
        stats.sort_stats("tottime").print_stats(25)
        profile_text = out.getvalue()
    connection.close()
    return {"queries": len(sql), "sql": sql, "cpu_ms": cpu_ms, "wall_ms": wall_ms, "requests": n_requests,
            "profile": profile_text}


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    processes: list[subprocess.Popen]
    ports: list[int]
    log_path: Path

    def pids(self) -> list[int]:
        """Every process that serves requests (gunicorn master and its workers, or each daphne)."""
        pids = []
        for process in self.processes:
            pids.append(process.pid)
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            if children.exists():
                pids.extend(int(pid) for pid in children.read_text().split())
        return pids

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_server(args, env: dict, data_dir: Path) -> Server:
    server_env = dict(os.environ, **env, DEBUG="0", LOG_LEVEL="WARNING", DJANGO_SETTINGS_MODULE="pairloop.settings")
    log_path = data_dir / "server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the processes
    processes, ports = [], []
    if args.server == "wsgi":
        # Sync workers keep one connection each for the process's life, as docs/environment.md advises.
        server_env["DATABASE_CONN_MAX_AGE"] = server_env.get("DATABASE_CONN_MAX_AGE", "600")
        port = free_port()
        ports.append(port)
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "pairloop.wsgi:application", "--workers", str(args.workers),
             "--worker-class", "sync", "--bind", f"127.0.0.1:{port}", "--backlog", "2048",
             "--log-level", "warning", "--timeout", "120"],
            cwd=REPO, env=server_env, stdout=log, stderr=subprocess.STDOUT,
        ))
    else:
        for _ in range(args.workers):
            port = free_port()
            ports.append(port)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "--verbosity", "0",
                 "pairloop.asgi:application"],
                cwd=REPO, env=server_env, stdout=log, stderr=subprocess.STDOUT,
            ))
    server = Server(processes, ports, log_path)
    deadline = time.monotonic() + 90
    for port in ports:
        while True:
            if any(p.poll() is not None for p in processes):
                server.stop()
                raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    server.stop()
                    raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)
    return server


def cpu_snapshot(pids) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process."""
    snapshot = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        snapshot[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return snapshot


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots (a process started meanwhile counts from zero)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def postgres_backend_pids(args) -> list[int]:
    import psycopg

    try:
        with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [args.db_name]).fetchall()
    except psycopg.OperationalError as exc:  # e.g. the server under test used up max_connections
        print(f"could not list PostgreSQL backends ({exc}); their CPU is not counted", flush=True)
        return []
    return [row[0] for row in rows]


# ---------------------------------------------------------------------------------------------
# A small HTTP/1.1 client (keep-alive when the server keeps the connection, else reconnect)
# ---------------------------------------------------------------------------------------------

class HttpError(Exception):
    pass


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None

    async def request(self, method: str, path: str, headers: dict, body: bytes = b"") -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        reply_headers = []
        for line in header_lines:
            key, _, value = line.partition(":")
            reply_headers.append((key.strip().lower(), value.strip()))
        reply = Reply(status, reply_headers, b"")
        length = reply.header("content-length")
        if length is not None:
            reply.body = await self.reader.readexactly(int(length))
        elif (reply.header("transfer-encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            reply.body = b"".join(c[:-2] for c in chunks)
        else:
            reply.body = await self.reader.read()
            await self.close()
        if (reply.header("connection") or "").lower() == "close":
            await self.close()
        return reply


# ---------------------------------------------------------------------------------------------
# Simulated labelers
# ---------------------------------------------------------------------------------------------

@dataclass
class Labeler:
    username: str
    port: int
    cookies: dict = field(default_factory=dict)
    assignment: int | None = None
    confirmed: int = 0
    connection: Connection | None = None
    token: str | None = None  # --path api: the labeler's API token, sent instead of cookies
    axis_keys: list[str] = field(default_factory=lambda: [FIRST_AXIS])  # the axes each submit answers

    def cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def take_cookies(self, reply: Reply) -> None:
        for key, value in reply.headers:
            if key == "set-cookie":
                name, _, rest = value.partition("=")
                self.cookies[name.strip()] = rest.split(";", 1)[0]

    async def call(self, method, path, form: dict | None = None, htmx=False) -> Reply:
        headers = {"Cookie": self.cookie_header()}
        body = b""
        if self.token is not None:
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            body = json.dumps(form or {}).encode()
        elif form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if method == "POST" and "csrftoken" in self.cookies:
            headers["X-CSRFToken"] = self.cookies["csrftoken"]
        if htmx:
            headers["HX-Request"] = "true"
        self.connection = self.connection or Connection(self.port)
        try:
            reply = await self.connection.request(method, path, headers, body)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            await self.connection.close()  # a dropped keep-alive connection: once more, fresh
            reply = await self.connection.request(method, path, headers, body)
        self.take_cookies(reply)
        return reply

    async def log_in(self) -> None:
        if self.token is not None:
            reply = await self.call("POST", f"/api/v1/campaigns/{SLUG}/claim")
            if reply.status != 200:
                raise HttpError(f"{self.username}: the API's claim answered {reply.status}: "
                                f"{reply.body[:300]!r}")
            self.assignment = api_assignment(json.loads(reply.body))
            return
        if "sessionid" not in self.cookies:
            await self.log_in_over_http()
        page = await self.call("GET", f"/campaigns/{SLUG}/label/")
        if page.status != 200:
            raise HttpError(f"{self.username}: label page answered {page.status}")
        self.assignment = read_assignment(page.body)

    async def log_in_over_http(self) -> None:
        page = await self.call("GET", "/accounts/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body).group(1).decode()
        reply = await self.call("POST", "/accounts/login/",
                                {"username": self.username, "password": PASSWORD, "csrfmiddlewaretoken": token})
        if reply.status != 302 or "sessionid" not in self.cookies:
            raise HttpError(f"{self.username} could not log in: {reply.status} {reply.body[:300]!r}")


def signed_session_cookies(usernames: list[str]) -> dict[str, dict]:
    """Session and CSRF cookies made here, as Client.force_login does (the session stored by SESSION_ENGINE)."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, load_backend
    from django.contrib.auth.models import User
    from django.middleware.csrf import _get_new_csrf_string

    engine = import_module(settings.SESSION_ENGINE)
    # As force_login does: the first backend that can load a user (django-axes' comes first and cannot).
    backend = next(path for path in settings.AUTHENTICATION_BACKENDS if hasattr(load_backend(path), "get_user"))
    cookies = {}
    for user in User.objects.filter(username__in=usernames):
        session = engine.SessionStore()
        session[SESSION_KEY] = user._meta.pk.value_to_string(user)
        session[BACKEND_SESSION_KEY] = backend  # as force_login picks it
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.save()
        cookies[user.username] = {settings.SESSION_COOKIE_NAME: session.session_key,
                                  settings.CSRF_COOKIE_NAME: _get_new_csrf_string()}
    return cookies


def api_tokens(usernames: list[str]) -> dict[str, str]:
    """An API token with the label scope for each labeler, made in-process as create_api_token does."""
    from django.contrib.auth.models import User

    from api.actions import create_token

    return {user.username: create_token(user, "benchmark", ["label"])[1]
            for user in User.objects.filter(username__in=usernames)}


def api_assignment(claim: dict | None) -> int | None:
    return claim["assignment"]["id"] if claim and claim["assignment"] else None


def read_assignment(body: bytes) -> int | None:
    match = ASSIGNMENT_RE.search(body)
    if match is None:
        raise HttpError(f"no pair card in the answer: {body[:300]!r}")
    return int(match.group(1)) if match.group(1) else None


@dataclass
class Sample:
    started: float
    latency: float
    outcome: str  # "ok", "empty" (no pair left for this labeler), or an error


async def judge_api(labeler: Labeler, rng: random.Random, samples: list[Sample]) -> None:
    """One judgment through the API: one round trip, whose answer holds the next pair (?next=true)."""
    if labeler.assignment is None:
        started = time.perf_counter()
        reply = await labeler.call("POST", f"/api/v1/campaigns/{SLUG}/claim")
        labeler.assignment = api_assignment(json.loads(reply.body)) if reply.status == 200 else None
        samples.append(Sample(started, time.perf_counter() - started, "empty"))
        return
    choice = rng.choice(("a", "b", "tie", "both_bad"))
    body = {"choice": choice, "milliseconds": rng.randint(800, 9000)}
    if choice in ("a", "b"):
        body["strength"] = rng.randint(1, 4)
    if len(labeler.axis_keys) > 1:
        body["choices"] = {FIRST_AXIS: body.pop("choice"),
                           **{key: rng.choice(("a", "b", "tie", "both_bad")) for key in labeler.axis_keys[1:]}}
        body["strengths"] = {FIRST_AXIS: body.pop("strength")} if "strength" in body else {}
    path = f"/api/v1/campaigns/{SLUG}/assignments/{labeler.assignment}/judgment?next=true"
    started = time.perf_counter()
    try:
        reply = await labeler.call("POST", path, body)
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        samples.append(Sample(started, time.perf_counter() - started, f"connection: {type(exc).__name__}"))
        return
    latency = time.perf_counter() - started
    if reply.status == 400:
        samples.append(Sample(started, latency, f"refused: {json.loads(reply.body)['detail']}"))
        labeler.assignment = None  # ask for a pair again
        return
    if reply.status not in (200, 201):
        samples.append(Sample(started, latency, f"http {reply.status}"))
        return
    answer = json.loads(reply.body)
    if reply.status == 201:
        labeler.confirmed += 1
        samples.append(Sample(started, latency, "ok"))
    else:
        samples.append(Sample(started, latency, "already recorded"))
    labeler.assignment = api_assignment(answer["next"])


async def judge(labeler: Labeler, rng: random.Random, samples: list[Sample]) -> None:
    if labeler.token is not None:
        return await judge_api(labeler, rng, samples)
    if labeler.assignment is None:
        # Nothing was shown last time: ask again (an empty queue would answer at once).
        started = time.perf_counter()
        reply = await labeler.call("GET", f"/campaigns/{SLUG}/label/", htmx=True)
        labeler.assignment = read_assignment(reply.body) if reply.status == 200 else None
        samples.append(Sample(started, time.perf_counter() - started, "empty"))
        return
    choice = rng.choice(("a", "b", "tie", "both_bad"))
    ms = rng.randint(800, 9000)
    form = web_form(labeler.axis_keys, choice, rng.randint(1, 4) if choice in ("a", "b") else None, ms, rng)
    started = time.perf_counter()
    try:
        reply = await labeler.call("POST", f"/campaigns/{SLUG}/label/{labeler.assignment}/judge/", form, htmx=True)
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        samples.append(Sample(started, time.perf_counter() - started, f"connection: {type(exc).__name__}"))
        return
    latency = time.perf_counter() - started
    if reply.status != 200:
        samples.append(Sample(started, latency, f"http {reply.status}"))
        return
    if b'role="alert"' in reply.body:
        message = re.search(rb'role="alert">([^<]*)<', reply.body)
        samples.append(Sample(started, latency, f"refused: {message.group(1).decode() if message else '?'}"))
    elif b"Already recorded" in reply.body:
        samples.append(Sample(started, latency, "already recorded"))
    else:
        labeler.confirmed += 1
        samples.append(Sample(started, latency, "ok"))
    labeler.assignment = read_assignment(reply.body)


async def run_load(kind: str, labelers: list[Labeler], args, rng: random.Random) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    t0 = time.perf_counter()
    stop_at = t0 + args.warmup + args.duration

    async def saturate(labeler):
        while time.perf_counter() < stop_at:
            await judge(labeler, rng, samples)

    async def human(labeler, offset):
        due = t0 + offset
        while due < stop_at:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await judge(labeler, rng, samples)
            due += args.pace

    if kind == "saturation":
        await asyncio.gather(*(saturate(labeler) for labeler in labelers))
    else:
        await asyncio.gather(*(human(labeler, i * args.pace / len(labelers)) for i, labeler in enumerate(labelers)))
    return samples, t0 + args.warmup


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def summarise(kind: str, samples: list[Sample], measured_from: float, args) -> dict:
    measured = [s for s in samples if s.started >= measured_from and s.started < measured_from + args.duration]
    ok = sorted(s.latency * 1000 for s in measured if s.outcome == "ok")
    outcomes: dict[str, int] = {}
    for s in measured:
        if s.outcome != "ok":
            outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    return {
        "load": kind,
        "labelers": args.labelers,
        "offered_per_s": round(args.labelers / args.pace, 1) if kind == "human" else None,
        "judgments_per_s": round(len(ok) / args.duration, 1),
        "p50_ms": round(percentile(ok, 50), 1),
        "p95_ms": round(percentile(ok, 95), 1),
        "p99_ms": round(percentile(ok, 99), 1),
        "max_ms": round(ok[-1], 1) if ok else None,
        "judgments_measured": len(ok),
        "other_outcomes": outcomes,
    }


async def drive(args, ports: list[int], server: Server, cookies: dict,
                tokens: dict | None = None) -> tuple[list[dict], list[Labeler]]:
    rng = random.Random(args.seed)
    labelers = [Labeler(f"bench-{i + 1:04d}", ports[i % len(ports)]) for i in range(args.labelers)]
    for labeler in labelers:
        labeler.cookies.update(cookies.get(labeler.username, {}))
        labeler.token = (tokens or {}).get(labeler.username)
        labeler.axis_keys = axis_keys(args)
    t = time.perf_counter()
    gate = asyncio.Semaphore(max(2, args.workers * 2))  # logins hash a password: do not flood the workers

    async def log_in(labeler):
        async with gate:
            await labeler.log_in()

    await asyncio.gather(*(log_in(labeler) for labeler in labelers))
    how = "API tokens" if tokens else args.login
    print(f"logged in {len(labelers)} labelers ({how}) in {time.perf_counter() - t:.1f}s", flush=True)

    results = []
    for kind in [k.strip() for k in args.loads.split(",") if k.strip()]:
        if kind not in ("saturation", "human"):
            raise SystemExit(f"unknown load {kind!r}: use saturation and/or human")
        before_server = cpu_snapshot(server.pids())
        before_pg = cpu_snapshot(await asyncio.to_thread(postgres_backend_pids, args))
        before_self = resource.getrusage(resource.RUSAGE_SELF)
        samples, measured_from = await run_load(kind, labelers, args, rng)
        after_self = resource.getrusage(resource.RUSAGE_SELF)
        after_server = cpu_snapshot(server.pids())
        after_pg = cpu_snapshot(await asyncio.to_thread(postgres_backend_pids, args))
        total_ok = sum(1 for s in samples if s.outcome == "ok")
        summary = summarise(kind, samples, measured_from, args)
        if total_ok:
            client_cpu = (after_self.ru_utime + after_self.ru_stime) - (before_self.ru_utime + before_self.ru_stime)
            summary["cpu_ms_per_judgment"] = {
                "server": round(cpu_used(before_server, after_server) / total_ok * 1000, 2),
                "postgres": round(cpu_used(before_pg, after_pg) / total_ok * 1000, 2),
                "client": round(client_cpu / total_ok * 1000, 2),
            }
        results.append(summary)
        print(format_row(summary), flush=True)
    for labeler in labelers:
        if labeler.connection is not None:
            await labeler.connection.close()
    return results, labelers


def format_row(s: dict) -> str:
    cpu = s.get("cpu_ms_per_judgment") or {}
    offered = f"{s['offered_per_s']:.0f}/s" if s["offered_per_s"] else "max"
    extra = f"  other: {s['other_outcomes']}" if s["other_outcomes"] else ""
    return (f"{s['load']:<11} labelers {s['labelers']:>4}  offered {offered:>6}  "
            f"judgments/s {s['judgments_per_s']:>7.1f}  p50 {s['p50_ms']:>7.1f} ms  p95 {s['p95_ms']:>7.1f} ms  "
            f"p99 {s['p99_ms']:>7.1f} ms  max {s['max_ms'] or 0:>7.1f} ms  "
            f"cpu/judgment: server {cpu.get('server', 0):.2f} ms, postgres {cpu.get('postgres', 0):.2f} ms, "
            f"client {cpu.get('client', 0):.2f} ms{extra}")


# ---------------------------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------------------------

def integrity(args, labelers: list[Labeler]) -> dict:
    from django.db import connection
    from django.utils import timezone

    from annotate.models import LIVE_LEASE_SQL

    confirmed = sum(labeler.confirmed for labeler in labelers)
    usernames = [labeler.username for labeler in labelers]
    with connection.cursor() as cur:
        cur.execute(
            """SELECT count(*) FROM annotate_judgment j JOIN auth_user u ON u.id = j.labeler_id
               WHERE u.username = ANY(%s)""", [usernames])
        stored = cur.fetchone()[0]
        cur.execute(
            """SELECT count(*) FROM (SELECT pair_id FROM annotate_judgment GROUP BY pair_id
                                     HAVING count(*) > %s) over_k""", [args.overlap])
        pairs_over_k = cur.fetchone()[0]
        cur.execute(
            """SELECT count(*) FROM (SELECT pair_id, labeler_id FROM annotate_judgment
                                     GROUP BY pair_id, labeler_id HAVING count(*) > 1) twice""")
        labeler_twice = cur.fetchone()[0]
        cur.execute(
            """SELECT count(*) FROM annotate_pair p
               JOIN (SELECT pair_id, count(*) AS n FROM annotate_judgment GROUP BY pair_id) j ON j.pair_id = p.id
               WHERE p.judgments_count <> j.n OR p.is_open <> (j.n < %s)""", [args.overlap])
        count_mismatches = cur.fetchone()[0]
        now = timezone.now()
        cur.execute(
            f"""SELECT count(*) FROM (SELECT a.pair_id FROM annotate_assignment a WHERE {LIVE_LEASE_SQL}
                                      GROUP BY a.pair_id) live
                JOIN annotate_pair p ON p.id = live.pair_id
                WHERE p.judgments_count + (SELECT count(*) FROM annotate_assignment a WHERE a.pair_id = p.id
                      AND {LIVE_LEASE_SQL}) > %s""",
            [now, now, args.overlap])
        leases_over_k = cur.fetchone()[0]
    ok = stored == confirmed and pairs_over_k == 0 and labeler_twice == 0 and count_mismatches == 0 \
        and leases_over_k == 0
    return {"stored_judgments": stored, "confirmed_submits": confirmed, "pairs_over_k": pairs_over_k,
            "labeler_twice_on_a_pair": labeler_twice, "judgments_count_mismatches": count_mismatches,
            "pairs_with_leases_over_k": leases_over_k, "ok": ok}


# ---------------------------------------------------------------------------------------------

def compare_sizes(args, argv: list[str]) -> int:
    """Each size (and each repeat) in its own process, one after the other on the same box; then the
    medians per size and the largest size's latencies as ratios of the smallest's."""
    passed_on = []
    skip = False
    for arg in argv:  # everything but --pairs and --repeat goes to each run
        if skip:
            skip = False
        elif arg in ("--pairs", "--repeat"):
            skip = True
        elif not arg.startswith(("--pairs=", "--repeat=")):
            passed_on.append(arg)
    runs: dict[int, list[dict]] = {size: [] for size in args.pairs}
    failed = False
    for repeat in range(args.repeat):
        for size in args.pairs:
            print(f"\n## {size:,} pairs, run {repeat + 1} of {args.repeat}", flush=True)
            child = subprocess.run([sys.executable, __file__, *passed_on, "--pairs", str(size)],
                                   stdout=subprocess.PIPE, text=True)
            lines = child.stdout.strip().splitlines()
            print("\n".join(lines[:-1]), flush=True)
            if child.returncode != 0 or not lines or not lines[-1].startswith("{"):
                print(f"the {size:,}-pair run failed (exit {child.returncode})", flush=True)
                failed = True
                continue
            runs[size].append(json.loads(lines[-1]))

    summary: dict[str, dict] = {}
    print(f"\n# medians over {args.repeat} run(s) per size, measured in this one run")
    print(f"{'pairs':>10}  {'load':<11} {'judgments/s':>11} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
    for size, results in runs.items():
        for load in args.loads.split(","):
            rows = [row for r in results for row in r.get("loads", []) if row["load"] == load]
            if not rows:
                continue
            med = {k: statistics.median(row[k] for row in rows) for k in ("judgments_per_s", "p50_ms", "p95_ms", "p99_ms")}
            summary.setdefault(load, {})[size] = med
            print(f"{size:>10,}  {load:<11} {med['judgments_per_s']:>11.1f} {med['p50_ms']:>7.1f} "
                  f"{med['p95_ms']:>7.1f} {med['p99_ms']:>7.1f}")
    small, large = min(args.pairs), max(args.pairs)
    ratios = {}
    for load, by_size in summary.items():
        if small in by_size and large in by_size and small != large:
            ratios[load] = {k: by_size[large][k] / by_size[small][k] for k in ("p95_ms", "p99_ms", "judgments_per_s")}
            print(f"{load}: at {large:,} pairs p95 {ratios[load]['p95_ms']:.2f}x and p99 "
                  f"{ratios[load]['p99_ms']:.2f}x of {small:,} pairs; judgments/s "
                  f"{ratios[load]['judgments_per_s']:.2f}x (target: p95 within 1.3x)")
    integrity_ok = all(r.get("integrity", {"ok": True})["ok"] for results in runs.values() for r in results)
    print(json.dumps({"sizes": args.pairs, "repeat": args.repeat, "medians": summary, "ratios": ratios,
                      "runs": runs, "integrity_ok": integrity_ok}))
    return 1 if failed or not integrity_ok else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if len(args.pairs) > 1 or args.repeat > 1:
        return compare_sizes(args, argv)
    args.pairs = args.pairs[0]
    data_dir = Path(tempfile.mkdtemp(prefix="pairloop-bench-"))
    load_before = os.getloadavg()
    print(f"pairloop labeling load ({args.path}): {args.pairs:,} pairs, {args.axes} ax{'e' if args.axes > 1 else 'i'}s, "
          f"k={args.overlap}, "
          f"{args.labelers} labelers, "
          f"server {args.server} x{args.workers}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f}",
          flush=True)
    database_url = recreate_database(args)
    env = {"DATABASE_URL": database_url, "REDIS_URL": args.redis_url, "PAIRLOOP_DATA_DIR": str(data_dir),
           "PAIRLOOP_CHANNEL_PREFIX": "pairloop-bench"}
    django_setup(env)
    from django.core.cache import cache

    cache.clear()  # the benchmark's own Redis database: stale "left in campaign" counts would lie
    timings = seed(args)
    print(f"seeded {args.pairs:,} pairs: migrate {timings['migrate_s']:.1f}s, bulk SQL {timings['seed_s']:.1f}s, "
          f"VACUUM ANALYZE {timings['vacuum_analyze_s']:.1f}s", flush=True)
    result = {"path": args.path, "pairs": args.pairs, "axes": args.axes, "overlap": args.overlap,
              "labelers": args.labelers,
              "server": args.server,
              "workers": args.workers, "cpus": os.cpu_count(), "load_average_before": round(load_before[0], 2),
              "seed": timings}
    server = None
    try:
        found = probe(args)
        print(f"in-process judge request: {found['queries']} queries, {found['cpu_ms']:.2f} ms CPU, "
              f"{found['wall_ms']:.2f} ms wall (mean of {found['requests']}, no HTTP server)", flush=True)
        result["probe"] = {k: found[k] for k in ("queries", "cpu_ms", "wall_ms")}
        if args.profile or args.probe_only:
            for i, sql in enumerate(found["sql"], 1):
                print(f"  {i:>2}. {sql[:400]}")
            if found["profile"]:
                print(found["profile"])
        if not args.probe_only:
            cookies, tokens = {}, None
            usernames = [f"bench-{i + 1:04d}" for i in range(args.labelers)]
            if args.path == "api":
                tokens = api_tokens(usernames)
            elif args.login == "session":
                cookies = signed_session_cookies(usernames)
            server = start_server(args, env, data_dir)
            loads, labelers = asyncio.run(drive(args, server.ports, server, cookies, tokens))
            result["loads"] = loads
            server.stop()
            server = None
            result["integrity"] = integrity(args, labelers)
            i = result["integrity"]
            print(f"integrity: stored judgments {i['stored_judgments']} vs confirmed submits "
                  f"{i['confirmed_submits']}; pairs over k {i['pairs_over_k']}; labeler twice on a pair "
                  f"{i['labeler_twice_on_a_pair']}; judgments_count mismatches {i['judgments_count_mismatches']}; "
                  f"pairs with leases over k {i['pairs_with_leases_over_k']} -> {'OK' if i['ok'] else 'FAILED'}",
                  flush=True)
        result["load_average_after"] = round(os.getloadavg()[0], 2)
    finally:
        if server is not None:
            server.stop()
        from django.db import connection

        connection.close()
        if not args.keep_db:
            drop_database(args)
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result.get("integrity", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
