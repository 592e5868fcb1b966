"""How a progress callback stops a run without a checkpoint; apart from common.py so that the Django
side can use it without importing torch."""


class StopWithoutSaving(RuntimeError):
    """Raised by a progress callback to stop a run at once, writing nothing more (no resume checkpoint)."""
