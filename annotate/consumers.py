"""WebSocket consumer per campaign: tells a labeler waiting on an empty queue that pairs arrived.

It sends an htmx fragment; htmx's ws extension swaps it in by id and the fragment fetches the
next pair. Access is checked with the same rule as the labeling page.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404
from django.urls import reverse

from annotate.access import campaign_for_labeler


class _Request:
    def __init__(self, user):
        self.user = user


class CampaignConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()
            return
        slug = self.scope["url_route"]["kwargs"]["slug"]
        try:
            self.campaign = await database_sync_to_async(campaign_for_labeler)(_Request(user), slug)
        except Http404:
            await self.close()
            return
        self.group = self.campaign.group_name()
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def pairs_arrived(self, event):
        url = reverse("label", args=[self.campaign.slug])
        await self.send(text_data=(
            f'<div id="queue-signal" hx-get="{url}" hx-trigger="load" hx-target="#pair" hx-swap="outerHTML">'
            f"{int(event.get('count', 0))} new pairs arrived — loading…</div>"
        ))
