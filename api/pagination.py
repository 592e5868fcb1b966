"""Pages of every list endpoint: django-ninja's limit/offset pagination, each item built by the endpoint's
response schema from the rows of its page only."""

from __future__ import annotations

from typing import Any

from ninja import Field, Schema
from ninja.pagination import LimitOffsetPagination

PAGE_SIZE = 20  # items a page holds unless ?limit= asks for another number
MAX_PAGE_SIZE = 100  # the most ?limit= may ask for


class Pages(LimitOffsetPagination):
    """`?limit=` (PAGE_SIZE by default, at most MAX_PAGE_SIZE) and `?offset=`; answers `{items, count}`."""

    class Input(Schema):
        limit: int = Field(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="Items on this page.")
        offset: int = Field(0, ge=0, description="Items skipped before this page.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_limit=MAX_PAGE_SIZE, **kwargs)

    def paginate_queryset(self, queryset, pagination: Input, request, **params: Any) -> dict:
        page = queryset[pagination.offset:pagination.offset + pagination.limit]
        return {"items": list(page), "count": queryset.count()}
