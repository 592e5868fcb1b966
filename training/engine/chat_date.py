"""The date chat templates write as today's, pinned for a block of rendering.

Llama 3's chat templates put "Today Date: <date>" into every rendered prompt, from the `date_string`
variable or else the clock, so the same round rendered tomorrow would read differently. The runner
pins each round's date around its jobs (common.apply_chat_template passes it as `date_string`); the
process-wide value reaches every thread of a stage, and launch.py hands it to its child processes.
Plain Python: no torch, so the web process can name the format.
"""

from __future__ import annotations

from contextlib import contextmanager

CHAT_DATE_FORMAT = "%d %b %Y"  # how Llama 3's chat templates write a date ("26 Jul 2024")
_pinned = ""  # "" : the templates' own clock


@contextmanager
def pinned_chat_date(date_string: str):
    """Inside the block, chat templates that write today's date write `date_string` instead ("": the clock)."""
    global _pinned
    before, _pinned = _pinned, date_string
    try:
        yield
    finally:
        _pinned = before


def chat_date() -> str:
    """The date pinned_chat_date set ("" when none)."""
    return _pinned
