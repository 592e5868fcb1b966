"""The documentation's links lead somewhere, and code comments cite only sections that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md"),
               *ROOT.glob("CONTRIBUTING.md")])
CODE_FOLDERS = ["pairloop", "annotate", "training", "api", "tests", "benchmarks", "scripts", ".ci"]
CODE_SUFFIXES = {".py", ".html", ".js", ".css", ".toml", ".txt", ".sh", ".cfg", ".jinja", ""}
BENCHMARKS_README = "benchmarks/README.md"
CITATION = re.compile(re.escape(BENCHMARKS_README) + r"(#[\w-]*)?")
DOCS_CITATION = re.compile(r"\bdocs/[\w-]+\.md(?:#[\w-]+)?")
UNREADABLE = re.compile(r"\b(?:DESIGN|STYLE)\.md\b|\bissues? #?\d+|\bthe issue's\b|\bthis issue\b", re.I)
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (not '-' or '_'), spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def parse(path: Path) -> list:
    return MarkdownIt("commonmark").enable("table").parse(path.read_text())


def anchors(path: Path) -> set[str]:
    """Every '#...' a link into this Markdown file may name: headings' slugs (repeats get -1, -2, ...)
    and explicit <a id> anchors."""
    tokens, found, seen = parse(path), set(), {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type == "heading_open":
            text = "".join(child.content for child in inline.children
                           if child.type in {"text", "code_inline"})
            slug = github_slug(text)
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found | set(EXPLICIT_ANCHOR.findall(path.read_text()))


def relative_links(path: Path) -> list[str]:
    """The href of every link in a Markdown file that is not to a web address or e-mail."""
    hrefs = []
    for token in parse(path):
        for child in token.children or []:
            href = child.attrGet("href") if child.type == "link_open" else None
            if href and not re.match(r"[a-z][a-z0-9+.-]*:", href):
                hrefs.append(href)
    return hrefs


def broken(source: Path, href: str) -> str | None:
    """Why a relative link from `source` leads nowhere, or None."""
    target, _, anchor = href.partition("#")
    path = (source.parent / target).resolve() if target else source
    if not path.exists():
        return f"{href}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"{href}: no section #{anchor} in {path.relative_to(ROOT)}"
    return None


def code_files() -> list[Path]:
    files = [ROOT / name for name in ("pyproject.toml", "constraints.txt", "manage.py")]
    for folder in CODE_FOLDERS:
        files += [path for path in (ROOT / folder).rglob("*")
                  if path.is_file() and path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts
                  and path != Path(__file__).resolve()]
    return files


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_of_the_documentation_leads_to_a_file_and_section(doc):
    assert doc.exists()
    problems = [problem for href in relative_links(doc) if (problem := broken(doc, href))]
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_front_page_links_every_page_of_docs():
    linked = {(ROOT / href.partition("#")[0]).resolve() for href in relative_links(ROOT / "README.md")}
    unlinked = [page.name for page in (ROOT / "docs").glob("*.md") if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_every_code_comment_citing_the_benchmarks_readme_names_a_section_that_exists():
    sections = anchors(ROOT / BENCHMARKS_README)
    citations, problems = 0, []
    for path in code_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                citations += 1
                anchor = (match.group(1) or "#")[1:]
                if anchor not in sections:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert citations >= 10  # the engine's defaults cite their figures: a search that finds none is broken
    assert not problems, "cites no section of benchmarks/README.md that exists: " + "; ".join(problems)


def test_no_comment_or_page_points_at_a_document_or_issue_a_reader_cannot_open():
    found = []
    for path in code_files() + DOCS:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if match := UNREADABLE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not found, "; ".join(found)


def test_every_code_comment_citing_a_page_of_docs_names_one_that_exists():
    problems = []
    for path in code_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in DOCS_CITATION.finditer(line):
                if problem := broken(ROOT / "README.md", match.group(0)):
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {problem}")
    assert not problems, "; ".join(problems)
