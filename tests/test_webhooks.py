"""Webhooks: a signed POST to a campaign's subscribers when a round succeeds or fails and when its queue
empties, retried with backoff, recorded per delivery; managed through the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from annotate.actions import claim_next_pair, submit_judgment
from api import tasks, webhooks
from api.models import WebhookDelivery
from tests.conftest import make_campaign
from tests.test_api import api_for
from training import actions as training_actions
from training.config import build_config
from training.models import Job

pytestmark = pytest.mark.django_db(transaction=True)  # real commits: events are sent on commit


class Receiver:
    """An HTTP server on loopback that records each POST and answers with the next status of `answers`."""

    def __init__(self, answers=(200,)):
        self.answers, self.received = list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        return [json.loads(body)["event"] for _, body in self.received]


@pytest.fixture
def receiver():
    made = []

    def make(answers=(200,)):
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for one in made:
        one.server.shutdown()


@pytest.fixture
def sent_at_once(monkeypatch, settings):
    """Deliveries run in this process as the commit happens (retries at once, their countdown skipped)."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 1}
    monkeypatch.setattr("training.tasks.start_chain", lambda job_ids: None)
    monkeypatch.setattr(tasks.deliver_webhook, "delay", lambda pk: tasks.deliver_webhook.apply(args=[pk]))


def run_round(campaign, admin_user, fail_kind=None):
    round_ = training_actions.launch_round(campaign, admin_user, build_config("tiny", {}))
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
    assert api.get("/campaigns/shop/webhooks").json()[0]["deliveries"][0]["status"] == "delivered"


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
    assert api.get("/campaigns/shop/webhooks").json() == []
    run_round(campaign, admin_user, fail_kind=Job.EXPORT)
    assert hook.events() == ["round.succeeded"]


def test_it_refuses_a_url_that_is_not_http_and_an_unknown_event(admin_user):
    make_campaign()
    api = api_for(admin_user)
    assert api.post("/campaigns/shop/webhooks", {"url": "file:///etc/passwd"}).status_code == 422
    unknown = api.post("/campaigns/shop/webhooks", {"url": "http://x", "events": ["round.done"]})
    assert unknown.status_code == 422
    assert not WebhookDelivery.objects.exists()
