"""The engine's one error for bad input; apart from common.py so that the Django side can catch it
without importing torch."""


class EngineError(ValueError):
    """A problem with the user's input (data, model path, settings), found before training."""
