"""Win rates of one policy against another from per-prompt judge outcomes: plain numbers in, numbers out.

An outcome is the first policy's share of one prompt: 1 a win, 0 a loss, 0.5 a tie (a judge asked in both
orders that changed its mind counts as a tie). The win rate is their mean, with a 95% percentile bootstrap
interval over prompts. The length-controlled win rate is AlpacaEval 2's idea (Dubois et al. 2024): a logistic
regression of the outcome on the two answers' length difference, read off at a difference of zero, so a judge
that prefers longer answers no longer rewards a policy for writing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 1000  # resamples of the win rate's interval (Efron and Tibshirani 1993 suggest >= 1000)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Record:
    """One policy against another over the same prompts, as the evaluation table shows it."""

    prompts: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    lc_win_rate: float | None
    mean_length_a: float | None
    mean_length_b: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def outcome(first: float, second: float) -> float:
    """The first answer's share when a judge scores both: 1 above, 0 below, 0.5 equal."""
    return 1.0 if first > second else 0.0 if first < second else 0.5


def both_orders(shown_first: float, shown_second: float) -> float:
    """The first policy's share over two asks of a judge, once shown first and once second (the second ask's
    outcome is for the other policy), so a judge that favours a position cancels out."""
    return (shown_first + (1.0 - shown_second)) / 2


def win_rate_interval(outcomes: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> tuple[float, float] | None:
    """The 95% percentile bootstrap interval of the mean outcome, prompts resampled; None under two prompts."""
    # scipy and scikit-learn load pyarrow: imported here, kept out of the web process's imports.
    from scipy.stats import bootstrap

    values = np.asarray(outcomes, dtype=float)
    if len(values) < 2:
        return None
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    found = bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                      method="percentile", rng=np.random.default_rng(seed))
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def length_controlled_win_rate(outcomes: Sequence[float], length_differences: Sequence[float]) -> float | None:
    """The win rate a logistic regression of outcome on length difference (first minus second) predicts at a
    difference of zero: sigmoid of its intercept. The difference is divided by its standard deviation (which
    leaves zero where it is), and the slope has scikit-learn's default L2 penalty, so a judge that always picks
    the longer answer gives a finite fit. A tie is half a win and half a loss (two rows weighted 0.5)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(outcomes, dtype=float)
    diff = np.asarray(length_differences, dtype=float)
    if not len(y):
        return None
    if np.all(y == y[0]):
        return float(y[0])
    scale = diff.std() or 1.0
    x = np.concatenate([diff, diff])[:, None] / scale
    labels = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    weights = np.concatenate([y, 1.0 - y])
    keep = weights > 0
    fit = LogisticRegression().fit(x[keep], labels[keep], sample_weight=weights[keep])
    return float(1.0 / (1.0 + np.exp(-fit.intercept_[0])))


def record(outcomes: Sequence[float], lengths_a: Sequence[int], lengths_b: Sequence[int], seed: int = 0) -> Record:
    """Win/tie/loss, win rate with its interval, length-controlled win rate and mean lengths of the first
    policy against the second, from one outcome and the two answers' lengths per prompt."""
    values = np.asarray(outcomes, dtype=float)
    a, b = np.asarray(lengths_a, dtype=float), np.asarray(lengths_b, dtype=float)
    if not (len(values) == len(a) == len(b)):
        raise ValueError(f"{len(values)} outcomes for {len(a)} and {len(b)} answer lengths")
    interval = win_rate_interval(values, seed=seed)
    return Record(
        prompts=len(values), wins=int((values > 0.5).sum()), ties=int((values == 0.5).sum()),
        losses=int((values < 0.5).sum()), win_rate=float(values.mean()) if len(values) else None,
        ci_low=interval[0] if interval else None, ci_high=interval[1] if interval else None,
        lc_win_rate=length_controlled_win_rate(values, a - b),
        mean_length_a=float(a.mean()) if len(a) else None, mean_length_b=float(b.mean()) if len(b) else None,
    )
