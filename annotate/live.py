"""Pushes to browsers through the Channels layer. The database stays the truth: a lost message
only delays a refresh, it never loses state."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from pairloop import redis_guard

log = logging.getLogger(__name__)


def send(group: str, event: dict) -> None:
    """Send an event to a group; a broker that is down is logged, never raised to the caller, and not tried
    again for redis_guard.RETRY_SECONDS (browsers reconnect and reload the state from the database)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        with redis_guard.guard(f"push {event.get('type')}"):
            async_to_sync(layer.group_send)(group, event)
    except redis_guard.RedisDown:
        pass  # logged once per outage by the guard
    except Exception:  # noqa: BLE001 - a push is best effort by design
        log.warning("could not push %s to %s", event.get("type"), group, exc_info=True)


def pairs_arrived(campaign, count: int) -> None:
    send(campaign.group_name(), {"type": "pairs.arrived", "count": count})
