"""Bearer-token authentication for /api/v1/, and the scope check each endpoint makes first."""

from __future__ import annotations

from ninja.errors import HttpError
from ninja.security import HttpBearer

from api.actions import token_allows, token_for


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
