"""/api/v1/: the HTTP API (django-ninja), its Bearer-token authentication and its error bodies.

Every endpoint calls the same access and action functions as the web pages (api/views.py).
"""

from __future__ import annotations

from django.http import Http404
from ninja import NinjaAPI, Swagger

from api.auth import RateLimitedTokenAuth, Throttled, TokenAuth
from api.views import campaigns, labeling, rounds

api = NinjaAPI(
    title="pairloop API",
    version="1",
    description="Label pairs, import and export them, and run training rounds without a browser. "
                "Authenticate with `Authorization: Bearer <token>` (manage.py create_api_token).",
    auth=TokenAuth(),
    urls_namespace="api",
    docs=Swagger(),  # served from django-ninja's own static files: no CDN
    docs_url="/docs",
    openapi_url="/openapi.json",
)


@api.exception_handler(Http404)
def not_found(request, exc):
    """Not found, or not yours: the access functions do not confirm what exists."""
    return api.create_response(request, {"detail": str(exc) or "not found"}, status=404)


@api.exception_handler(Throttled)
def throttled(request, exc):
    """A token over its labeling rate limit: 429, and when to try again."""
    response = api.create_response(request, {"detail": str(exc)}, status=429)
    response["Retry-After"] = str(exc.retry_after)
    return response


api.add_router("/", campaigns)
api.add_router("/", labeling, auth=RateLimitedTokenAuth())
api.add_router("/", rounds)
