"""Bearer-token authentication for /api/v1/, the scope check each endpoint makes first, and the per-token
rate limit of the labeling endpoints."""

from __future__ import annotations

import math
import time

from django.conf import settings
from django.core.cache import cache
from ninja.errors import HttpError
from ninja.security import HttpBearer

from api.actions import token_allows, token_for
from pairloop.redis_guard import RedisDown, guard


class TokenAuth(HttpBearer):
    """`Authorization: Bearer pl_...`: the token's user becomes request.user, so the web's access functions
    (annotate/access.py, training/access.py) decide what it may see. Anything else: 401."""

    def authenticate(self, request, token):
        found = token_for(token)
        if found is None:
            return None
        request.user = found.user
        request.api_token = found
        return found


def require_scope(request, scope: str) -> None:
    """403 unless the request's token has `scope` and its user's role still allows it."""
    if not token_allows(request.api_token, scope):
        raise HttpError(403, f"this token lacks the {scope!r} scope (or the user's role no longer allows it)")


RATE_WINDOW_SECONDS = 60


class Throttled(Exception):
    """A token over its rate limit; the API answers 429 with Retry-After (api/api.py)."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"this token made more than {limit} labeling requests in a minute "
                         f"(PAIRLOOP_API_RATE_LIMIT): try again in {retry_after} s")
        self.retry_after = retry_after


def count_request(token_id: int) -> None:
    """Count one labeling request of a token against PAIRLOOP_API_RATE_LIMIT a minute, in the cache (Redis)
    so every web process counts together; raise Throttled past it. While Redis is down nothing is counted."""
    limit = settings.PAIRLOOP["API_RATE_LIMIT"]
    if not limit:
        return
    count_key, start_key = f"pairloop:api-rate:{token_id}:count", f"pairloop:api-rate:{token_id}:start"
    now = time.time()
    try:
        with guard("API rate limit"):
            cache.add(start_key, now, timeout=RATE_WINDOW_SECONDS)  # the first request opens the window
            cache.add(count_key, 0, timeout=RATE_WINDOW_SECONDS)
            try:
                count = cache.incr(count_key)
            except ValueError:  # the window closed between the two calls: this opens the next one
                count = 1
            started = cache.get(start_key) or now
    except RedisDown:
        return
    if count > limit:
        raise Throttled(limit, max(1, math.ceil(started + RATE_WINDOW_SECONDS - now)))


class RateLimitedTokenAuth(TokenAuth):
    """TokenAuth for the labeling endpoints (claim, judge and next, skip, undo): each request also counts
    against its token's rate limit (count_request)."""

    def authenticate(self, request, token):
        found = super().authenticate(request, token)
        if found is not None:
            count_request(found.pk)
        return found
