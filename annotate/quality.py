"""A campaign's quality report: agreement, position bias, labeler statistics and flags, from its judgments.

Reads the rows (one query for judgments, one for response lengths, one each for skips and exclusions)
and hands them to annotate/agreement.py. The statistics are cached; once FRESH_SECONDS old, a task on
the default queue recomputes them while the page goes on showing the cached ones, so the quality page
answers at once on a large campaign (only the very first view computes them inline). Exclusions are
read fresh on every request, so an admin's change shows at once. `manage.py quality_report` always
computes afresh.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict
from datetime import datetime

from celery import current_app
from django.core.cache import cache
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from annotate import agreement
from annotate.agreement import Vote
from annotate.models import AIVerdict, Assignment, Axis, Campaign, Exclusion, Judgment, Response, on_axis
from pairloop import redis_guard

log = logging.getLogger(__name__)

FRESH_SECONDS = 60
"""How old the quality page's statistics may grow before a refresh is queued (new judgments show within
this plus the refresh's own time)."""
KEEP_SECONDS = 7 * 24 * 3600
"""How long computed statistics stay in the cache to be shown while a refresh runs."""
REFRESH_LOCK_SECONDS = 600
"""One refresh per campaign at a time; a refresh that died is retried after this."""
CACHE_VERSION = 4


def campaign_votes(campaign: Campaign, axis: Axis | None = None
                   ) -> tuple[list[Vote], dict[int, int | None], dict[str, int]]:
    """(every labeler's judgment as a Vote, with its choice on `axis` (default: the first), each pair's round
    id, skips per labeler). Imported preferences have no labeler to compare and are left out."""
    reading = {pk: agreement.reading_seconds(text)
               for pk, text in Response.objects.filter(prompt__campaign=campaign).values_list("id", "text")
                                                                                  .iterator(chunk_size=5000)}
    axis = axis or campaign.first_axis()
    judgments = on_axis(Judgment.objects.filter(pair__campaign=campaign, labeler__isnull=False), axis)
    rows = (judgments
            .values_list("id", "pair_id", "labeler__username", "axis_choice", "a_on_left", "milliseconds",
                         "created_at", "pair__gold_choice" if axis.is_first() else "pair__gold_choices",
                         "pair__response_a_id", "pair__response_b_id", "pair__round_id")
            .order_by("id"))
    votes, round_of = [], {}
    for (pk, pair_id, username, choice, a_on_left, ms, created_at, gold, a_id, b_id,
         round_id) in rows.iterator(chunk_size=5000):
        votes.append(Vote(pair_id=pair_id, labeler=username, choice=choice, a_on_left=a_on_left,
                          milliseconds=ms, reading_seconds=reading.get(a_id, 0.0) + reading.get(b_id, 0.0),
                          gold_choice=gold if axis.is_first() else (gold or {}).get(axis.key, ""),
                          created_at=created_at, judgment_id=pk))
        round_of[pair_id] = round_id
    skips = dict(Assignment.objects.filter(pair__campaign=campaign, skipped=True)
                 .values_list("labeler__username").annotate(n=Count("id")))
    return votes, round_of, skips


def campaign_asks(campaign: Campaign, axis: Axis | None = None) -> tuple[list[agreement.Asked], set[str]]:
    """(every principle its AI labelers were asked on `axis` (default: the first, with any verdict naming no
    further axis), in both orders; their usernames)."""
    ai = set(campaign.ai_labelers.values_list("account__username", flat=True))
    axis = axis or campaign.first_axis()
    verdicts = AIVerdict.objects.filter(pair__campaign=campaign)
    if axis.is_first():
        verdicts = verdicts.exclude(axis__in=[further.key for further in campaign.axes()[1:]])
    else:
        verdicts = verdicts.filter(axis=axis.key)
    rows = (verdicts
            .values_list("pair_id", "labeler__account__username", "principle", "a_first", "choice_first", "outcome")
            .order_by("id"))
    asked = [agreement.Asked(pair_id, username, principle,
                             None if not choice else (choice == "a") == a_first, choice, outcome)
             for pair_id, username, principle, a_first, choice, outcome in rows.iterator(chunk_size=5000)]
    return asked, ai


def _statistics(campaign: Campaign) -> dict:
    """The part of the report computed from every judgment (cached on the page)."""
    votes, round_of, skips = campaign_votes(campaign)
    asked, ai = campaign_asks(campaign)
    by_round: dict[int, list[Vote]] = {}
    for vote in votes:
        round_id = round_of.get(vote.pair_id)
        if round_id is not None:
            by_round.setdefault(round_id, []).append(vote)
    numbers = dict(campaign.rounds.filter(pk__in=by_round).values_list("pk", "number"))
    bias = agreement.position_bias(votes)
    further = [_axis_statistics(campaign, axis, skips) for axis in campaign.axes()[1:]]
    return {
        "campaign": campaign.slug,
        "computed_at": timezone.now().isoformat(),
        "judgments": len(votes),
        "agreement": asdict(agreement.agreement(votes)),
        "kappas": [asdict(k) for k in agreement.pairwise_kappas(votes)],
        "rounds": [{"round": numbers.get(round_id), "agreement": asdict(agreement.agreement(round_votes))}
                   for round_id, round_votes in sorted(by_round.items(),
                                                       key=lambda item: numbers.get(item[0], 0))],
        "position_bias": asdict(bias),
        "labelers": [asdict(stats) for stats in agreement.labeler_stats(votes, skips)],
        "axis": campaign.axis_key,
        "further_axes": further,
        "ai_labelers": [asdict(figures) for figures in agreement.ai_figures(votes, asked, ai)],
        "thresholds": {
            "min_kappa_overlap": agreement.MIN_KAPPA_OVERLAP,
            "min_flag_judgments": agreement.MIN_FLAG_JUDGMENTS,
            "min_flag_gold": agreement.MIN_FLAG_GOLD,
            "position_bias_p": agreement.POSITION_BIAS_P,
            "position_bias_min_gap": agreement.POSITION_BIAS_MIN_GAP,
            "gold_accuracy_min": agreement.GOLD_ACCURACY_MIN,
            "majority_agreement_min": agreement.MAJORITY_AGREEMENT_MIN,
            "reading_words_per_second": agreement.READING_WORDS_PER_SECOND,
            "reading_cjk_characters_per_second": agreement.READING_CJK_CHARACTERS_PER_SECOND,
            "too_fast_rate_max": agreement.TOO_FAST_RATE_MAX,
        },
    }


def _axis_statistics(campaign: Campaign, axis: Axis, skips: dict[str, int]) -> dict:
    """Agreement, position bias, gold accuracy (on gold items given an answer on it) and the labelers' flags
    on one further axis (the report's top level holds the first axis's)."""
    votes, _, _ = campaign_votes(campaign, axis)
    labelers = agreement.labeler_stats(votes, skips)
    asked, ai = campaign_asks(campaign, axis)
    ai_counts = Counter(vote.labeler for vote in votes if vote.labeler in ai)
    return {
        "ai_labelers": [{**asdict(figures), "judgments": ai_counts[figures.username]}
                        for figures in agreement.ai_figures(votes, asked, ai)],
        "axis": axis.key,
        "question": axis.question,
        "judgments": len(votes),
        "agreement": asdict(agreement.agreement(votes)),
        "position_bias": asdict(agreement.position_bias(votes)),
        "flags": {stats.username: stats.flags for stats in labelers if stats.flags},
        "gold": {stats.username: {"accuracy": stats.gold_accuracy, "n": stats.gold_n}
                 for stats in labelers if stats.gold_n},
    }


def _age_seconds(statistics: dict) -> float:
    computed = datetime.fromisoformat(statistics["computed_at"])
    return (timezone.now() - computed).total_seconds()


def refresh(campaign: Campaign) -> dict:
    """Compute the statistics now and cache them (the refresh task and the first page view call this)."""
    statistics = _statistics(campaign)
    try:
        with redis_guard.guard("cache the quality report"):
            cache.set(_key(campaign), statistics, timeout=KEEP_SECONDS)
            cache.delete(_key(campaign) + "-refreshing")
    except redis_guard.RedisDown:
        pass
    return statistics


REFRESH_TASK = "annotate.refresh_quality_report"  # annotate/tasks.py, on the default queue


def send_refresh(campaign_id: int) -> None:
    """Ask a worker to refresh a campaign's cached statistics, by the task's name."""
    current_app.send_task(REFRESH_TASK, args=[campaign_id])


def _key(campaign: Campaign) -> str:
    # With its creation time: a campaign made later under a reused id (test databases) starts afresh.
    return f"quality-{campaign.pk}-{campaign.created_at.timestamp():.6f}-v{CACHE_VERSION}"


def _cached_statistics(campaign: Campaign) -> dict:
    """The cached statistics; older than FRESH_SECONDS, one refresh is queued and the page shows these
    meanwhile (stale while revalidating), so no page waits for a recount but the first one."""
    key = _key(campaign)
    try:
        with redis_guard.guard("quality report"):
            found = cache.get(key)
            stale = found is not None and _age_seconds(found) > FRESH_SECONDS
            queue = stale and cache.add(key + "-refreshing", 1, timeout=REFRESH_LOCK_SECONDS)
    except redis_guard.RedisDown:
        return _statistics(campaign)
    if found is None:
        return refresh(campaign)
    if queue:
        try:
            transaction.on_commit(lambda: send_refresh(campaign.pk))
        except Exception as exc:  # the broker is down: show what we have; the lock lapses, then retry
            log.warning("could not queue a quality report refresh for %s: %s", campaign.slug, exc)
    return found


def quality_report(campaign: Campaign, *, fresh: bool = False) -> dict:
    """The report as one JSON-ready dict; its statistics cached (see _cached_statistics) unless `fresh`."""
    report = dict(_statistics(campaign) if fresh else _cached_statistics(campaign))
    exclusions = list(Exclusion.objects.filter(campaign=campaign, lifted_at__isnull=True)
                      .select_related("labeler", "created_by", "judgment__labeler"))
    excluded = _excluded_per_labeler(campaign, exclusions)
    report["labelers"] = [{**row, "excluded": excluded.get(row["username"], 0)} for row in report["labelers"]]
    report["exclusions"] = [
        {"id": e.pk, "what": e.describe(), "labeler": e.labeler.get_username() if e.labeler_id else None,
         "since": e.since.isoformat() if e.since else None, "judgment": e.judgment_id, "reason": e.reason,
         "by": e.created_by.get_username() if e.created_by_id else None, "at": e.created_at.isoformat()}
        for e in exclusions
    ]
    return report


def _excluded_per_labeler(campaign: Campaign, exclusions: list[Exclusion]) -> dict[str, int]:
    """Each labeler's judgments that the active exclusions leave out, counted on the (labeler, created_at)
    index, so a campaign without exclusions costs no query."""
    earliest: dict[int, object] = {}  # labeler id -> the earliest excluded time, None for all
    for exclusion in exclusions:
        if exclusion.labeler_id is not None:
            known = earliest.get(exclusion.labeler_id, exclusion.since)
            earliest[exclusion.labeler_id] = (None if known is None or exclusion.since is None
                                              else min(known, exclusion.since))
    counts: dict[str, int] = {}
    names = {}
    for exclusion in exclusions:
        labeler = exclusion.labeler if exclusion.judgment_id is None else exclusion.judgment.labeler
        if labeler is not None:
            names[labeler.pk] = labeler.get_username()
    for labeler_id, since in earliest.items():
        judgments = Judgment.objects.filter(pair__campaign=campaign, labeler_id=labeler_id)
        if since is not None:
            judgments = judgments.filter(created_at__gte=since)
        counts[names[labeler_id]] = judgments.count()
    for exclusion in exclusions:
        one = exclusion.judgment
        if one is None or one.labeler_id is None:
            continue
        since = earliest.get(one.labeler_id, False)
        if since is None or (since is not False and one.created_at >= since):
            continue  # already counted with the labeler's
        counts[names[one.labeler_id]] = counts.get(names[one.labeler_id], 0) + 1
    return counts
