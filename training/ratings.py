"""Bradley-Terry ratings of policy checkpoints from pairwise judgments, with bootstrap intervals.

Plain Python and numpy, no Django. A judgment between the responses of two players (policy
checkpoints) is an outcome for the first: 1 (it won), 0 (it lost) or 0.5 (tie, or both bad:
neither was preferred). The Bradley-Terry model says P(i beats j) = p_i / (p_i + p_j) (Bradley and
Terry 1952); a tie counts as half a win to each side, as LMSYS's Chatbot Arena counts them (Chiang et
al. 2024). The strengths are fitted by Hunter's MM algorithm (Hunter 2004, "MM algorithms for
generalized Bradley-Terry models"), with a weak prior of one virtual tie between every two players
that met, so that a player who never lost keeps a finite rating. Ratings are shown on the Elo scale
(400 log10 p), the anchor player at 1000, the convention the Arena uses.

Confidence intervals: the judgments are resampled with replacement (a multinomial draw over the
distinct (player, player, outcome) cells, which is the same thing and fast) and refitted; the 2.5th
and 97.5th percentiles of each player's ratings form its 95% interval (Efron's percentile bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np

ELO_SCALE = 400.0
ANCHOR_RATING = 1000.0
PRIOR_TIES = 1.0  # virtual ties between every two players that met (each side gets half a win of it)


@dataclass(frozen=True)
class Rating:
    player: Hashable
    rating: float
    """Elo-scale rating, the anchor at 1000: a 100-point gap means the higher one wins 64% of the time."""
    low: float
    """Lower end of the 95% bootstrap interval."""
    high: float
    """Upper end of the 95% bootstrap interval."""
    games: int
    """Judgments this player took part in."""
    win_probability: float | None
    """Fitted probability of beating the anchor (None for the anchor itself)."""


def _fit(players: int, wins: np.ndarray, games: np.ndarray, iterations: int = 500, tol: float = 1e-9) -> np.ndarray:
    """MM fit of log-strengths. wins[i, j]: (half-)wins of i over j; games[i, j] = games[j, i]: meetings."""
    strength = np.ones(players)
    total_wins = wins.sum(axis=1)
    for _ in range(iterations):
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = np.where(denominator > 0, total_wins / np.maximum(denominator, 1e-300), strength)
        updated = np.maximum(updated, 1e-12)
        updated /= math.exp(np.log(updated).mean())
        if np.max(np.abs(np.log(updated) - np.log(strength))) < tol:
            strength = updated
            break
        strength = updated
    return np.log(strength)


def _tables(players: int, cells: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Win and game matrices from outcome cells (i, j, outcome of i) and their counts, plus the prior."""
    wins = np.zeros((players, players))
    games = np.zeros((players, players))
    i, j, outcome = cells[:, 0].astype(int), cells[:, 1].astype(int), cells[:, 2]
    np.add.at(wins, (i, j), counts * outcome)
    np.add.at(wins, (j, i), counts * (1.0 - outcome))
    np.add.at(games, (i, j), counts)
    np.add.at(games, (j, i), counts)
    met = games > 0
    wins = wins + met * (PRIOR_TIES / 2)
    games = games + met * PRIOR_TIES
    return wins, games


def bradley_terry(outcomes: Iterable[tuple[Hashable, Hashable, float]], anchor: Hashable | None = None, *,
                  bootstrap: int = 200, seed: int = 0) -> list[Rating]:
    """Ratings of every player in `outcomes` ((first, second, outcome of first) triples), best first.

    `anchor` is pinned at 1000 (default: the first player seen). Players that never met the anchor's
    connected group cannot be placed on its scale: they are left out."""
    index: dict[Hashable, int] = {}
    keyed: dict[tuple[int, int, float], int] = {}
    for first, second, outcome in outcomes:
        if first == second:
            continue
        if outcome not in (0, 0.5, 1):
            raise ValueError(f"outcome must be 0, 0.5 or 1, got {outcome!r}")
        a, b = index.setdefault(first, len(index)), index.setdefault(second, len(index))
        key = (a, b, float(outcome))
        keyed[key] = keyed.get(key, 0) + 1
    if not keyed:
        return []
    players = list(index)
    anchor = players[0] if anchor is None or anchor not in index else anchor
    cells = np.array(list(keyed), dtype=float)
    counts = np.array(list(keyed.values()), dtype=float)
    n = len(players)
    wins, games = _tables(n, cells, counts)
    reachable = _component(games > 0, index[anchor])

    def elo(log_strength: np.ndarray) -> np.ndarray:
        return ANCHOR_RATING + ELO_SCALE / math.log(10) * (log_strength - log_strength[index[anchor]])

    point = elo(_fit(n, wins, games))
    draws = np.empty((bootstrap, n))
    rng = np.random.default_rng(seed)
    total = int(counts.sum())
    for b in range(bootstrap):
        resampled = rng.multinomial(total, counts / total).astype(float)
        draws[b] = elo(_fit(n, *_tables(n, cells, resampled)))
    low, high = (np.percentile(draws, [2.5, 97.5], axis=0) if bootstrap else (point, point))
    played = np.zeros(n)
    np.add.at(played, cells[:, 0].astype(int), counts)
    np.add.at(played, cells[:, 1].astype(int), counts)
    ratings = []
    for player, k in index.items():
        if not reachable[k]:
            continue
        gap = (point[k] - point[index[anchor]]) / ELO_SCALE
        ratings.append(Rating(player=player, rating=float(point[k]), low=float(low[k]), high=float(high[k]),
                              games=int(played[k]),
                              win_probability=None if player == anchor else float(1 / (1 + 10 ** -gap))))
    return sorted(ratings, key=lambda r: -r.rating)


def _component(adjacent: np.ndarray, start: int) -> np.ndarray:
    seen = np.zeros(len(adjacent), dtype=bool)
    stack = [start]
    while stack:
        k = stack.pop()
        if seen[k]:
            continue
        seen[k] = True
        stack.extend(int(j) for j in np.flatnonzero(adjacent[k]) if not seen[j])
    return seen
