"""Template filters. Model and imported text is Markdown with raw HTML shown as text, instructions keep
a small HTML allow-list; both sanitised by nh3 (annotate.rendering)."""

from __future__ import annotations

from django import template
from django.utils.safestring import mark_safe

from annotate.rendering import render_instructions, render_model_text

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> str:
    """A prompt, response or chat turn: what the model wrote, formatted, every character shown."""
    return mark_safe(render_model_text(text))  # noqa: S308 - escaped, then sanitised by nh3


@register.filter(name="instructions_markdown")
def instructions_filter(text: str) -> str:
    """Text an admin wrote (instructions, content warning): Markdown with an HTML allow-list."""
    return mark_safe(render_instructions(text))  # noqa: S308 - sanitised by nh3


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
