from django.views.decorators.http import require_safe

from api.api import api

urlpatterns, _, _ = api.urls
for pattern in urlpatterns:
    if pattern.name in ("openapi-json", "openapi-view"):
        pattern.callback = require_safe(pattern.callback)  # the schema and its docs page only answer GET
app_name = "api"
