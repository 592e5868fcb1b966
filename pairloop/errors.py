"""Django's technical error page (shown when DEBUG is on) for admins only: everyone else, and anyone
not logged in, gets a one-line error; the traceback still goes to the log."""

from __future__ import annotations

from django.views.debug import ExceptionReporter

PLAIN_ERROR = "The server could not answer this request; the error is in its log."


def _viewer_is_admin(request) -> bool:
    from annotate.access import is_admin  # Django's logging set-up loads this module before the models

    try:
        return request is not None and hasattr(request, "user") and is_admin(request.user)
    except Exception:  # the failure may be the database that would say who the user is
        return False


class StaffOnlyExceptionReporter(ExceptionReporter):
    def get_traceback_html(self):
        if self.is_email or _viewer_is_admin(self.request):
            return super().get_traceback_html()
        return f"<!doctype html><title>Error</title><h1>Error</h1><p>{PLAIN_ERROR}</p>"

    def get_traceback_text(self):
        if self.is_email or _viewer_is_admin(self.request):
            return super().get_traceback_text()
        return PLAIN_ERROR
