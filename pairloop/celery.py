"""The Celery app: `celery -A pairloop worker -Q default,training,webhooks`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")

app = Celery("pairloop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Jobs whose worker died (SIGKILL, lost machine) stop sending heartbeats: mark them failed soon after.
app.conf.beat_schedule = {
    "fail-stale-training-jobs": {"task": "training.fail_stale_jobs", "schedule": 15.0},
    "recover-stale-import-jobs": {"task": "annotate.recover_stale_import_jobs", "schedule": 60.0},
    # Webhook deliveries whose message or worker was lost are sent again (on the default queue, so that
    # with no webhooks worker at all they still end, failed with the reason).
    "resend-stale-webhook-deliveries": {"task": "api.resend_stale_webhook_deliveries", "schedule": 60.0},
}
