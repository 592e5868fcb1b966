"""Webhooks: a signed POST to a campaign's subscribers when a round succeeds or fails and when its queue
empties, retried with backoff, recorded per delivery; managed through the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.utils import timezone

from annotate.actions import claim_next_pair, submit_judgment
from api import tasks, webhooks
from api.models import Webhook, WebhookDelivery
from pairloop import embedded
from pairloop.celery import app
from tests.conftest import make_campaign
from tests.test_api import api_for
from training import actions as training_actions
from training.config import build_config
from training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)  # real commits: events are sent on commit


class Receiver:
    """An HTTP server on loopback that records each POST and answers with the next status of `answers`
    (with a Location header when `location` is given)."""

    def __init__(self, answers=(200,), location=None, tls=None):
        self.answers, self.received = list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # an ssl.SSLContext for the server side
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"http{'s' if tls else ''}://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        return [json.loads(body)["event"] for _, body in self.received]


@pytest.fixture
def receiver():
    made = []

    def make(answers=(200,), location=None, tls=None):
        made.append(Receiver(answers, location, tls))
        return made[-1]

    yield make
    for one in made:
        one.server.shutdown()


@pytest.fixture
def sent_at_once(monkeypatch, settings):
    """Deliveries run in this process as the commit happens (retries at once, their countdown skipped), to
    receivers on loopback (PAIRLOOP_WEBHOOK_ALLOW_PRIVATE)."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1, "WEBHOOK_ALLOW_PRIVATE": True}
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: None)
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: tasks.deliver_webhook.apply(args=list(args)))


def run_round(campaign, admin_user, fail_kind=None):
    # Rounds here follow each other with no labels between them: each launch is forced.
    round_ = training_actions.launch_round(campaign, admin_user, build_config("tiny", {}), force=True)
    for job in round_.jobs.order_by("order"):
        training_actions.claim_job(job.pk, f"task-{job.pk}")
        if job.kind == fail_kind:
            training_actions.fail_job(job.pk, f"task-{job.pk}", error="CUDA out of memory\ntraceback...")
            return round_
        training_actions.finish_job(job.pk, f"task-{job.pk}", result={f"{job.kind}/done": 1})
    return round_


def test_an_admin_adds_a_webhook_and_gets_a_signed_post_when_a_round_succeeds(admin_user, labeler, receiver,
                                                                               sent_at_once):
    campaign = make_campaign(n_pairs=3, members=[labeler])
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=2)
    hook = receiver()
    api = api_for(admin_user)
    added = api.post("/campaigns/shop/webhooks", {"url": hook.url, "events": ["round.succeeded"]})
    assert added.status_code == 201
    secret = added.json()["secret"]
    assert secret not in json.dumps(api.get("/campaigns/shop/webhooks").json())

    round_ = run_round(campaign, admin_user)
    [(headers, body)] = hook.received
    payload = json.loads(body)
    assert payload["event"] == "round.succeeded" and payload["round"] == round_.pk
    assert payload["campaign"] == "shop"
    assert payload["results"]["ppo"] == {"ppo/done": 1}
    signed = f"{headers['X-Pairloop-Timestamp']}.".encode() + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Pairloop-Signature"], expected)
    assert headers["X-Pairloop-Event"] == "round.succeeded"
    assert api.get("/campaigns/shop/webhooks").json()["items"][0]["deliveries"][0]["status"] == "delivered"


def test_a_failed_round_and_an_emptied_queue_are_told(admin_user, labeler, receiver, sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver()
    webhooks.add_webhook(campaign, hook.url)  # every event
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="b", strength=1)
    assert hook.events() == ["campaign.queue_empty"]
    run_round(campaign, admin_user, fail_kind=Job.PPO)
    assert hook.events() == ["campaign.queue_empty", "round.failed"]
    assert json.loads(hook.received[1][1])["error"] == "CUDA out of memory"


def test_a_receiver_that_is_down_gets_retries_then_the_delivery_fails(admin_user, labeler, receiver,
                                                                      sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler, admin_user])
    flaky, down, refusing = receiver([503, 500, 200]), receiver([500]), receiver([404])
    for hook in (flaky, down, refusing):
        webhooks.add_webhook(campaign, hook.url, ["campaign.queue_empty"])
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="tie")
    by_url = {d.webhook.url: d for d in WebhookDelivery.objects.select_related("webhook")}
    assert (by_url[flaky.url].status, by_url[flaky.url].attempts) == ("delivered", 3)
    assert (by_url[down.url].status, by_url[down.url].attempts) == ("failed", webhooks.MAX_ATTEMPTS)
    assert len(down.received) == webhooks.MAX_ATTEMPTS and "answered 500" in by_url[down.url].error
    assert (by_url[refusing.url].status, by_url[refusing.url].attempts) == ("failed", 1)  # 404: not retried
    assert {h["X-Pairloop-Delivery"] for h, _ in flaky.received} == {str(by_url[flaky.url].pk)}
    assert [webhooks.backoff(n) for n in (1, 2, 3)] == [30, 60, 120]


def test_an_event_is_sent_once_and_a_removed_webhook_gets_nothing(admin_user, labeler, receiver,
                                                                  sent_at_once):
    campaign = make_campaign(n_pairs=3, members=[labeler])
    hook = receiver()
    api = api_for(admin_user)
    webhook_id = api.post("/campaigns/shop/webhooks", {"url": hook.url}).json()["id"]
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    round_ = run_round(campaign, admin_user)
    last = round_.jobs.order_by("order").last()
    webhooks.on_job_state_changed(Job, job=last)  # told again: not sent again
    assert hook.events() == ["round.succeeded"]
    assert api.client.delete(f"/api/v1/campaigns/shop/webhooks/{webhook_id}",
                             headers=api.headers).status_code == 204
    assert api.get("/campaigns/shop/webhooks").json() == {"items": [], "count": 0}
    run_round(campaign, admin_user, fail_kind=Job.EXPORT)
    assert hook.events() == ["round.succeeded"]


def test_it_refuses_a_url_that_is_not_http_and_an_unknown_event(admin_user):
    make_campaign()
    api = api_for(admin_user)
    assert api.post("/campaigns/shop/webhooks", {"url": "file:///etc/passwd"}).status_code == 422
    unknown = api.post("/campaigns/shop/webhooks", {"url": "http://x", "events": ["round.done"]})
    assert unknown.status_code == 422
    assert not WebhookDelivery.objects.exists()


# ---------------------------------------------------------------------------------------------
# Nothing internal is reached
# ---------------------------------------------------------------------------------------------

PUBLIC = "93.184.215.14"  # a public address: nothing connects to it here (no network in tests)


def resolving(monkeypatch, answers):
    """socket.getaddrinfo with these host names resolved to `answers[name]` (a list of addresses, or a
    function of the call's number giving one); returns the calls per name."""
    real, calls = socket.getaddrinfo, {}

    def fake(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        calls[host] = calls.get(host, 0) + 1
        found = answers[host](calls[host]) if callable(answers[host]) else answers[host]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in found]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return calls


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/api/v1/campaigns", "http://169.254.169.254/latest/meta-data/", "http://[::1]:6379/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]:8000/", "http://2130706433/", "http://127.1/",
    "http://0x7f.0.0.1/", "http://0.0.0.0:8000/", "http://localhost:8000/", "http://10.0.0.5/hook",
    "https://192.168.1.1/", "http://[fe80::1]/", "http://[fd00::1]/", "http://100.64.0.1/",
])
def test_a_webhook_to_an_address_that_is_not_public_is_refused_when_added(admin_user, url):
    make_campaign()
    answer = api_for(admin_user).post("/campaigns/shop/webhooks", {"url": url})
    assert answer.status_code == 400, answer.content
    assert "not a public address" in answer.json()["errors"]["url"]
    assert answer.json()["detail"].startswith("url: ")
    assert not Webhook.objects.exists()


def test_the_app_itself_and_a_name_resolving_to_a_private_address_are_refused_when_added(admin_user, settings,
                                                                                         monkeypatch):
    settings.ALLOWED_HOSTS = ["pairloop.example.org", ".example.org", "testserver"]
    resolving(monkeypatch, {"pairloop.example.org": [PUBLIC], "hooks.example.com": [PUBLIC, "10.1.2.3"],
                            "ci.example.org": [PUBLIC]})
    make_campaign()
    api = api_for(admin_user)
    itself = api.post("/campaigns/shop/webhooks", {"url": "https://pairloop.example.org/api/v1/campaigns"})
    assert itself.status_code == 400 and "is this server" in itself.json()["errors"]["url"]
    split = api.post("/campaigns/shop/webhooks", {"url": "https://hooks.example.com/in"})
    assert split.status_code == 400 and "10.1.2.3" in split.json()["errors"]["url"]
    nowhere = api.post("/campaigns/shop/webhooks", {"url": "https://nowhere.invalid/in"})
    assert nowhere.status_code == 400 and "does not resolve" in nowhere.json()["errors"]["url"]
    assert not Webhook.objects.exists()
    assert api.post("/campaigns/shop/webhooks", {"url": "https://ci.example.org/in"}).status_code == 201
    assert api.post("/campaigns/shop/webhooks", {"url": f"http://{PUBLIC}/in"}).status_code == 201


def test_a_host_that_resolves_to_a_private_address_at_send_is_refused_without_a_connection(
        admin_user, labeler, monkeypatch, sent_at_once, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "WEBHOOK_ALLOW_PRIVATE": False}
    campaign = make_campaign(n_pairs=1, members=[labeler])
    resolving(monkeypatch, {"hooks.example.com": lambda call: [PUBLIC] if call == 1 else [PUBLIC, "127.0.0.1"]})
    webhooks.add_webhook(campaign, "http://hooks.example.com/in")  # public when added
    connected = []
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: connected.append(args))
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 1)  # refused for good: not retried
    assert "127.0.0.1" in delivery.error and "not a public address" in delivery.error
    assert connected == []


def test_a_delivery_connects_to_the_address_it_checked_with_the_host_name_in_the_host_header(
        admin_user, labeler, monkeypatch, receiver, sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver()
    port = hook.server.server_port
    # A second lookup would get another address, where nothing listens (a rebinding DNS server).
    calls = resolving(monkeypatch, {"hooks.internal.test": lambda call: ["127.0.0.1"] if call <= 2 else ["127.0.0.2"]})
    webhooks.add_webhook(campaign, f"http://hooks.internal.test:{port}/in?via=pairloop")
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    assert WebhookDelivery.objects.get().status == "delivered"
    assert calls == {"hooks.internal.test": 2}  # once when added, once at the try
    [(headers, _)] = hook.received
    assert headers["Host"] == f"hooks.internal.test:{port}"


def certificate_for(host: str, directory) -> tuple[str, str]:
    """A self-signed certificate for `host` (and no address), as (PEM certificate, path of cert+key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = timezone.now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    path = directory / "server.pem"
    path.write_text(pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode())
    return pem, str(path)


def test_over_https_the_pinned_address_is_verified_against_the_host_name(admin_user, labeler, monkeypatch,
                                                                         receiver, sent_at_once, tmp_path):
    import ssl

    pem, pair = certificate_for("hooks.internal.test", tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(pair)
    hook = receiver(tls=server_side)
    trusting = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *args, **kwargs: trusting(cadata=pem))
    resolving(monkeypatch, {"hooks.internal.test": ["127.0.0.1"], "other.internal.test": ["127.0.0.1"]})
    campaign = make_campaign(n_pairs=1, members=[labeler])
    port = hook.server.server_port
    webhooks.add_webhook(campaign, f"https://hooks.internal.test:{port}/in")
    webhooks.add_webhook(campaign, f"https://other.internal.test:{port}/in")  # not the certificate's name
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    by_host = {d.webhook.url.split("/")[2].split(":")[0]: d for d in WebhookDelivery.objects.all()}
    assert by_host["hooks.internal.test"].status == "delivered"
    assert by_host["other.internal.test"].status == "failed"
    assert "certificate" in by_host["other.internal.test"].error
    [(headers, _)] = hook.received
    assert headers["Host"] == f"hooks.internal.test:{port}"


def test_a_redirect_is_not_followed_and_fails_the_delivery(admin_user, labeler, receiver, sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    elsewhere = receiver()
    redirecting = receiver([302], location=elsewhere.url)
    webhooks.add_webhook(campaign, redirecting.url)
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("failed", 1, 302)
    assert "redirects are not followed" in delivery.error
    assert len(redirecting.received) == 1 and elsewhere.received == []


def test_allow_private_lets_a_receiver_on_the_premises_get_its_deliveries(admin_user, labeler, receiver,
                                                                          sent_at_once, settings):
    campaign = make_campaign(n_pairs=2, members=[labeler])
    hook = receiver()
    api = api_for(admin_user)
    settings.PAIRLOOP = {**settings.PAIRLOOP, "WEBHOOK_ALLOW_PRIVATE": False}
    assert api.post("/campaigns/shop/webhooks", {"url": hook.url}).status_code == 400
    settings.PAIRLOOP = {**settings.PAIRLOOP, "WEBHOOK_ALLOW_PRIVATE": True}
    assert api.post("/campaigns/shop/webhooks", {"url": hook.url}).status_code == 201
    for _ in range(2):
        submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                        choice="a", strength=1)
    assert hook.events() == ["campaign.queue_empty"]
    # Allowed no longer: the next event's delivery is refused at send.
    settings.PAIRLOOP = {**settings.PAIRLOOP, "WEBHOOK_ALLOW_PRIVATE": False}
    webhooks.record_event(campaign.pk, "campaign.queue_empty", "again", {})
    assert WebhookDelivery.objects.get(key="again").status == "failed"
    assert len(hook.received) == 1


# ---------------------------------------------------------------------------------------------
# A slow receiver holds nothing for long
# ---------------------------------------------------------------------------------------------

class Trickler:
    """A server on loopback that answers one byte every `interval` s: a 200 whose head takes seconds."""

    ANSWER = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 40 + b"\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, interval=0.05):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.interval, self.sent = interval, 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            for byte in self.ANSWER:
                time.sleep(self.interval)
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up
                self.sent += 1


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_deadline(admin_user, labeler, monkeypatch,
                                                                        sent_at_once, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "WEBHOOK_TIMEOUT": 1}
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: None)  # tried below, by hand
    campaign = make_campaign(n_pairs=1, members=[labeler])
    slow = Trickler()  # its whole answer takes about 3.5 s, a byte every 50 ms
    webhooks.add_webhook(campaign, slow.url)
    [delivery] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "slow", {})
    WebhookDelivery.objects.filter(pk=delivery.pk).update(attempts=webhooks.MAX_ATTEMPTS - 1)  # its last try
    started = time.monotonic()
    outcome, tries = webhooks.attempt(delivery.pk)
    took = time.monotonic() - started
    delivery.refresh_from_db()
    assert (outcome, tries) == ("failed", webhooks.MAX_ATTEMPTS) and delivery.status == "failed"
    assert 1 <= took < 2, took
    assert "no whole answer within 1 s" in delivery.error
    assert 0 < slow.sent < len(Trickler.ANSWER)


def test_webhook_deliveries_run_on_their_own_queue_with_a_time_limit_and_the_embedded_worker_takes_it(settings):
    assert webhooks.DELIVER_TASK == tasks.deliver_webhook.name  # what is sent is the task that delivers
    route = app.amqp.router.route({}, webhooks.DELIVER_TASK)
    assert route["queue"].name == "webhooks"
    assert app.amqp.router.route({}, "training.export")["queue"].name == "default"
    routed = {one["queue"] for one in settings.CELERY_TASK_ROUTES.values()}
    assert routed | {"default", "training"} <= set(embedded.WORKER_QUEUES.split(","))
    assert tasks.deliver_webhook.time_limit == settings.PAIRLOOP["WEBHOOK_TIMEOUT"] + 60


# ---------------------------------------------------------------------------------------------
# Nothing stays pending for ever
# ---------------------------------------------------------------------------------------------

def overdue(delivery, **fields):
    """As if the delivery's next try had been due STALE_SECONDS and a minute ago (and `fields`)."""
    due = timezone.now() - timedelta(seconds=webhooks.STALE_SECONDS + 60)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_try_at=due, **fields)


def test_a_delivery_whose_message_was_lost_is_sent_again_by_the_sweep(admin_user, labeler, monkeypatch,
                                                                      receiver, sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver()
    webhooks.add_webhook(campaign, hook.url)
    eager = webhooks.send_delivery
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: None)  # the broker loses the message
    [delivery] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "lost", {})
    assert webhooks.resend_stale_deliveries() == ([], [])  # not overdue yet: its message may still come
    overdue(delivery)
    monkeypatch.setattr(webhooks, "send_delivery", eager)
    assert webhooks.resend_stale_deliveries() == ([delivery.pk], [])
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 1)
    assert len(hook.received) == 1
    assert "resend-stale-webhook-deliveries" in app.conf.beat_schedule
    assert app.conf.beat_schedule["resend-stale-webhook-deliveries"]["task"] == \
        tasks.resend_stale_webhook_deliveries.name


def test_a_try_whose_worker_died_is_made_again_once_and_a_late_duplicate_is_skipped(admin_user, labeler,
                                                                                     monkeypatch, receiver,
                                                                                     sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver()
    webhooks.add_webhook(campaign, hook.url)
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: None)
    [delivery] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "killed", {})
    overdue(delivery, attempts=3)  # its 3rd try began long ago; its worker was killed during it
    sent = []
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: sent.append(args))
    assert webhooks.resend_stale_deliveries() == ([delivery.pk], [])
    assert webhooks.resend_stale_deliveries() == ([], [])  # sent again once, not at every sweep
    assert sent == [(delivery.pk, 3)]
    assert tasks.deliver_webhook.apply(args=[delivery.pk, 2]).get() == "skipped"  # a message of a try made
    assert hook.received == []
    assert tasks.deliver_webhook.apply(args=[delivery.pk, 3]).get() == "delivered"
    assert tasks.deliver_webhook.apply(args=[delivery.pk, 3]).get() == "delivered"  # a duplicate: not sent
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 4)
    assert len(hook.received) == 1


def test_a_pending_delivery_past_its_last_try_or_its_age_is_failed_by_the_sweep(admin_user, labeler,
                                                                                monkeypatch, receiver,
                                                                                sent_at_once):
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver()
    webhooks.add_webhook(campaign, hook.url)
    monkeypatch.setattr(webhooks, "send_delivery", lambda *args: None)
    [last] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "last", {})
    [old] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "old", {})
    [fresh] = webhooks.record_event(campaign.pk, "campaign.queue_empty", "fresh", {})
    overdue(last, attempts=webhooks.MAX_ATTEMPTS)
    overdue(old, attempts=1, created_at=timezone.now() - timedelta(seconds=webhooks.GIVE_UP_SECONDS + 60))
    resent, failed = webhooks.resend_stale_deliveries()
    assert (resent, sorted(failed)) == ([], sorted([last.pk, old.pk]))
    by_key = {d.key: d for d in WebhookDelivery.objects.all()}
    assert by_key["last"].status == "failed" and "never finished" in by_key["last"].error
    assert by_key["old"].status == "failed" and "-Q webhooks" in by_key["old"].error
    assert by_key["fresh"].status == "pending"
    assert hook.received == []


# ---------------------------------------------------------------------------------------------
# The list, a page at a time
# ---------------------------------------------------------------------------------------------

def test_the_webhook_list_comes_a_page_at_a_time(admin_user):
    campaign = make_campaign()
    Webhook.objects.bulk_create([Webhook(campaign=campaign, url=f"https://{PUBLIC}/hook/{n}", events=["x"],
                                         secret="s") for n in range(105)])
    api = api_for(admin_user)
    first = api.get("/campaigns/shop/webhooks?limit=2").json()
    assert first["count"] == 105 and [hook["url"][-2:] for hook in first["items"]] == ["/0", "/1"]
    last = api.get("/campaigns/shop/webhooks?limit=10&offset=100").json()
    assert [hook["url"].rsplit("/", 1)[1] for hook in last["items"]] == ["100", "101", "102", "103", "104"]
    assert len(api.get("/campaigns/shop/webhooks").json()["items"]) == 20  # the default page
    assert len(api.get("/campaigns/shop/webhooks?limit=100").json()["items"]) == 100  # the largest
    assert api.get("/campaigns/shop/webhooks?limit=101").status_code == 422


# ---------------------------------------------------------------------------------------------
# The receiver in docs/api.md
# ---------------------------------------------------------------------------------------------

def readme_receiver() -> dict:
    """The receiver code of docs/api.md, section "A webhook receiver", run as a reader would copy it."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "def check(" in block]
    names = {}
    exec(code, names)  # noqa: S102 - our own documentation's example
    return names


def test_the_readme_receiver_acts_once_per_delivery_and_refuses_old_or_forged_ones(admin_user, labeler, receiver,
                                                                                  sent_at_once):
    check = readme_receiver()["check"]
    campaign = make_campaign(n_pairs=1, members=[labeler])
    hook = receiver([503, 200])  # the delivery's first try fails: the second carries the same id
    _, secret = webhooks.add_webhook(campaign, hook.url)
    submit_judgment(assignment_id=claim_next_pair(campaign, labeler).assignment.pk, labeler=labeler,
                    choice="a", strength=1)
    [(first_headers, first_body), (headers, body)] = hook.received
    assert first_headers["X-Pairloop-Delivery"] == headers["X-Pairloop-Delivery"]
    assert check(secret, first_headers, first_body) == "new"
    assert check(secret, headers, body) == "repeat"  # the retry: not acted on twice
    assert check(secret, headers, body.replace(b"queue_empty", b"queue_full")) == "refused"
    assert check("another secret", headers, body) == "refused"
    fresh = check.__globals__  # a new delivery id, signed now and signed six minutes ago
    fresh["seen"].clear()
    stamp = int(time.time())
    for signed_at, verdict in ((stamp - 360, "refused"), (stamp - 10, "new"), (stamp, "repeat")):
        resigned = {**headers, "X-Pairloop-Timestamp": str(signed_at),
                    "X-Pairloop-Signature": webhooks.signature(secret, signed_at, body)}
        assert check(secret, resigned, body) == verdict
