"""A Chinese, Japanese and Korean campaign in a real browser: labeled by keyboard at a desktop and a
phone width with nothing wider than the window, then exported and imported again byte for byte."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from annotate.actions import PairInput, add_pairs
from annotate.models import Judgment, Pair
from tests.browser.conftest import off_the_loop
from tests.browser.test_labeling_browser import (
    current_assignment_id,
    log_in,
    open_label_page,
    wait_for_another_pair,
)
from tests.conftest import make_campaign
from tests.test_cjk import rows, stored, utf8

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# A line of 400 characters with no space to break at, and a Markdown table of CJK cells.
LONG_LINE = "量子力学研究非常小的东西比如原子和光子它们的行为和我们日常看到的物体不一样" * 10
TABLE = "| 语言 | 言語 | 언어 |\n| --- | --- | --- |\n| " + " | ".join([LONG_LINE[:120]] * 3) + " |"

# Katakana dense with small kana and long-vowel marks, which Japanese never starts a line with.
KANA_LINE = "チョコレートケーキとコーヒーとミルクティーとジュースをショップでゲットッ" * 12
NO_LINE_START = "ーッャュョァィゥェォ"
LINE_STARTS = """() => {
    const starts = [];
    for (const box of document.querySelectorAll('#pair .prompt, #pair .response-md')) {
        const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
        let top = null;
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (let i = 0; i < node.length; i++) {
                const range = document.createRange();
                range.setStart(node, i); range.setEnd(node, i + 1);
                const rect = range.getClientRects()[0];
                if (!rect) continue;
                if (top !== null && rect.top > top + 1) starts.push(node.data[i]);
                top = rect.top;
            }
        }
    }
    return starts.join('');
}"""
OVERFLOW = """() => {
    const page = document.documentElement;
    const wide = [...document.querySelectorAll('#pair, #pair *')]
        .filter(el => el.getBoundingClientRect().right > page.clientWidth + 1 && !el.closest('pre'));
    return {page: page.scrollWidth - page.clientWidth, wide: wide.map(el => el.className || el.tagName)};
}"""


@pytest.mark.parametrize("width", [1280, 390])
def test_it_labels_cjk_pairs_by_keyboard_without_horizontal_overflow(page, labeler, tmp_path, width):
    table = rows()
    table[0]["response_a"] = LONG_LINE
    table[1]["response_b"] = TABLE
    table[4]["response_b"] = KANA_LINE
    campaign = make_campaign(f"中日韩-{width}", members=[labeler], overlap=1, ask_strength=False)
    campaign.name = "中文、日本語、한국어のラベリングキャンペーン" * 3
    campaign.save(update_fields=["name"])
    add_pairs(campaign, [PairInput(row["prompt"], row["response_a"], row["response_b"]) for row in table],
              notify=False)
    expected = utf8(stored(campaign))
    page.set_viewport_size({"width": width, "height": 900})
    log_in(page, labeler)
    open_label_page(page, campaign)

    # The platform's CJK fonts follow the Latin ones (none is installed here: the glyphs show as boxes).
    fonts = page.evaluate("getComputedStyle(document.querySelector('#pair .prompt')).fontFamily")
    assert "Noto Sans CJK SC" in fonts and "PingFang SC" in fonts
    assignment_id = current_assignment_id(page)
    for n in range(len(table)):
        pair = Pair.objects.get(assignments__pk=assignment_id)
        assert pair.prompt.text in page.inner_text(".prompt")
        assert page.evaluate(OVERFLOW) == {"page": 0, "wide": []}, f"pair {n} is wider than {width} px"
        starts = page.evaluate(LINE_STARTS)
        assert not set(starts) & set(NO_LINE_START), f"pair {n}: lines start with {starts!r}"
        page.wait_for_timeout(60)
        page.keyboard.press("123"[n % 3])
        if n < len(table) - 1:
            assignment_id = wait_for_another_pair(page, assignment_id)
    page.wait_for_selector("#queue-empty")
    assert Judgment.objects.filter(pair__campaign=campaign, labeler=labeler).count() == len(table)

    out = tmp_path / "export.jsonl"
    call_command("export_pairs", campaign.slug, str(out), "--raw", stdout=io.StringIO())
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(exported) == len(table)
    again = make_campaign(f"再-{width}")
    off_the_loop(call_command, "import_pairs", again.slug, str(out), stdout=io.StringIO())
    assert sorted(utf8(stored(again))) == sorted(expected)
