"""Authentication backends: django-axes' login throttling, then Django's ModelBackend with a lighter
get_user that refuses the README's public demo passwords from anywhere but this machine."""

from __future__ import annotations

import ipaddress

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_client_ip_address, get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.db.models import Sum

FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")

# The demo users (demo/seed.py creates them) with the README's published passwords, refused from afar here.
DEMO_USERS = [
    # username, password, role
    ("admin", "pairloop-admin", "admin"),
    ("reviewer", "pairloop-review", "reviewer"),
    ("labeler1", "pairloop-label", "labeler"),
    ("labeler2", "pairloop-label", "labeler"),
    ("labeler3", "pairloop-label", "labeler"),
]


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def from_this_machine(request) -> bool:
    """Whether a request came from a loopback address straight, with no proxy's forwarding header."""
    return (is_loopback(request.META.get("REMOTE_ADDR") or "")
            and not any(request.META.get(header) for header in FORWARDING_HEADERS))


def public_demo_password(password: str | None) -> bool:
    """Whether `password` is one of the README's published demo passwords (DEMO_USERS)."""
    return password is not None and any(password == known for _, known, _ in DEMO_USERS)


class PairloopModelBackend(ModelBackend):
    """ModelBackend whose get_user, run on every request (labeling is one request per judgment), is one
    plain query instead of an ORM query built each time. Same rules: an inactive user is no user. A login
    with a README demo password through the network (not loopback, or through a proxy) is refused."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None or request is None or not public_demo_password(password) or from_this_machine(request):
            return user
        if hasattr(request, "_messages"):
            messages.error(request, f"{user.get_username()} still has a public demo password from the README, "
                                    "accepted only from this machine itself. Change it on the server: "
                                    f"manage.py changepassword {user.get_username()}")
        return None

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


def failure_limit(request, credentials) -> int:
    """django-axes' failure limit: axes counts a username's failures from every address, which lock it at
    PAIRLOOP_LOGIN_USERNAME_FAILURE_LIMIT; those from this request's address alone lock that pair sooner,
    at PAIRLOOP_LOGIN_FAILURE_LIMIT."""
    username = get_client_username(request, credentials)
    here = AccessAttempt.objects.filter(username=username, ip_address=get_client_ip_address(request))
    failures_here = here.aggregate(total=Sum("failures_since_start"))["total"] or 0
    return settings.LOGIN_FAILURE_LIMIT if failures_here >= settings.LOGIN_FAILURE_LIMIT \
        else settings.LOGIN_USERNAME_FAILURE_LIMIT


def client_ip(request) -> str | None:
    """The client's address for login throttling: REMOTE_ADDR, or behind a proxy
    (PAIRLOOP_BEHIND_PROXY) the last X-Forwarded-For entry, the one the proxy itself appended."""
    if settings.BEHIND_PROXY:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if forwarded[-1]:
            return forwarded[-1]
    return request.META.get("REMOTE_ADDR")
