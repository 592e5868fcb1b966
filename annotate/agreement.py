"""Label quality statistics over plain rows: agreement, position bias, labeler statistics and flags.

Pure Python (plus numpy and the `krippendorff` package): no Django, no torch. annotate/quality.py reads
the rows from the database and calls these; tests call them on small fixed examples worked by hand.

A `Vote` is one judgment. Choices are nominal ("a", "b", "tie", "both_bad", in response_a / response_b
terms), so agreement compares them as categories: kappa and alpha treat "a" against "tie" as a
disagreement exactly as "a" against "b".
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations

import krippendorff
import numpy as np

CHOICES = ("a", "b", "tie", "both_bad")

# Thresholds: each flag names the threshold it passed. A flag is advice; nothing changes by itself.
MIN_KAPPA_OVERLAP = 10
"""Pairs two labelers must both have judged before their Cohen's kappa is reported."""
MIN_FLAG_JUDGMENTS = 20
"""Judgments a labeler needs before the position-bias, agreement and too-fast flags can be raised."""
MIN_FLAG_GOLD = 10
"""Gold items a labeler needs before the gold-accuracy flag can be raised."""
POSITION_BIAS_P = 0.01
"""Binomial-test p-value under which a left rate counts as biased..."""
POSITION_BIAS_MIN_GAP = 0.10
"""...when it is also at least this far from 50% (so a huge sample's tiny lean is not flagged)."""
GOLD_ACCURACY_MIN = 0.70
"""Gold accuracy under which a labeler is flagged (chance is 50% on A/B gold items)."""
MAJORITY_AGREEMENT_MIN = 0.60
"""Agreement with the majority of the other labelers under which a labeler is flagged (chance: ~50%)."""
READING_WORDS_PER_SECOND = 10.0
"""The reading-speed bound: 600 words a minute, over twice the 238 a minute adults read non-fiction
silently (Brysbaert 2019, "How many words do we read per minute?"). A judgment taken in less time than
reading both responses at this speed is too fast to have read them. Korean counts here, by its words:
Hangul puts spaces between words (eojeol), each a little longer than an English word, so the bound
stays as lenient for it as for English."""
READING_CJK_CHARACTERS_PER_SECOND = 10.0
"""The same bound for scripts written without spaces (Chinese characters, Japanese kana), counted by
character: about twice the 4 to 6 a second adults read Chinese and Japanese aloud (Trauzettel-Klosinski &
Dietz 2012, "Standardized assessment of reading performance: the new International Reading Speed Texts")."""
TOO_FAST_RATE_MAX = 0.20
"""Share of too-fast judgments over which a labeler is flagged."""
IDLE_GAP_SECONDS = 600
"""A gap between two judgments longer than this is a break: it does not count as labeling time."""


@dataclass(frozen=True)
class Vote:
    """One judgment, as the statistics need it."""

    pair_id: int
    labeler: str
    choice: str
    """a, b, tie or both_bad, in response_a / response_b terms."""
    a_on_left: bool | None = None
    """Whether response A was shown on the left; None for imported judgments (no shown order)."""
    milliseconds: int | None = None
    """Time from showing the pair to submitting, as the page measured it."""
    reading_seconds: float = 0.0
    """Seconds to read the two responses together at the bound (reading_seconds() of each)."""
    gold_choice: str = ""
    """The known answer when the pair is a gold item, else ""."""
    created_at: datetime | None = None
    judgment_id: int = 0


@dataclass(frozen=True)
class Agreement:
    percent: float | None
    """Mean over items of the share of labeler pairs on the item that chose the same; None without items."""
    krippendorff_alpha: float | None
    """Nominal Krippendorff's alpha; None when undefined (no item with two judgments, or one value only)."""
    items: int
    """Pairs with two or more judgments (the only ones agreement can rest on)."""


@dataclass(frozen=True)
class Kappa:
    labeler_1: str
    labeler_2: str
    kappa: float | None
    """Cohen's kappa; None when chance agreement is 1 (both always chose the same one value)."""
    items: int


@dataclass(frozen=True)
class PositionBias:
    left_rate: float | None
    """Share of A/B judgments in which the response shown on the left won."""
    p_value: float | None
    """Exact two-sided binomial test against 50%."""
    n: int
    """A/B judgments with a known shown order."""


@dataclass
class LabelerStats:
    username: str
    judgments: int = 0
    skips: int = 0
    skip_rate: float | None = None
    tie_rate: float | None = None
    both_bad_rate: float | None = None
    gold_accuracy: float | None = None
    gold_n: int = 0
    left_rate: float | None = None
    left_p_value: float | None = None
    left_n: int = 0
    agreement_with_majority: float | None = None
    majority_n: int = 0
    median_seconds: float | None = None
    judgments_per_hour: float | None = None
    too_fast_rate: float | None = None
    timed_n: int = 0
    flags: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------

def by_pair(votes: Iterable[Vote]) -> dict[int, list[Vote]]:
    grouped: dict[int, list[Vote]] = defaultdict(list)
    for vote in votes:
        grouped[vote.pair_id].append(vote)
    return grouped


def percent_agreement(votes: Iterable[Vote]) -> tuple[float | None, int]:
    """(mean over pairs with two or more judgments of the share of agreeing labeler pairs, such pairs)."""
    shares = []
    for pair_votes in by_pair(votes).values():
        m = len(pair_votes)
        if m < 2:
            continue
        counts = Counter(v.choice for v in pair_votes)
        agreeing = sum(c * (c - 1) for c in counts.values())  # ordered pairs of labelers that agree
        shares.append(agreeing / (m * (m - 1)))
    return (sum(shares) / len(shares) if shares else None), len(shares)


def krippendorff_alpha(votes: Iterable[Vote]) -> float | None:
    """Nominal Krippendorff's alpha by the `krippendorff` package, from each pair's count of each choice."""
    counts = [Counter(v.choice for v in pair_votes) for pair_votes in by_pair(votes).values()]
    counts = [c for c in counts if sum(c.values()) >= 2]
    if not counts:
        return None
    value_counts = np.array([[c.get(choice, 0) for choice in CHOICES] for c in counts], dtype=float)
    if np.count_nonzero(value_counts.sum(axis=0)) < 2:
        return None  # one value only: expected disagreement is 0, alpha undefined
    return float(krippendorff.alpha(value_counts=value_counts, level_of_measurement="nominal"))


def agreement(votes: Sequence[Vote]) -> Agreement:
    percent, items = percent_agreement(votes)
    return Agreement(percent=percent, krippendorff_alpha=krippendorff_alpha(votes), items=items)


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa of two labelers' choices on the same items, in the same order."""
    n = len(first)
    if n == 0 or n != len(second):
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    counts_1, counts_2 = Counter(first), Counter(second)
    expected = sum(counts_1[c] * counts_2[c] for c in counts_1) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def pairwise_kappas(votes: Iterable[Vote], min_overlap: int = MIN_KAPPA_OVERLAP) -> list[Kappa]:
    """Cohen's kappa for each two labelers who judged at least `min_overlap` of the same pairs."""
    choice_of: dict[str, dict[int, str]] = defaultdict(dict)
    for vote in votes:
        choice_of[vote.labeler][vote.pair_id] = vote.choice
    kappas = []
    for one, two in combinations(sorted(choice_of), 2):
        shared = sorted(choice_of[one].keys() & choice_of[two].keys())
        if len(shared) < min_overlap:
            continue
        kappa = cohen_kappa([choice_of[one][p] for p in shared], [choice_of[two][p] for p in shared])
        kappas.append(Kappa(one, two, kappa, len(shared)))
    return kappas


def agreement_with_majority(votes: Iterable[Vote]) -> dict[str, tuple[float | None, int]]:
    """Per labeler: (share of pairs where they chose what most of the others chose, such pairs).

    A pair counts for a labeler when at least two others judged it and the others' most common
    choice is unique (a tie among the others gives no majority to agree with)."""
    agreed: Counter = Counter()
    counted: Counter = Counter()
    labelers = set()
    for pair_votes in by_pair(votes).values():
        for vote in pair_votes:
            labelers.add(vote.labeler)
            others = Counter(o.choice for o in pair_votes if o.labeler != vote.labeler)
            if sum(others.values()) < 2:
                continue
            ranked = others.most_common(2)
            if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
                continue
            top = ranked[0][0]
            counted[vote.labeler] += 1
            agreed[vote.labeler] += vote.choice == top
    return {name: ((agreed[name] / counted[name]) if counted[name] else None, counted[name])
            for name in labelers}


# ---------------------------------------------------------------------------------------------
# Position bias
# ---------------------------------------------------------------------------------------------

def binomial_p_value(k: int, n: int) -> float:
    """Exact two-sided binomial test of k successes in n trials against p = 1/2.

    The distribution is symmetric, so the two-sided p-value is twice the smaller tail, capped at 1
    (what scipy.stats.binomtest gives for p = 0.5). Terms are summed in log space so n may be large.
    """
    if n == 0:
        return 1.0
    low = min(k, n - k)
    log_half_n = n * math.log(0.5)
    log_n_fact = math.lgamma(n + 1)
    tail = sum(math.exp(log_n_fact - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
               for i in range(low + 1))
    return min(1.0, 2.0 * tail)


def left_won(vote: Vote) -> bool | None:
    """Whether the response shown on the left won; None for ties, both-bad and unknown shown order."""
    if vote.a_on_left is None or vote.choice not in ("a", "b"):
        return None
    return (vote.choice == "a") == vote.a_on_left


def position_bias(votes: Iterable[Vote]) -> PositionBias:
    outcomes = [won for won in map(left_won, votes) if won is not None]
    n = len(outcomes)
    if n == 0:
        return PositionBias(None, None, 0)
    k = sum(outcomes)
    return PositionBias(k / n, binomial_p_value(k, n), n)


# ---------------------------------------------------------------------------------------------
# AI labelers against people
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Asked:
    """One principle asked of an AI labeler about a pair in both orders (an AIVerdict, as the figures need it)."""

    pair_id: int
    labeler: str
    principle: str
    first_won: bool | None
    """Whether the first ask named the response it showed first, (A); None when it named neither."""
    choice: str
    """The first ask's choice in response_a / response_b terms ("" when it named neither)."""
    outcome: str
    """agreed, disagreed or malformed (AIVerdict.OUTCOMES)."""


@dataclass(frozen=True)
class WithPeople:
    percent: float | None
    """Share of pairs both judged on which the AI chose what most people chose."""
    kappa: float | None
    """Cohen's kappa of the AI's choices against the people's majority on those pairs."""
    n: int


@dataclass
class AIFigures:
    username: str
    with_people: WithPeople
    """Its judgments against the human majority."""
    by_principle: dict[str, WithPeople]
    """Each principle's agreed verdicts against the human majority."""
    first_rate_before_swap: float | None
    """Share of first asks that named the response shown first: the position bias the swap removes."""
    asked_n: int
    left_rate_after_swap: float | None
    """Share of its kept A/B judgments whose left (first shown) response won."""
    kept_n: int
    swap_disagreement_rate: float | None
    """Share of verdicts whose two orders named different responses."""
    gold_accuracy: float | None
    gold_n: int


def human_majority(votes: Iterable[Vote], ai: set[str]) -> dict[int, str]:
    """Per pair that people judged: their most common choice, where one choice is most common."""
    majority = {}
    for pair_id, pair_votes in by_pair(v for v in votes if v.labeler not in ai).items():
        ranked = Counter(v.choice for v in pair_votes).most_common(2)
        if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
            majority[pair_id] = ranked[0][0]
    return majority


def with_people(choices: dict[int, str], majority: dict[int, str]) -> WithPeople:
    shared = sorted(choices.keys() & majority.keys())
    if not shared:
        return WithPeople(None, None, 0)
    mine, theirs = [choices[p] for p in shared], [majority[p] for p in shared]
    percent = sum(x == y for x, y in zip(mine, theirs)) / len(shared)
    return WithPeople(percent, cohen_kappa(mine, theirs), len(shared))


def ai_figures(votes: Sequence[Vote], asked: Sequence[Asked], ai: set[str]) -> list[AIFigures]:
    """Each AI labeler (usernames `ai`) beside the people: agreement with their majority (overall and per
    principle), position bias before and after the swap, the share of swapped disagreements, gold accuracy."""
    majority = human_majority(votes, ai)
    figures = []
    for name in sorted(ai):
        mine = [v for v in votes if v.labeler == name]
        asks = [a for a in asked if a.labeler == name]
        principles: dict[str, dict[int, str]] = defaultdict(dict)
        for a in asks:
            if a.outcome == "agreed":
                principles[a.principle][a.pair_id] = a.choice
        firsts = [a.first_won for a in asks if a.first_won is not None]
        answered = [a for a in asks if a.outcome != "malformed"]
        kept = position_bias(mine)
        gold = [v for v in mine if v.gold_choice]
        figures.append(AIFigures(
            username=name,
            with_people=with_people({v.pair_id: v.choice for v in mine}, majority),
            by_principle={text: with_people(choices, majority) for text, choices in sorted(principles.items())},
            first_rate_before_swap=sum(firsts) / len(firsts) if firsts else None,
            asked_n=len(firsts),
            left_rate_after_swap=kept.left_rate,
            kept_n=kept.n,
            swap_disagreement_rate=(sum(a.outcome == "disagreed" for a in answered) / len(answered)
                                    if answered else None),
            gold_accuracy=sum(v.choice == v.gold_choice for v in gold) / len(gold) if gold else None,
            gold_n=len(gold),
        ))
    return figures


# ---------------------------------------------------------------------------------------------
# Labelers
# ---------------------------------------------------------------------------------------------

# Han ideographs (with extensions and compatibility forms), hiragana and katakana: read character by
# character. CJK punctuation and full-width forms separate words but are not read as characters.
UNSPACED_CHARACTER = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                                "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff]")
CJK_SEPARATOR = re.compile("[\u3000-\u303f\uff01-\uff65]")


def reading_seconds(text: str) -> float:
    """Seconds to read `text` at the bound: its unspaced-script characters at READING_CJK_CHARACTERS_PER_SECOND,
    its space-separated words (Latin, Cyrillic, Hangul...) at READING_WORDS_PER_SECOND."""
    if text.isascii():  # no CJK to look for: words only, five times faster on the quality page's recount
        return len(text.split()) / READING_WORDS_PER_SECOND
    characters = len(UNSPACED_CHARACTER.findall(text))
    words = len(CJK_SEPARATOR.sub(" ", UNSPACED_CHARACTER.sub(" ", text)).split())
    return characters / READING_CJK_CHARACTERS_PER_SECOND + words / READING_WORDS_PER_SECOND


def too_fast(vote: Vote) -> bool | None:
    """Whether the judgment took less time than reading both responses at the bound; None if untimed."""
    if vote.milliseconds is None:
        return None
    return vote.milliseconds / 1000.0 < vote.reading_seconds


def judgments_per_hour(times: Sequence[datetime]) -> float | None:
    """Judgments per hour of labeling time: gaps between judgments, breaks over IDLE_GAP_SECONDS left out."""
    ordered = sorted(times)
    gaps = [(later - earlier).total_seconds() for earlier, later in zip(ordered, ordered[1:])]
    working = [gap for gap in gaps if gap <= IDLE_GAP_SECONDS]
    seconds = sum(working)
    if not working or seconds <= 0:
        return None
    return len(working) / seconds * 3600.0


def labeler_stats(votes: Sequence[Vote], skips: dict[str, int] | None = None) -> list[LabelerStats]:
    """Statistics and flags for every labeler with a vote or a skip, most judgments first."""
    skips = skips or {}
    mine: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        mine[vote.labeler].append(vote)
    majority = agreement_with_majority(votes)
    result = []
    for name in set(mine) | set(skips):
        own = mine.get(name, [])
        n = len(own)
        stats = LabelerStats(username=name, judgments=n, skips=skips.get(name, 0))
        if n + stats.skips:
            stats.skip_rate = stats.skips / (n + stats.skips)
        if n:
            choices = Counter(v.choice for v in own)
            stats.tie_rate = choices["tie"] / n
            stats.both_bad_rate = choices["both_bad"] / n
        gold = [v for v in own if v.gold_choice]
        stats.gold_n = len(gold)
        if gold:
            stats.gold_accuracy = sum(v.choice == v.gold_choice for v in gold) / len(gold)
        bias = position_bias(own)
        stats.left_rate, stats.left_p_value, stats.left_n = bias.left_rate, bias.p_value, bias.n
        stats.agreement_with_majority, stats.majority_n = majority.get(name, (None, 0))
        timed = [v for v in own if v.milliseconds is not None]
        stats.timed_n = len(timed)
        if timed:
            stats.median_seconds = statistics.median(v.milliseconds for v in timed) / 1000.0
            stats.too_fast_rate = sum(bool(too_fast(v)) for v in timed) / len(timed)
        stats.judgments_per_hour = judgments_per_hour([v.created_at for v in own if v.created_at is not None])
        stats.flags = flags(stats)
        result.append(stats)
    result.sort(key=lambda s: (-s.judgments, s.username))
    return result


def flags(stats: LabelerStats) -> list[str]:
    """Reasons to look at a labeler, each naming its number and the threshold it passed."""
    found = []
    if (stats.left_n >= MIN_FLAG_JUDGMENTS and stats.left_p_value is not None
            and stats.left_p_value < POSITION_BIAS_P and abs(stats.left_rate - 0.5) >= POSITION_BIAS_MIN_GAP):
        found.append(f"position bias: the left side won {stats.left_rate:.0%} of {stats.left_n} "
                     f"(binomial p = {stats.left_p_value:.2g} < {POSITION_BIAS_P}, "
                     f"at least {POSITION_BIAS_MIN_GAP:.0%} from 50%)")
    if stats.gold_n >= MIN_FLAG_GOLD and stats.gold_accuracy < GOLD_ACCURACY_MIN:
        found.append(f"low gold accuracy: {stats.gold_accuracy:.0%} of {stats.gold_n} gold items "
                     f"(under {GOLD_ACCURACY_MIN:.0%})")
    if stats.majority_n >= MIN_FLAG_JUDGMENTS and stats.agreement_with_majority < MAJORITY_AGREEMENT_MIN:
        found.append(f"low agreement with the majority: {stats.agreement_with_majority:.0%} of "
                     f"{stats.majority_n} pairs (under {MAJORITY_AGREEMENT_MIN:.0%})")
    if stats.timed_n >= MIN_FLAG_JUDGMENTS and stats.too_fast_rate > TOO_FAST_RATE_MAX:
        found.append(f"too fast: {stats.too_fast_rate:.0%} of {stats.timed_n} judgments took less than "
                     f"reading both responses at {READING_WORDS_PER_SECOND:g} words/s "
                     f"or {READING_CJK_CHARACTERS_PER_SECOND:g} CJK characters/s "
                     f"(over {TOO_FAST_RATE_MAX:.0%})")
    return found
