"""Bradley-Terry ratings with bootstrap intervals (training/ratings.py): the numbers a reviewer reads."""

from __future__ import annotations

import math
import random

import pytest

from training.ratings import ANCHOR_RATING, ELO_SCALE, bradley_terry


def matches(first, second, wins, losses, ties=0):
    return [(first, second, 1.0)] * wins + [(first, second, 0.0)] * losses + [(first, second, 0.5)] * ties


def by_player(ratings):
    return {r.player: r for r in ratings}


def test_the_ratings_recover_the_strengths_that_generated_the_judgments():
    true = {"sft": 0.0, "round 1": 120.0, "round 2": 250.0}
    rng = random.Random(7)
    outcomes = []
    names = list(true)
    for _ in range(6000):
        a, b = rng.sample(names, 2)
        p = 1 / (1 + 10 ** ((true[b] - true[a]) / ELO_SCALE))
        outcomes.append((a, b, 1.0 if rng.random() < p else 0.0))
    ratings = by_player(bradley_terry(outcomes, anchor="sft", bootstrap=100))
    assert ratings["sft"].rating == pytest.approx(ANCHOR_RATING)
    for name, gap in true.items():
        assert ratings[name].rating == pytest.approx(ANCHOR_RATING + gap, abs=30)
        assert ratings[name].low <= ratings[name].rating <= ratings[name].high
    assert [r.player for r in bradley_terry(outcomes, anchor="sft", bootstrap=0)] == ["round 2", "round 1", "sft"]
    assert ratings["round 2"].win_probability == pytest.approx(1 / (1 + 10 ** (-250 / ELO_SCALE)), abs=0.05)


def test_an_even_record_rates_equal_and_ties_count_half():
    ratings = by_player(bradley_terry(matches("new", "sft", 30, 30) + matches("other", "sft", 0, 0, ties=60),
                                      anchor="sft", bootstrap=50))
    assert ratings["new"].rating == pytest.approx(ANCHOR_RATING, abs=1e-6)
    assert ratings["other"].rating == pytest.approx(ANCHOR_RATING, abs=1e-6)
    assert ratings["new"].win_probability == pytest.approx(0.5)


def test_more_judgments_narrow_the_interval():
    few = by_player(bradley_terry(matches("new", "sft", 14, 6), anchor="sft", bootstrap=300))["new"]
    many = by_player(bradley_terry(matches("new", "sft", 700, 300), anchor="sft", bootstrap=300))["new"]
    assert few.rating > ANCHOR_RATING and many.rating > ANCHOR_RATING
    assert (many.high - many.low) < (few.high - few.low) / 3
    # 70% wins over 1,000 games: about 147 Elo points, and the interval excludes the anchor.
    assert many.rating == pytest.approx(ANCHOR_RATING + ELO_SCALE * math.log10(0.7 / 0.3), abs=5)
    assert many.low > ANCHOR_RATING


def test_a_player_who_never_lost_keeps_a_finite_rating():
    ratings = by_player(bradley_terry(matches("new", "sft", 25, 0), anchor="sft", bootstrap=50))
    assert math.isfinite(ratings["new"].rating) and ratings["new"].rating > ANCHOR_RATING + 300
    assert ratings["new"].games == 25 and ratings["sft"].games == 25


def test_players_never_compared_with_the_anchor_group_are_left_out():
    outcomes = matches("round 1", "sft", 5, 5) + matches("imported a", "imported b", 3, 1)
    ratings = by_player(bradley_terry(outcomes, anchor="sft", bootstrap=10))
    assert set(ratings) == {"round 1", "sft"}


def test_the_same_judgments_and_seed_give_the_same_intervals():
    outcomes = matches("new", "sft", 40, 25, ties=10)
    assert bradley_terry(outcomes, anchor="sft", seed=3) == bradley_terry(outcomes, anchor="sft", seed=3)


def test_no_judgments_no_ratings_and_a_bad_outcome_is_refused():
    assert bradley_terry([], anchor="sft") == []
    with pytest.raises(ValueError, match="outcome must be 0, 0.5 or 1"):
        bradley_terry([("a", "b", 2)])
