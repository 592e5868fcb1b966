"""Webhooks: a campaign's subscribers get a signed POST when one of its rounds succeeds or fails and when
its queue empties. One door per state change: add and remove webhooks, record an event's deliveries,
make one delivery attempt (api/tasks.py retries it with backoff), and send again the deliveries whose
message or worker was lost (Celery beat).

Each POST carries the JSON event and the headers
  X-Pairloop-Event      the event's name (round.succeeded, round.failed, campaign.queue_empty)
  X-Pairloop-Delivery   the delivery's id: the same on every retry, so a receiver can skip repeats
  X-Pairloop-Timestamp  Unix seconds when this attempt was signed
  X-Pairloop-Signature  sha256=HMAC-SHA256(secret, "<timestamp>.<body>") in hex

A webhook reaches only public addresses (PAIRLOOP["WEBHOOK_ALLOW_PRIVATE"] lifts that for receivers on
the premises): its host is checked when it is added and again at each attempt, which connects to the
very addresses it checked (no second lookup) and never follows a redirect.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
from datetime import timedelta
from urllib.parse import urlsplit

from celery import current_app
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db.models import DateTimeField, ExpressionWrapper, F, Value
from django.db.models.functions import Now
from django.utils import timezone

from api.models import EVENT_NAMES, QUEUE_EMPTY, ROUND_FAILED, ROUND_SUCCEEDED, Webhook, WebhookDelivery
from training.models import Job

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8  # then the delivery is marked failed
BACKOFF_SECONDS = 30  # before retry n (1, 2, ...): 30 s x 2^(n-1), so the last comes about 2 hours on
STALE_SECONDS = 600  # a pending delivery this long past its due try lost its message or worker: sent again
GIVE_UP_SECONDS = 24 * 3600  # a delivery still pending this long after it was made is failed
RETRY, SKIPPED = "retry", "skipped"  # attempt's outcomes besides a delivery's final statuses


def time_limit() -> int:
    """Seconds a delivery task may run before Celery kills it: the attempt's deadline
    (PAIRLOOP["WEBHOOK_TIMEOUT"]) plus a minute for the host's lookup and the database."""
    return settings.PAIRLOOP["WEBHOOK_TIMEOUT"] + 60


class WebhookRefused(ValueError):
    """A webhook that cannot be added or sent to as asked (not an http(s) URL, a host that is not public,
    an unknown event); `field` names the input at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def add_webhook(campaign, url: str, events: list[str] | None = None) -> tuple[Webhook, str]:
    """A new webhook of the campaign; returns (row, secret). Without `events`, every event."""
    try:
        target(url)
    except OSError as exc:
        raise WebhookRefused("url", str(exc)) from None
    wanted = sorted(set(events)) if events else list(EVENT_NAMES)
    unknown = [event for event in wanted if event not in EVENT_NAMES]
    if unknown:
        raise WebhookRefused("events", f"unknown event {', '.join(unknown)}: use {', '.join(EVENT_NAMES)}")
    secret = secrets.token_hex(32)
    return Webhook.objects.create(campaign=campaign, url=url, events=wanted, secret=secret), secret


def remove_webhook(webhook: Webhook) -> None:
    """Stop sending to it (kept with its deliveries as a record)."""
    Webhook.objects.filter(pk=webhook.pk).update(is_active=False)


def _public(address: str) -> bool:
    """Whether an IP address is on the public internet (ipaddress's is_global), the IPv4 one an IPv6
    address carries (mapped, 6to4, Teredo) included; multicast never is."""
    ip = ipaddress.ip_address(address)
    carried = [ip.ipv4_mapped, ip.sixtofour, (ip.teredo or (None, None))[1]] if ip.version == 6 else []
    return all(one.is_global and not one.is_multicast for one in [ip, *carried] if one is not None)


def _own_hosts() -> set[str]:
    """This server's own names (ALLOWED_HOSTS without its patterns): a webhook never posts to the app."""
    return {host.lower() for host in settings.ALLOWED_HOSTS
            if host and host != "*" and not host.startswith(".")}


def target(url: str) -> tuple[str, int, list[str]]:
    """(host, port, addresses) of a webhook URL: every address its host resolves to, each public unless
    PAIRLOOP["WEBHOOK_ALLOW_PRIVATE"]. WebhookRefused when not; OSError when the host does not resolve."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise WebhookRefused("url", "the URL's port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("url", "the URL must start with http:// or https:// and name a host")
    host, port = parts.hostname, port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f"the host {host} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if settings.PAIRLOOP["WEBHOOK_ALLOW_PRIVATE"]:
        return host, port, addresses
    private = [address for address in addresses if not _public(address)]
    if private:
        raise WebhookRefused("url", f"{host} resolves to {', '.join(private)}, not a public address "
                                    f"(PAIRLOOP_WEBHOOK_ALLOW_PRIVATE=1 allows private ones)")
    if host.lower() in _own_hosts():
        raise WebhookRefused("url", f"{host} is this server (PAIRLOOP_WEBHOOK_ALLOW_PRIVATE=1 allows it)")
    return host, port, addresses


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


DELIVER_TASK = "api.deliver_webhook"  # api/tasks.py, on the webhooks queue (settings.CELERY_TASK_ROUTES)


def send_delivery(delivery_id: int, tries: int) -> None:
    """Send a delivery's next try (after `tries` made) to the workers, by its task's name."""
    current_app.send_task(DELIVER_TASK, args=[delivery_id, tries])


def record_event(campaign_id: int, event: str, key: str, payload: dict) -> list[WebhookDelivery]:
    """A delivery per active webhook of the campaign that wants `event`, each sent on commit by a Celery
    task; an event already recorded (the same key) is not sent again."""
    made = []
    for webhook in Webhook.objects.filter(campaign_id=campaign_id, is_active=True):
        if event not in webhook.events:
            continue
        try:
            with transaction.atomic():
                delivery = WebhookDelivery.objects.create(
                    webhook=webhook, event=event, key=key,
                    payload={"event": event, "campaign": webhook.campaign.slug, **payload})
        except IntegrityError:
            continue  # told already
        transaction.on_commit(lambda pk=delivery.pk: send_delivery(pk, 0))
        made.append(delivery)
    return made


def attempt(delivery_id: int, tries: int | None = None) -> tuple[str, int]:
    """POST the delivery once, as its try number `tries` + 1; returns (outcome, tries made). The outcome:
    "delivered", "retry" (the receiver was down, slow, or answered 429 or 5xx: worth another try),
    "failed" (any other answer; or the webhook is gone or off), or "skipped": that try was made already,
    by another message for the same delivery (one the sweep sent again)."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None:
        return WebhookDelivery.FAILED, 0
    if delivery.status != WebhookDelivery.PENDING:
        return delivery.status, delivery.attempts
    if tries is not None and delivery.attempts != tries:
        return SKIPPED, delivery.attempts
    webhook = delivery.webhook
    if not webhook.is_active:
        _finish(delivery, WebhookDelivery.FAILED, error="the webhook was removed")
        return WebhookDelivery.FAILED, delivery.attempts
    # Claim the try: no other message makes it too, and the sweep leaves it be until the task's time limit.
    if not WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.PENDING,
                                          attempts=delivery.attempts).update(
            attempts=F("attempts") + 1, next_try_at=_from_now(time_limit())):
        return SKIPPED, delivery.attempts
    delivery.attempts += 1
    body = json.dumps({**delivery.payload, "delivery": delivery.pk}, cls=DjangoJSONEncoder).encode()
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "pairloop-webhook",
               "X-Pairloop-Event": delivery.event, "X-Pairloop-Delivery": str(delivery.pk),
               "X-Pairloop-Timestamp": str(timestamp),
               "X-Pairloop-Signature": signature(webhook.secret, timestamp, body)}
    try:
        status = _post(webhook.url, headers, body)
    except WebhookRefused as exc:
        _finish(delivery, WebhookDelivery.FAILED, error=f"refused: {exc}")
        return WebhookDelivery.FAILED, delivery.attempts
    except (OSError, http.client.HTTPException) as exc:  # unresolved, refused, unreachable, timed out
        return _retry_or_fail(delivery, None, f"{type(exc).__name__}: {exc}"), delivery.attempts
    if 200 <= status < 300:
        _finish(delivery, WebhookDelivery.DELIVERED, status=status)
        return WebhookDelivery.DELIVERED, delivery.attempts
    if status == 429 or status >= 500:
        return _retry_or_fail(delivery, status, f"the receiver answered {status}"), delivery.attempts
    reason = " (redirects are not followed)" if 300 <= status < 400 else ""
    _finish(delivery, WebhookDelivery.FAILED, status=status, error=f"the receiver answered {status}{reason}")
    return WebhookDelivery.FAILED, delivery.attempts


def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    """POST the body once and return the answer's status: to the addresses `target` checked (the first
    that connects), with the URL's host in the Host header and, over https, in TLS's SNI and certificate
    check. A redirect is an answer like any other, never followed. Connecting, sending and reading the
    answer's head share one deadline, PAIRLOOP["WEBHOOK_TIMEOUT"] s: TimeoutError past it."""
    host, port, addresses = target(url)
    seconds = settings.PAIRLOOP["WEBHOOK_TIMEOUT"]
    deadline = time.monotonic() + seconds

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        return remaining

    def connect_checked(_address, _timeout, source_address=None):
        error = OSError(f"no address of {host} to connect to")
        for address in addresses:
            try:  # the TLS handshake that follows is bounded in all by the timeout it finds on the socket
                return socket.create_connection((address, port), left(), source_address)
            except OSError as exc:
                error = exc
        raise error

    parts = urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(host, port, context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(host, port)
    connection._create_connection = connect_checked  # http.client's hook for opening the socket
    connection.response_class = lambda sock, *args, **kwargs: http.client.HTTPResponse(
        _DeadlineSocket(sock, left), *args, **kwargs)
    try:
        connection.connect()
        connection.sock.settimeout(left())  # sendall: the whole body within the time left
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=body, headers=headers)
        with connection.getresponse() as answer:
            return answer.status
    except TimeoutError:
        raise TimeoutError(f"no whole answer within {seconds} s (PAIRLOOP_WEBHOOK_TIMEOUT)") from None
    finally:
        connection.close()


class _DeadlineSocket:
    """A socket seen by http.client's answer: each read gets only the time left before the deadline, so a
    receiver that trickles its answer a byte at a time still ends at the deadline."""

    def __init__(self, sock, left):
        self.sock, self.left = sock, left

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self.sock, self.left))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock, left):
        self.sock, self.left = sock, left

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(self.left())
        return self.sock.recv_into(buffer)


def _retry_or_fail(delivery: WebhookDelivery, status: int | None, error: str) -> str:
    if delivery.attempts >= MAX_ATTEMPTS:
        _finish(delivery, WebhookDelivery.FAILED, status=status,
                error=f"{error} (after {delivery.attempts} tries)")
        return WebhookDelivery.FAILED
    WebhookDelivery.objects.filter(pk=delivery.pk).update(response_status=status, error=error,
                                                          next_try_at=_from_now(backoff(delivery.attempts)))
    return RETRY


def _finish(delivery: WebhookDelivery, outcome: str, *, status: int | None = None, error: str = "") -> None:
    delivered = timezone.now() if outcome == WebhookDelivery.DELIVERED else None
    WebhookDelivery.objects.filter(pk=delivery.pk, status=WebhookDelivery.PENDING).update(
        status=outcome, response_status=status, error=error, delivered_at=delivered)


def backoff(attempts: int) -> int:
    """Seconds before the next try, after `attempts` tries."""
    return BACKOFF_SECONDS * 2 ** max(0, attempts - 1)


def _from_now(seconds: int) -> ExpressionWrapper:
    """The database's now plus `seconds`: due times are written and compared on the database's clock, so
    the clocks of the hosts that run workers and beat never enter the comparison."""
    return ExpressionWrapper(Now() + Value(timedelta(seconds=seconds)), output_field=DateTimeField())


def resend_stale_deliveries() -> tuple[list[int], list[int]]:
    """Pending deliveries whose next try is more than STALE_SECONDS overdue (their message was lost, or
    their worker died during a try) are sent again; those whose last allowed try was the one lost, or that
    were made more than GIVE_UP_SECONDS ago, are failed. Returns (ids sent again, ids failed). Called by
    Celery beat."""
    resent, failed = [], []
    overdue = WebhookDelivery.objects.filter(status=WebhookDelivery.PENDING,
                                             next_try_at__lt=_from_now(-STALE_SECONDS))
    for delivery in overdue.annotate(db_now=Now()).order_by("next_try_at")[:1000]:
        still = overdue.filter(pk=delivery.pk, attempts=delivery.attempts)  # no try began since it was read
        if delivery.attempts >= MAX_ATTEMPTS:
            error = (f"its last try ({delivery.attempts} of {MAX_ATTEMPTS}) never finished: its worker died "
                     f"or its message was lost")
        elif delivery.created_at < delivery.db_now - timedelta(seconds=GIVE_UP_SECONDS):
            error = (f"still pending {GIVE_UP_SECONDS // 3600} h after it was made, after {delivery.attempts} "
                     f"tries: is a worker consuming the webhooks queue (celery -A pairloop worker -Q "
                     f"webhooks)?")
        else:
            if still.update(next_try_at=_from_now(STALE_SECONDS)):
                transaction.on_commit(
                    lambda pk=delivery.pk, n=delivery.attempts: send_delivery(pk, n))
                resent.append(delivery.pk)
            continue
        if still.update(status=WebhookDelivery.FAILED, error=error):
            failed.append(delivery.pk)
    if resent or failed:
        log.warning("webhook deliveries overdue: %s sent again, %s failed", resent, failed)
    return resent, failed


# ---------------------------------------------------------------------------------------------
# The events (receivers connected in api/apps.py)
# ---------------------------------------------------------------------------------------------

def on_job_state_changed(sender, job, **kwargs) -> None:
    """A job failed (round.failed), or the last job of its round succeeded (round.succeeded)."""
    round_ = job.round
    if job.status == Job.FAILED:
        key = f"round-{round_.pk}-job-{job.pk}-attempt-{job.attempts}-failed"
        payload = {"round": round_.pk, "number": round_.number, "status": "failed", "job": job.pk,
                   "kind": job.kind, "error": job.error.splitlines()[0] if job.error else ""}
        record_event(round_.campaign_id, ROUND_FAILED, key, payload)
    elif job.status == Job.SUCCEEDED and not round_.jobs.exclude(status=Job.SUCCEEDED).exists():
        final = {other.kind: other.result for other in round_.jobs.all()}
        payload = {"round": round_.pk, "number": round_.number, "status": "succeeded",
                   "policy_checkpoint": round_.policy_checkpoint, "results": final}
        record_event(round_.campaign_id, ROUND_SUCCEEDED, f"round-{round_.pk}-succeeded", payload)


def on_queue_emptied(sender, campaign, judgment, **kwargs) -> None:
    record_event(campaign.pk, QUEUE_EMPTY, f"campaign-{campaign.pk}-empty-after-{judgment.pk}",
                 {"last_judgment": judgment.pk})
