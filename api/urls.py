from django.http import JsonResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from api.api import api


@csrf_exempt  # answers 404 to every method, changing nothing; a CSRF refusal would be an HTML page
def not_found(request):
    """Any other URL under /api/v1/ (a slug that is not one, a word where an id goes): a JSON 404, as the
    endpoints answer, instead of the site's HTML page."""
    return JsonResponse({"detail": "no such API URL: see /api/v1/openapi.json"}, status=404)


urlpatterns, _, _ = api.urls
for pattern in urlpatterns:
    if pattern.name in ("openapi-json", "openapi-view"):
        pattern.callback = require_safe(pattern.callback)  # the schema and its docs page only answer GET
urlpatterns = [*urlpatterns, re_path(r".*", not_found, name="not_found")]
app_name = "api"
