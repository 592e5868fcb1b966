"""Markdown to safe HTML for the pages: model and imported text with raw HTML shown as text, and
admins' instructions with a small HTML allow-list. CommonMark (markdown-it-py, linear time), then nh3
as a second wall.

Cost is bounded: text over MAX_MARKDOWN_CHARS, nested deeper than MAX_NESTING, or that makes the
renderer fail is shown as escaped text (every character, nothing formatted); each text is rendered
once and the HTML kept in the cache under its content hash.
"""

from __future__ import annotations

import hashlib
import logging
import re

import markdown_it
import nh3
from django.core.cache import cache
from django.utils.html import escape
from markdown_it import MarkdownIt

from pairloop import redis_guard

log = logging.getLogger(__name__)

MAX_MARKDOWN_CHARS = 20_000  # longer texts show as escaped text; the worst input takes ~0.2 s at this size
# Block and inline nesting levels followed (CommonMark's preset's own): a text with lists or quotes nested
# deeper shows as escaped text (the renderer would drop the rest). Scanning "[[[…" costs this many steps a
# character.
MAX_NESTING = 20
CACHE_SECONDS = 7 * 24 * 3600
_FORMAT = "1"  # bump when the output for the same text changes, so cached HTML is not reused

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "b", "i", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "a", "table", "thead", "tbody", "tr", "th", "td", "del", "s",
}
SAFE_URL_SCHEMES = {"http", "https", "mailto"}
_SCHEME = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.\-]*):")


def _safe_link(url: str) -> bool:
    """A link target is kept when it is relative or its scheme is in SAFE_URL_SCHEMES; otherwise the
    Markdown link stays as its text and target, written out."""
    scheme = _SCHEME.match(url)
    return scheme is None or scheme.group(1).lower() in SAFE_URL_SCHEMES


def _parser(html: bool) -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": html, "maxNesting": MAX_NESTING})
    parser.enable(["table", "strikethrough"]).disable("image")  # an image would load its URL by itself
    parser.validateLink = _safe_link
    return parser


_MODEL_TEXT = _parser(html=False)
_INSTRUCTIONS = _parser(html=True)


def plain(text: str) -> str:
    """Text shown exactly as written, escaped, in a block that keeps its line breaks."""
    return f'<div class="plain-text">{escape(text)}</div>'


def _too_deep(tokens) -> bool:
    """Whether a block opens at the last level followed: what it holds would be dropped."""
    return any(token.nesting == 1 and token.level >= MAX_NESTING - 1 for token in tokens)


def _markdown_html(text: str, parser: MarkdownIt) -> str:
    env: dict = {}
    tokens = parser.parse(text, env)
    if _too_deep(tokens):
        return plain(text)
    return nh3.clean(
        parser.renderer.render(tokens, parser.options, env),
        tags=ALLOWED_TAGS,
        attributes={"a": {"href", "title"}},
        url_schemes=SAFE_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
    )


def _render(text: str, parser: MarkdownIt, kind: str) -> str:
    if not text:
        return ""
    if len(text) > MAX_MARKDOWN_CHARS:
        return plain(text)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    key = f"markdown:{kind}:{_FORMAT}:{markdown_it.__version__}:{nh3.__version__}:{digest}"
    try:
        with redis_guard.guard("rendered Markdown"):
            cached = cache.get(key)
    except redis_guard.RedisDown:
        cached = None
    if cached is not None:
        return cached
    try:
        html = _markdown_html(text, parser)
    except Exception:  # any renderer failure: the text is still shown, as written
        log.warning("Markdown renderer failed on a %d-character text; showing it as plain text", len(text),
                    exc_info=True)
        html = plain(text)
    try:
        with redis_guard.guard("keep rendered Markdown"):
            cache.set(key, html, timeout=CACHE_SECONDS)
    except redis_guard.RedisDown:
        pass
    return html


def render_model_text(text: str) -> str:
    """Prompts, responses, chat turns and any imported text: Markdown with raw HTML shown as text."""
    return _render(text, _MODEL_TEXT, "model")


def render_instructions(text: str) -> str:
    """Admin-written instructions and content warnings: Markdown plus HTML kept to ALLOWED_TAGS."""
    return _render(text, _INSTRUCTIONS, "instructions")
