"""WebSocket consumer per round: pushes each job's status, progress bar, ETA and log tail as htmx
fragments (swapped by id by htmx's ws extension), then the job's latest metric points as a JSON
message that static/pairloop/training.js adds to its charts.

Every message is rendered from the database row, so the browser always shows the row's state. On
connect it sends the current state of every job, which heals anything missed while disconnected.
Access: reviewers and admins, as for the round page (training.access.round_for_reviewer), checked
again before every push (annotate.consumers.AccessCheckedConsumer): a demoted reviewer's socket closes.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from django.template.loader import render_to_string

from annotate.access import is_admin
from annotate.consumers import AccessCheckedConsumer
from training.access import round_for_reviewer, sees_tracebacks
from training.models import Job

POINTS_PER_MESSAGE = 50


class RoundConsumer(AccessCheckedConsumer):
    def grant(self, request) -> str:
        self.round = round_for_reviewer(request, self.scope["url_route"]["kwargs"]["round_id"])
        self.is_admin = is_admin(request.user)  # rechecked too: a demoted admin's fragments lose the buttons
        self.show_traceback = sees_tracebacks(request.user)
        return self.round.group_name()

    async def connect(self):
        await super().connect()
        if not self.joined:
            return  # refused
        for job_id in await database_sync_to_async(self._job_ids)():
            await self._send_job(job_id)

    async def job_update(self, event):
        if await self.still_allowed():
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
                                {"job": job, "round": round_, "is_admin": self.is_admin,
                                 "show_traceback": self.show_traceback, "oob": True})
        html += render_to_string("training/round_detail.html#round-status", {"round": round_, "oob": True})
        points = {"type": "points", "job": job.pk, "attempt": job.attempts,
                  "points": job.chart_points(last=POINTS_PER_MESSAGE)}
        return html, points
