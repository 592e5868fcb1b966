"""The URL converter for campaign slugs: Django's unicode slug (letters of any script, digits, - and _)."""

SLUG_PATTERN = r"[-\w]+"
"""What a campaign slug may hold; Django's validate_unicode_slug (SlugField(allow_unicode=True)) allows the same."""


class UnicodeSlugConverter:
    """`<unislug:slug>` in URL patterns (registered in AnnotateConfig.ready): a slug in any script."""

    regex = SLUG_PATTERN

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value
