"""Pages of every list endpoint: django-ninja's limit/offset pagination, each item built from the rows of its
page only (by the endpoint's own output function of the row and the request, or its response schema)."""

from __future__ import annotations

from collections.abc import Callable
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

    def __init__(self, *, out: Callable[[Any, Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(max_limit=MAX_PAGE_SIZE, **kwargs)
        self.out = out

    def paginate_queryset(self, queryset, pagination: Input, request, **params: Any) -> dict:
        page = queryset[pagination.offset:pagination.offset + pagination.limit]
        items = [self.out(row, request) for row in page] if self.out else list(page)
        return {"items": items, "count": queryset.count()}
