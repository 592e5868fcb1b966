"""Redis as a speed-up that may be down: callers fall back to the database and pushes pause.

After a failure this process leaves Redis alone for RETRY_SECONDS, so a dead or unreachable server
costs one timeout every few seconds, not one per request; the first call after that tries again.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
_down_until = 0.0
_clock = time.monotonic  # the back-off's clock (tests replace it with one they move by hand)


class RedisDown(RedisError):
    """Redis failed within the last RETRY_SECONDS: not tried again yet."""


def usable() -> bool:
    return _clock() >= _down_until


def failed(what: str, exc: BaseException) -> None:
    global _down_until
    if usable():  # log once per outage window, not once per request
        log.warning("Redis unavailable (%s): %s; falling back for %.0f s", what, exc, RETRY_SECONDS)
    _down_until = _clock() + RETRY_SECONDS


def reset() -> None:
    """Forget a past failure (tests that start and stop Redis)."""
    global _down_until
    _down_until = 0.0


@contextmanager
def guard(what: str):
    """Run a Redis operation: raises RedisDown while Redis is marked down; marks it down when the operation
    fails with a Redis or socket error, and re-raises that as RedisDown."""
    if not usable():
        raise RedisDown(f"{what}: Redis was unavailable less than {RETRY_SECONDS:.0f} s ago")
    try:
        yield
    except RedisDown:
        raise
    except (RedisError, OSError) as exc:
        failed(what, exc)
        raise RedisDown(f"{what}: {exc}") from exc
