"""The evaluation's statistics: win rate, its bootstrap interval, the length-controlled win rate."""

from __future__ import annotations

import numpy as np

from training import winrates


def test_it_counts_wins_ties_and_losses_and_their_rate():
    found = winrates.record([1, 1, 1, 0.5, 0], [10, 12, 9, 10, 30], [5, 5, 5, 10, 10])
    assert (found.wins, found.ties, found.losses, found.prompts) == (3, 1, 1, 5)
    assert found.win_rate == 0.7
    assert (found.mean_length_a, found.mean_length_b) == (14.2, 7.0)


def test_its_interval_holds_the_rate_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    few, many = rng.random(40) < 0.7, rng.random(2000) < 0.7
    low, high = winrates.win_rate_interval(few)
    assert low < few.mean() < high
    wide = high - low
    low, high = winrates.win_rate_interval(many)
    assert low < 0.7 < high and high - low < wide / 4


def test_a_judge_asked_in_both_orders_that_always_picks_the_first_shown_gives_a_tie():
    assert winrates.both_orders(shown_first=1.0, shown_second=1.0) == 0.5
    assert winrates.both_orders(shown_first=1.0, shown_second=0.0) == 1.0


def test_the_length_controlled_rate_removes_a_win_rate_that_comes_from_length_alone():
    """A judge that prefers longer answers, and a policy that writes longer ones: a large raw win rate, a
    near-even length-controlled one."""
    rng = np.random.default_rng(0)
    lengths_b = rng.integers(40, 120, 400)
    lengths_a = lengths_b + rng.normal(60, 40, 400).astype(int)
    diff = lengths_a - lengths_b
    outcomes = (rng.random(400) < 1 / (1 + np.exp(-diff / 20))).astype(float)
    found = winrates.record(outcomes, lengths_a, lengths_b)
    assert found.win_rate > 0.8
    assert abs(found.lc_win_rate - 0.5) < 0.1, found


def test_the_length_controlled_rate_keeps_a_win_that_does_not_come_from_length():
    rng = np.random.default_rng(0)
    lengths_a = rng.integers(40, 120, 400)
    lengths_b = rng.integers(40, 120, 400)
    outcomes = (rng.random(400) < 0.8).astype(float)
    found = winrates.record(outcomes, lengths_a, lengths_b)
    assert abs(found.lc_win_rate - found.win_rate) < 0.05, found
