"""annotate.agreement on small fixed examples whose kappa, alpha and p-values are worked out by hand."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from annotate import agreement
from annotate.agreement import Vote


def votes_from(table: dict[str, list[str | None]]) -> list[Vote]:
    """{labeler: [choice per pair or None]} as votes on pairs 1, 2, 3..."""
    return [Vote(pair_id=i + 1, labeler=name, choice=choice)
            for name, choices in table.items() for i, choice in enumerate(choices) if choice is not None]


# Two labelers, five pairs, one disagreement (pair 2).
TWO = {"ann": ["a", "a", "b", "b", "a"], "bob": ["a", "b", "b", "b", "a"]}
# Three labelers; pair 2 judged by two, pair 4 by one (it cannot show agreement).
THREE = {"ann": ["a", "a", "b", "b"], "bob": ["a", "b", "b", None], "cy": ["a", None, "a", None]}


def test_it_computes_cohens_kappa_by_hand():
    # Observed 4/5 = 0.8. Marginals: ann a=3 b=2, bob a=2 b=3, so chance = (3*2 + 2*3) / 25 = 0.48.
    # kappa = (0.8 - 0.48) / (1 - 0.48) = 0.32 / 0.52 = 8/13.
    assert agreement.cohen_kappa(TWO["ann"], TWO["bob"]) == pytest.approx(8 / 13)
    [kappa] = agreement.pairwise_kappas(votes_from(TWO), min_overlap=5)
    assert (kappa.labeler_1, kappa.labeler_2, kappa.items) == ("ann", "bob", 5)
    assert kappa.kappa == pytest.approx(8 / 13)


def test_it_reports_kappa_only_with_enough_overlap():
    assert agreement.pairwise_kappas(votes_from(TWO), min_overlap=6) == []
    # Both always chose "a": chance agreement is 1, kappa undefined rather than a division by zero.
    assert agreement.cohen_kappa(["a", "a"], ["a", "a"]) is None


def test_it_computes_krippendorffs_alpha_by_hand_for_two_labelers():
    # Coincidences: o_aa = 4, o_bb = 4, o_ab = o_ba = 1; n_a = n_b = 5, n = 10.
    # D_o = 2/10, D_e = (5*5 + 5*5) / (10*9) = 50/90, alpha = 1 - 0.2 / (5/9) = 0.64.
    result = agreement.agreement(votes_from(TWO))
    assert result.krippendorff_alpha == pytest.approx(0.64)
    assert result.percent == pytest.approx(0.8)
    assert result.items == 5


def test_it_computes_krippendorffs_alpha_by_hand_with_missing_judgments():
    # Pair 1 (a,a,a): o_aa += 6/2 = 3. Pair 2 (a,b): o_ab += 1, o_ba += 1. Pair 3 (b,b,a): o_bb += 1,
    # o_ab += 1, o_ba += 1. Pair 4 has one judgment: not pairable. So o_aa=3, o_bb=1, o_ab=o_ba=2;
    # n_a=5, n_b=3, n=8. D_o = 4/8, D_e = 2*5*3 / (8*7) = 30/56, alpha = 1 - 0.5 * 56/30 = 1/15.
    result = agreement.agreement(votes_from(THREE))
    assert result.krippendorff_alpha == pytest.approx(1 / 15)
    # Per pair, the share of agreeing labeler pairs: 3/3, 0/1, 1/3; their mean is 4/9.
    assert result.percent == pytest.approx(4 / 9)
    assert result.items == 3


def test_it_leaves_alpha_undefined_without_disagreement_or_overlap():
    assert agreement.agreement(votes_from({"ann": ["a", "b"]})) == agreement.Agreement(None, None, 0)
    assert agreement.krippendorff_alpha(votes_from({"ann": ["a", "a"], "bob": ["a", "a"]})) is None


def test_it_measures_agreement_with_the_majority_of_the_others():
    table = {"ann": ["a", "a", "b"], "bob": ["a", "b", "b"], "cy": ["a", "b", "a"], "dee": ["b", "b", None]}
    result = agreement.agreement_with_majority(votes_from(table))
    # ann: pair 1 others a,a,b -> a (agrees); pair 2 others b,b,b -> b (not); pair 3 others b,a -> none.
    assert result["ann"] == (0.5, 2)
    # dee: pair 1 others a,a,a -> a (not); pair 2 others a,b,b -> b (agrees).
    assert result["dee"] == (0.5, 2)
    # bob: pair 1 others a,a,b -> a (agrees), pair 2 others a,b,b -> b (agrees), pair 3 others b,a -> none.
    assert result["bob"] == (1.0, 2)
    # cy: pair 1 a (agrees), pair 2 others a,b,b -> b (agrees), pair 3 others b,b -> b (not).
    assert result["cy"] == (pytest.approx(2 / 3), 3)


def test_it_tests_position_bias_with_an_exact_binomial():
    # P(X <= 1) for n = 10, p = 1/2 is (1 + 10) / 1024; two-sided doubles it.
    assert agreement.binomial_p_value(9, 10) == pytest.approx(22 / 1024)
    assert agreement.binomial_p_value(1, 10) == pytest.approx(22 / 1024)
    assert agreement.binomial_p_value(5, 10) == 1.0
    assert agreement.binomial_p_value(0, 3) == pytest.approx(0.25)
    # Large n stays finite: 600 of 1000 is far beyond chance.
    assert 0 < agreement.binomial_p_value(600, 1000) < 1e-9
    # Left wins: "a" shown on the left, or "b" shown on the left (a_on_left False); ties do not count.
    votes = [Vote(1, "x", "a", a_on_left=True), Vote(2, "x", "b", a_on_left=False),
             Vote(3, "x", "b", a_on_left=True), Vote(4, "x", "tie", a_on_left=True), Vote(5, "x", "a")]
    bias = agreement.position_bias(votes)
    assert (bias.left_rate, bias.n) == (pytest.approx(2 / 3), 3)


def test_it_counts_judgments_faster_than_reading_both_responses():
    # 100 words at 10 words/s take 10 s to read.
    assert agreement.too_fast(Vote(1, "x", "a", milliseconds=5000, reading_seconds=10.0)) is True
    assert agreement.too_fast(Vote(1, "x", "a", milliseconds=12000, reading_seconds=10.0)) is False
    assert agreement.too_fast(Vote(1, "x", "a", reading_seconds=10.0)) is None


def test_it_reads_chinese_and_japanese_by_character_and_spaced_scripts_by_word():
    # 12 Han characters at 10 a second; the full-width comma and question mark are not read.
    assert agreement.reading_seconds("如何学习编程？给出具体建议") == pytest.approx(1.2)
    # Kana and kanji by character (11), the Latin word between them by word (1 at 10 a second).
    assert agreement.reading_seconds("プログラミングをPythonで学ぶ") == pytest.approx(1.1 + 0.1)
    # Korean writes spaces between words: three words.
    assert agreement.reading_seconds("프로그래밍을 어떻게 배우나요?") == pytest.approx(0.3)
    assert agreement.reading_seconds("Learn to program, step by step.") == pytest.approx(0.6)


def test_it_counts_judgments_per_hour_of_labeling_without_breaks():
    start = datetime(2026, 1, 1, 9)
    times = [start, start + timedelta(seconds=60), start + timedelta(seconds=120),
             start + timedelta(hours=2), start + timedelta(hours=2, seconds=60)]
    # Three working gaps of 60 s (the two-hour break is left out): 3 judgments in 180 s = 60 an hour.
    assert agreement.judgments_per_hour(times) == pytest.approx(60.0)
    assert agreement.judgments_per_hour([start]) is None


def test_it_flags_a_labeler_who_always_picks_the_left_side_and_not_a_careful_one():
    votes, skips = [], {"lefty": 3}
    for pair in range(1, 41):
        a_on_left = pair % 2 == 0
        truth = "a" if pair % 3 else "b"
        gold = truth if pair <= 12 else ""
        votes.append(Vote(pair, "lefty", "a" if a_on_left else "b", a_on_left=a_on_left, milliseconds=400,
                          reading_seconds=6.0, gold_choice=gold))
        for name in ("carol", "cora"):
            votes.append(Vote(pair, name, truth, a_on_left=a_on_left, milliseconds=15000, reading_seconds=6.0,
                              gold_choice=gold))
    stats = {s.username: s for s in agreement.labeler_stats(votes, skips)}
    lefty = stats["lefty"]
    assert lefty.left_rate == 1.0 and lefty.left_n == 40 and lefty.left_p_value < 1e-9
    assert lefty.skip_rate == pytest.approx(3 / 43)
    assert lefty.median_seconds == pytest.approx(0.4) and lefty.too_fast_rate == 1.0
    reasons = " | ".join(lefty.flags)
    assert "position bias: the left side won 100% of 40" in reasons
    assert "too fast" in reasons and "low agreement with the majority" in reasons
    assert stats["carol"].flags == [] and stats["cora"].flags == []
    assert stats["carol"].gold_accuracy == 1.0 and stats["carol"].gold_n == 12


@pytest.mark.parametrize("gold_n,right,flagged", [(10, 6, True), (12, 5, True), (10, 7, False), (9, 0, False)])
def test_it_flags_low_gold_accuracy_from_enough_gold_items(gold_n, right, flagged):
    """Under 70% right on gold items, once a labeler has judged at least MIN_FLAG_GOLD (10) of them."""
    votes = [Vote(pair, "gil", "a" if pair <= right else "b", gold_choice="a") for pair in range(1, gold_n + 1)]
    votes += [Vote(pair, "gil", "a") for pair in range(100, 105)]  # judgments off gold do not count
    (stats,) = agreement.labeler_stats(votes, {})
    assert (stats.gold_n, stats.gold_accuracy) == (gold_n, pytest.approx(right / gold_n))
    wanted = f"low gold accuracy: {right / gold_n:.0%} of {gold_n} gold items (under 70%)"
    assert (wanted in stats.flags) == flagged, stats.flags
