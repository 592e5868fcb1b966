"""Authentication backends: django-axes' login throttling, then Django's ModelBackend with a lighter
get_user."""

from __future__ import annotations

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend


class PairloopModelBackend(ModelBackend):
    """ModelBackend whose get_user, run on every request (labeling is one request per judgment), is one
    plain query instead of an ORM query built each time. Same rules: an inactive user is no user."""

    def get_user(self, user_id):
        model = get_user_model()
        try:
            pk = model._meta.pk.to_python(user_id)
        except Exception:  # a session holding a malformed id is no session
            return None
        query = f"SELECT * FROM {model._meta.db_table} WHERE {model._meta.pk.column} = %s"
        user = next(iter(model._default_manager.raw(query, [pk])), None)
        return user if user is not None and self.user_can_authenticate(user) else None


class PairloopAxesBackend(AxesStandaloneBackend):
    """django-axes' lockout check for logins through a web request (the login pages). A login without
    a request (the test client's, a shell's) is not a password guess from the network: it is let
    through to the next backend instead of refused."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


def client_ip(request) -> str | None:
    """The client's address for login throttling: REMOTE_ADDR, or behind a proxy
    (PAIRLOOP_BEHIND_PROXY) the last X-Forwarded-For entry, the one the proxy itself appended."""
    if settings.BEHIND_PROXY:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if forwarded[-1]:
            return forwarded[-1]
    return request.META.get("REMOTE_ADDR")
