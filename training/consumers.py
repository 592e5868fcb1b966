"""WebSocket consumer per round: pushes each job's status, progress bar, ETA and log tail as htmx
fragments (swapped by id by htmx's ws extension), then the job's latest metric points as a JSON
message that static/pairloop/training.js adds to its charts.

Every message is rendered from the database row, so the browser always shows the row's state. On
connect it sends the current state of every job, which heals anything missed while disconnected.
Access: reviewers and admins, as for the round page (training.access.round_for_reviewer).
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404
from django.template.loader import render_to_string

from annotate.access import is_admin
from training.access import round_for_reviewer
from training.models import Job

POINTS_PER_MESSAGE = 50


class _Request:
    def __init__(self, user):
        self.user = user


class RoundConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()
            return
        try:
            round_id = self.scope["url_route"]["kwargs"]["round_id"]
            self.round = await database_sync_to_async(round_for_reviewer)(_Request(user), round_id)
        except Http404:
            await self.close()
            return
        self.is_admin = is_admin(user)
        self.group = self.round.group_name()
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        for job_id in await database_sync_to_async(self._job_ids)():
            await self._send_job(job_id)

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_update(self, event):
        await self._send_job(int(event["job_id"]))

    def _job_ids(self) -> list[int]:
        return list(Job.objects.filter(round_id=self.round.pk).values_list("pk", flat=True))

    async def _send_job(self, job_id: int) -> None:
        rendered = await database_sync_to_async(self._render)(job_id)
        if rendered is None:
            return
        html, points = rendered
        await self.send(text_data=html)
        await self.send(text_data=json.dumps(points))

    def _render(self, job_id: int):
        job = Job.objects.select_related("round__campaign").filter(pk=job_id, round_id=self.round.pk).first()
        if job is None:
            return None
        round_ = job.round
        html = render_to_string("training/round_detail.html#job-live",
                                {"job": job, "round": round_, "is_admin": self.is_admin, "oob": True})
        html += render_to_string("training/round_detail.html#round-status", {"round": round_, "oob": True})
        points = {"type": "points", "job": job.pk, "attempt": job.attempts,
                  "points": job.chart_points(last=POINTS_PER_MESSAGE)}
        return html, points
