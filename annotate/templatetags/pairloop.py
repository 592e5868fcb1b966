"""Template filters. Model outputs are never rendered as HTML; prompts and instructions are
Markdown rendered and then sanitised (nh3 allow-list: no scripts, no event handlers, no
javascript: links)."""

from __future__ import annotations

from functools import lru_cache

import markdown as markdown_lib
import nh3
from django import template
from django.utils.safestring import mark_safe

register = template.Library()

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "b", "i", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td", "del",
}


@lru_cache(maxsize=4096)
def render_markdown(text: str) -> str:
    html = markdown_lib.markdown(text or "", extensions=["fenced_code", "tables", "sane_lists"])
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes={"a": {"href", "title"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


@register.filter(name="markdown")
def markdown_filter(text: str) -> str:
    return mark_safe(render_markdown(text))  # noqa: S308 - sanitised by nh3 above


@register.filter
def duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def pvalue(value) -> str:
    """A p-value in two significant digits (3.9e-34, 0.021, 1): never rounded to a misleading 0."""
    if value is None:
        return "—"
    return f"{float(value):.2g}"
