"""One door per state change of API tokens: create, revoke, and the use that stamps last_used_at."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.utils import timezone

from annotate.access import is_admin, is_reviewer
from api.models import ADMIN, EXPORT, IMPORT, LABEL, REVIEW, SCOPE_NAMES, ApiToken

TOKEN_PREFIX = "pl"
LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per token


class TokenRefused(ValueError):
    """A token that cannot be made as asked (an unknown scope, one above the user's role)."""


def role_allows(user, scope: str) -> bool:
    """Whether the user's role allows `scope` now (annotate/access.py decides roles): labelers label
    (which campaigns: their membership, checked per campaign); reviewers also read and export; admins
    do everything. Labeling asks nothing more of the database than the user row already loaded."""
    if not user.is_active:
        return False
    if scope == LABEL:
        return True
    if scope in (REVIEW, EXPORT):
        return is_reviewer(user)
    return scope in (IMPORT, ADMIN) and is_admin(user)


def role_scopes(user) -> set[str]:
    """Every scope the user's role allows now; a token never exceeds them."""
    return {scope for scope in SCOPE_NAMES if role_allows(user, scope)}


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def create_token(user, name: str, scopes: list[str] | None = None, now=None) -> tuple[ApiToken, str]:
    """A new token for the user; returns (row, the token itself), which is shown once and never stored.

    Without `scopes`, every scope the user's role allows. Raises TokenRefused for an unknown scope or
    one the user's role does not allow."""
    allowed = role_scopes(user)
    wanted = sorted(set(scopes)) if scopes else sorted(allowed)
    unknown = [scope for scope in wanted if scope not in SCOPE_NAMES]
    if unknown:
        raise TokenRefused(f"unknown scope {', '.join(unknown)}: use {', '.join(SCOPE_NAMES)}")
    above = [scope for scope in wanted if scope not in allowed]
    if above:
        raise TokenRefused(f"{user.get_username()} may not have the scope {', '.join(above)} "
                           f"(their role allows: {', '.join(sorted(allowed)) or 'nothing'})")
    if not name.strip():
        raise TokenRefused("a token needs a name saying what it is for")
    prefix = secrets.token_hex(6)
    raw = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(user=user, name=name.strip()[:100], scopes=wanted, prefix=prefix,
                                    hash=_digest(raw), created_at=now or timezone.now())
    return token, raw


def revoke_token(token: ApiToken, now=None) -> ApiToken:
    """Refuse the token from now on (kept, so the admin still shows who had it and when it was used)."""
    now = now or timezone.now()
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now)
    token.refresh_from_db(fields=["revoked_at"])
    return token


def token_for(raw: str, now=None) -> ApiToken | None:
    """The live token this Bearer value is, with its user; None for anything else (malformed, unknown,
    revoked, its user deactivated). Stamps last_used_at, at most once a minute."""
    parts = raw.split("_", 2)  # the secret may hold "_" itself
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    token = ApiToken.objects.select_related("user").filter(prefix=parts[1]).first()
    if token is None or not hmac.compare_digest(token.hash, _digest(raw)):
        return None
    if token.revoked_at is not None or not token.user.is_active:
        return None
    now = now or timezone.now()
    if token.last_used_at is None or token.last_used_at < now - LAST_USED_EVERY:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def token_allows(token: ApiToken, scope: str) -> bool:
    """Whether the token may act in `scope` on this request: one of its scopes, and its user's role allows it
    now (a demoted user's token loses what the role no longer allows)."""
    return scope in token.scopes and role_allows(token.user, scope)
