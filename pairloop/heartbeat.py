"""A heartbeat thread: keeps a long job's row fresh while the thread that runs it is busy.

Import jobs and training jobs both use it; each passes its own `beat` (one conditional UPDATE of its
row) and what the thread must release when it ends (its own database connections).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Calls `beat` every `interval` seconds until stopped, or until `beat` returns False (the job is no
    longer this worker's); then calls `on_exit` from this thread."""

    def __init__(self, name: str, interval: float, beat: Callable[[], bool],
                 on_exit: Callable[[], None] = lambda: None):
        super().__init__(name=name, daemon=True)
        self.interval, self._beat, self._on_exit = interval, beat, on_exit
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                try:
                    if not self._beat():
                        return
                except Exception:  # noqa: BLE001 - a missed beat is retried; staleness is the alarm
                    log.warning("%s: a beat failed", self.name, exc_info=True)
        finally:
            self._on_exit()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
