"""Security settings as an attacker or an operator meets them: production checks, the secret key,
login throttling, who sees tracebacks, password-reset pages only with email, and demo passwords."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import clear_url_caches

from annotate.actions import PairInput, add_pairs
from annotate.auth import DEMO_USERS
from tests.conftest import PASSWORD, make_campaign, make_user
from training import actions, runner
from training.config import build_config
from training.engine.common import EngineError
from training.models import Job

ROOT = Path(__file__).resolve().parent.parent
LOGIN_URLS = ["/accounts/login/", "/admin/login/"]


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # The browser tests' conftest sets DJANGO_ALLOW_ASYNC_UNSAFE in this process; no deployment has it.
    env = {k: v for k, v in env.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def production_env(tmp_path, **extra) -> dict[str, str]:
    """The environment of docs/operations.md, section 'Running on PostgreSQL and Redis'."""
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    env.update(DATABASE_URL=env.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/pairloop"),
               REDIS_URL=env.get("REDIS_URL", "redis://127.0.0.1:6379/0"), PAIRLOOP_DATA_DIR=str(tmp_path),
               DEBUG="0", ALLOWED_HOSTS="pairloop.example.org", PAIRLOOP_HTTPS="1", PAIRLOOP_BEHIND_PROXY="1",
               CSRF_TRUSTED_ORIGINS="https://pairloop.example.org", SECRET_KEY=secrets.token_urlsafe(50))
    env.update(extra)
    return env


def test_it_reports_nothing_for_check_deploy_with_production_settings(tmp_path):
    result = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_it_refuses_to_serve_a_host_name_without_a_secret_key(tmp_path):
    env = production_env(tmp_path)
    del env["SECRET_KEY"]
    result = manage(env, "check")
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert not (tmp_path / "secret_key").exists()  # no key of its own that other hosts would not share


def test_it_writes_the_embedded_key_file_readable_by_its_owner_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY"}}
    env["PAIRLOOP_DATA_DIR"] = str(tmp_path)
    assert manage(env, "check").returncode == 0
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    assert len(key) >= 50
    assert manage(env, "check").returncode == 0
    assert key_file.read_text() == key  # kept: sessions survive restarts
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("secret_key")] == ["secret_key"]


def login(client: Client, url: str, username: str, password: str):
    return client.post(url, {"username": username, "password": password})


@pytest.mark.django_db
@pytest.mark.parametrize("url", LOGIN_URLS)
def test_it_throttles_password_guessing_on_both_login_pages(url, settings, admin_user):
    settings.LOGIN_FAILURE_LIMIT = 3
    other = make_user("olga-other-admin", is_staff=True, is_superuser=True)
    guesser = Client()
    for _ in range(2):
        response = login(guesser, url, admin_user.username, "wrong-guess")
        assert response.status_code == 200  # the form again, with its error
    locked = login(guesser, url, admin_user.username, "wrong-guess")
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.content.decode()
    # Locked out: even the right password is refused, and no session is given.
    right = login(guesser, url, admin_user.username, PASSWORD)
    assert right.status_code == 429 and "sessionid" not in right.cookies
    assert guesser.get("/admin/").status_code == 302
    # Someone else at the same address still logs in.
    colleague = Client()
    response = login(colleague, url, other.username, PASSWORD)
    assert response.status_code == 302
    assert colleague.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_it_forgets_failures_after_a_successful_login(settings, labeler):
    settings.LOGIN_FAILURE_LIMIT = 3
    client = Client()
    for _ in range(2):
        login(client, "/accounts/login/", labeler.username, "typo")
    assert login(client, "/accounts/login/", labeler.username, PASSWORD).status_code == 302
    client.post("/accounts/logout/")
    for _ in range(2):
        login(client, "/accounts/login/", labeler.username, "typo")
    assert login(client, "/accounts/login/", labeler.username, PASSWORD).status_code == 302


@pytest.mark.django_db
def test_it_throttles_each_client_behind_a_proxy_by_its_forwarded_address(settings, admin_user):
    settings.LOGIN_FAILURE_LIMIT = 2
    settings.BEHIND_PROXY = True
    attacker = Client(HTTP_X_FORWARDED_FOR="203.0.113.7")  # every request comes from the proxy's address
    for _ in range(2):
        last = login(attacker, "/admin/login/", admin_user.username, "wrong-guess")
    assert last.status_code == 429
    owner = Client(HTTP_X_FORWARDED_FOR="203.0.113.7, 198.51.100.2")  # a forged first entry changes nothing
    assert login(owner, "/admin/login/", admin_user.username, PASSWORD).status_code == 302


@pytest.mark.django_db
def test_it_keeps_login_throttling_off_the_labeling_path(labeler, campaign):
    client = Client()
    assert login(client, "/accounts/login/", labeler.username, PASSWORD).status_code == 302
    page = client.get(campaign.label_url())
    assignment = re.search(r'data-assignment="(\d+)"', page.content.decode()).group(1)
    with CaptureQueriesContext(connection) as queries:
        response = client.post(f"{campaign.label_url()}{assignment}/judge/", {"choice": "a", "ms": "900"},
                               HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "data-assignment" in response.content.decode()
    assert not [q["sql"] for q in queries if "axes_access" in q["sql"]]  # django-axes tables


@pytest.fixture
def broken_home(monkeypatch):
    def explode(user):
        raise RuntimeError("secret-detail-of-the-failure")

    monkeypatch.setattr("annotate.views.campaigns_for_user", explode)


def client_for(user) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


@pytest.mark.django_db
def test_it_shows_tracebacks_with_debug_on_to_admins_only(settings, broken_home, labeler, admin_user):
    settings.DEBUG = True
    response = client_for(labeler).get("/", HTTP_ACCEPT="text/html")
    assert response.status_code == 500
    body = response.content.decode()
    assert "secret-detail-of-the-failure" not in body and "Traceback" not in body
    plain = client_for(labeler).get("/", HTTP_ACCEPT="text/plain")
    assert plain.status_code == 500 and "secret-detail-of-the-failure" not in plain.content.decode()
    staff = client_for(admin_user).get("/", HTTP_ACCEPT="text/html")
    assert staff.status_code == 500
    assert "secret-detail-of-the-failure" in staff.content.decode()
    # A forged Host header is answered with no debug page either (Django raises before any login).
    forged = Client(raise_request_exception=False).get("/accounts/login/", HTTP_HOST="evil.example.org")
    assert forged.status_code == 400
    assert "ALLOWED_HOSTS" not in forged.content.decode()


@pytest.mark.django_db
def test_it_shows_a_failed_jobs_traceback_to_admins_and_its_message_to_reviewers(
        settings, monkeypatch, reviewer, admin_user):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 2}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)
    campaign = make_campaign(slug="sec")
    add_pairs(campaign, [PairInput(f"Q{i}?", f"good {i}", f"bad {i}", preferred="a") for i in range(2)],
              notify=False)
    round_ = actions.launch_round(campaign, admin_user, build_config("tiny"))
    job = round_.jobs.get(kind=Job.EXPORT)

    def broken(job, progress):
        raise EngineError("pairs file has no 'chosen' column")

    monkeypatch.setitem(runner.RUNNERS, Job.EXPORT, broken)
    runner.execute(job.pk, "task-1")
    url = f"/rounds/{round_.pk}/"
    as_reviewer = client_for(reviewer).get(url).content.decode()
    as_admin = client_for(admin_user).get(url).content.decode()
    for page in (as_reviewer, as_admin):
        assert "pairs file has no &#x27;chosen&#x27; column" in page
    assert "Traceback (most recent call last)" in as_admin
    assert "Traceback" not in as_reviewer and "runner.py" not in as_reviewer


@pytest.fixture
def email_configured(settings):
    """The URLconf as it is built when EMAIL_HOST is set."""
    import pairloop.urls

    settings.EMAIL_HOST = "smtp.example.org"
    importlib.reload(pairloop.urls)
    clear_url_caches()
    yield
    settings.EMAIL_HOST = ""
    importlib.reload(pairloop.urls)
    clear_url_caches()


@pytest.mark.django_db
def test_it_has_no_password_reset_pages_without_email(labeler):
    client = Client()
    assert client.get("/accounts/password_reset/").status_code == 404
    assert client.post("/accounts/password_reset/", {"email": "lena@example.org"}).status_code == 404
    assert "Forgot your password" not in client.get("/accounts/login/").content.decode()
    assert mail.outbox == []


@pytest.mark.django_db
def test_it_mails_a_password_reset_link_when_email_is_configured(email_configured, labeler):
    labeler.email = "lena@example.org"
    labeler.save(update_fields=["email"])
    client = Client()
    assert "Forgot your password" in client.get("/accounts/login/").content.decode()
    response = client.post("/accounts/password_reset/", {"email": "lena@example.org"})
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", mail.outbox[0].body).group(1)
    form = client.get(link, follow=True)
    done = client.post(form.redirect_chain[-1][0], {"new_password1": "a-new-long-passphrase",
                                                    "new_password2": "a-new-long-passphrase"})
    assert done.status_code == 302
    assert Client().login(username=labeler.username, password="a-new-long-passphrase")


def seed(*args: str) -> str:
    out = io.StringIO()
    call_command("seed_demo", "--preset", "tiny", "--prompts", "2", "--per-prompt", "2", "--judged", "0",
                 *args, stdout=out)
    return out.getvalue()


def printed_logins(output: str) -> dict[str, str]:
    """username -> password from seed_demo's table of demo logins."""
    names = "|".join(username for username, _, _ in DEMO_USERS)
    return dict(re.findall(rf"^  ({names})\s+(\S+)\s+\w+$", output, re.MULTILINE))


def can_log_in(username: str, password: str) -> bool:
    return Client().post("/accounts/login/", {"username": username, "password": password}).status_code == 302


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_it_gives_demo_users_random_passwords_outside_the_embedded_default():
    output = seed()
    logins = printed_logins(output)
    assert sorted(logins) == sorted(username for username, _, _ in DEMO_USERS)
    for username, known, _ in DEMO_USERS:
        assert logins[username] != known and len(logins[username]) >= 16
        assert not can_log_in(username, known)
        assert can_log_in(username, logins[username])
    assert "pairloop-admin" not in output
    # A rerun shows no password: the ones printed were the only copy.
    again = printed_logins(seed())
    assert set(again.values()) == {"(unchanged)"}
    assert User.objects.get(username="admin").is_superuser


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_it_keeps_the_readme_logins_only_for_the_embedded_demo_on_loopback(settings):
    settings.EMBEDDED = True
    local = printed_logins(seed("--host", "127.0.0.1"))
    assert local == {username: known for username, known, _ in DEMO_USERS}
    assert can_log_in("labeler1", "pairloop-label")
    # Served to the network: the public passwords are replaced, and the new ones printed once.
    exposed = printed_logins(seed("--host", "0.0.0.0"))
    for username, known, _ in DEMO_USERS:
        assert exposed[username] != known
        assert not can_log_in(username, known) and can_log_in(username, exposed[username])


@pytest.mark.django_db
def test_serving_the_embedded_demo_to_the_network_replaces_the_public_passwords(settings, capsys):
    """`python -m pairloop.embedded serve --host 0.0.0.0` runs secure_demo_logins before it serves."""
    from django.core.management import call_command

    from demo.seed import ensure_users

    settings.EMBEDDED = True
    ensure_users(known_passwords=True)
    call_command("secure_demo_logins", "--host", "127.0.0.1")
    assert capsys.readouterr().out == "" and can_log_in("labeler1", "pairloop-label")
    call_command("secure_demo_logins", "--host", "0.0.0.0")
    printed = printed_logins(capsys.readouterr().out)
    assert sorted(printed) == sorted(username for username, _, _ in DEMO_USERS)
    for username, known, _ in DEMO_USERS:
        assert not can_log_in(username, known) and can_log_in(username, printed[username])
    call_command("secure_demo_logins", "--host", "0.0.0.0")
    assert capsys.readouterr().out == ""  # nothing public is left to replace


def demo_admin() -> User:
    from demo.seed import ensure_users

    ensure_users(known_passwords=True)
    return User.objects.get(username="admin")


@pytest.mark.django_db
@pytest.mark.parametrize("url", LOGIN_URLS)
def test_it_takes_the_readme_demo_password_from_this_machine_only(url):
    demo_admin()
    local = Client(REMOTE_ADDR="127.0.0.1")
    assert login(local, url, "admin", "pairloop-admin").status_code == 302
    assert local.get("/admin/").status_code == 200
    remote = Client(REMOTE_ADDR="203.0.113.9")
    refused = login(remote, url, "admin", "pairloop-admin")
    assert refused.status_code == 200  # the form again, with the reason
    assert "manage.py changepassword admin" in refused.content.decode()
    assert remote.get("/admin/").status_code == 302


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED"])
def test_it_refuses_the_readme_demo_password_through_a_proxy_on_loopback(header):
    demo_admin()
    proxied = Client(REMOTE_ADDR="127.0.0.1", **{header: "for=198.51.100.4" if header == "HTTP_FORWARDED"
                                                 else "198.51.100.4"})
    refused = login(proxied, "/accounts/login/", "admin", "pairloop-admin")
    assert refused.status_code == 200 and "manage.py changepassword admin" in refused.content.decode()
    assert proxied.get("/campaigns/demo/rounds/").status_code == 302


@pytest.mark.django_db
def test_a_changed_demo_password_works_from_anywhere():
    admin = demo_admin()
    admin.set_password("a-new-long-passphrase")
    admin.save()
    remote = Client(REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert login(remote, "/accounts/login/", "admin", "a-new-long-passphrase").status_code == 302
    assert remote.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_it_locks_a_username_guessed_from_many_addresses(settings, admin_user, labeler):
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_USERNAME_FAILURE_LIMIT = 3, 4
    for n in range(4):  # one guess from each of four addresses: none reaches the per-address limit
        guess = login(Client(REMOTE_ADDR=f"203.0.113.{n + 1}"), "/admin/login/", admin_user.username, "wrong")
    assert guess.status_code == 429
    owner = Client(REMOTE_ADDR="198.51.100.2")  # a fifth address, with the right password: still locked
    assert login(owner, "/admin/login/", admin_user.username, PASSWORD).status_code == 429
    assert owner.get("/admin/").status_code == 302
    # Another username from one of those addresses is not locked.
    assert login(Client(REMOTE_ADDR="203.0.113.1"), "/accounts/login/", labeler.username, PASSWORD).status_code == 302


@pytest.mark.django_db
def test_logging_out_ends_the_session_for_a_replayed_cookie(labeler, campaign):
    client = Client()
    assert login(client, "/accounts/login/", labeler.username, PASSWORD).status_code == 302
    stolen = client.cookies["sessionid"].value
    assert client.get(campaign.label_url()).status_code == 200
    assert client.post("/accounts/logout/").status_code == 302
    replay = Client()
    replay.cookies["sessionid"] = stolen
    response = replay.get(campaign.label_url())
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


PRIVATE_MODES_SCRIPT = """
import json, os, stat
from pathlib import Path
from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from annotate.importing import start_import_job
from annotate.models import Campaign
admin = User.objects.create_superuser("root-admin", password="a-long-passphrase")
campaign = Campaign.objects.create(slug="modes", name="Modes")
start_import_job(campaign, admin, SimpleUploadedFile("p.jsonl", b'{"prompt": "a", "response_a": "b", "response_b": "c"}'))
print(json.dumps({str(p.relative_to(settings.DATA_DIR)): stat.S_IMODE(p.lstat().st_mode)
                  for p in [settings.DATA_DIR, *settings.DATA_DIR.rglob("*")]}))
"""


def test_it_keeps_the_data_directory_and_its_files_private_to_the_service_user(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    data.chmod(0o755)  # as an earlier version, or a careless mkdir, left it
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY",
                                                            "DJANGO_ALLOW_ASYNC_UNSAFE"}}
    env["PAIRLOOP_DATA_DIR"] = str(data)
    embedded = [sys.executable, "-m", "pairloop.embedded", "exec", "--", sys.executable, "manage.py"]
    migrated = subprocess.run([*embedded, "migrate", "--noinput"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    listed = subprocess.run([*embedded, "shell", "-c", PRIVATE_MODES_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    modes = json.loads(listed.stdout.strip().splitlines()[-1])
    assert {"pairloop.sqlite3", "redis.sock", "secret_key"} <= set(modes)
    assert [name for name in modes if name.startswith("uploads/")], modes  # the upload is there
    assert modes["."] == 0o700
    exposed = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert not exposed, f"readable by others: {exposed}"
