"""The Celery app: `celery -A pairloop worker -Q default,training`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pairloop.settings")

app = Celery("pairloop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
