"""A campaign's quality report: agreement, position bias, labeler statistics and flags, from its judgments.

Reads the rows (one query for judgments, one for response lengths, one each for skips and exclusions)
and hands them to annotate/agreement.py. The statistics are cached for FRESH_SECONDS, so the quality page
answers at once on a large campaign; exclusions are read fresh on every request, so an admin's change
shows at once. `manage.py quality_report` always computes afresh.
"""

from __future__ import annotations

from dataclasses import asdict

from django.core.cache import cache
from django.db.models import Count
from django.utils import timezone

from annotate import agreement
from annotate.agreement import Vote
from annotate.models import Assignment, Campaign, Exclusion, Judgment, Response
from pairloop import redis_guard

FRESH_SECONDS = 60
"""How old the cached statistics on the quality page may be (new judgments show within this)."""
CACHE_VERSION = 1


def campaign_votes(campaign: Campaign) -> tuple[list[Vote], dict[int, int | None], dict[str, int]]:
    """(every labeler's judgment as a Vote, each pair's round id, skips per labeler). Imported preferences
    have no labeler to compare and are left out."""
    words = {pk: len(text.split())
             for pk, text in Response.objects.filter(prompt__campaign=campaign).values_list("id", "text")
                                                                                .iterator(chunk_size=5000)}
    rows = (Judgment.objects.filter(pair__campaign=campaign, labeler__isnull=False)
            .values_list("id", "pair_id", "labeler__username", "choice", "a_on_left", "milliseconds",
                         "created_at", "pair__gold_choice", "pair__response_a_id", "pair__response_b_id",
                         "pair__round_id")
            .order_by("id"))
    votes, round_of = [], {}
    for (pk, pair_id, username, choice, a_on_left, ms, created_at, gold, a_id, b_id,
         round_id) in rows.iterator(chunk_size=5000):
        votes.append(Vote(pair_id=pair_id, labeler=username, choice=choice, a_on_left=a_on_left,
                          milliseconds=ms, words=words.get(a_id, 0) + words.get(b_id, 0), gold_choice=gold,
                          created_at=created_at, judgment_id=pk))
        round_of[pair_id] = round_id
    skips = dict(Assignment.objects.filter(pair__campaign=campaign, skipped=True)
                 .values_list("labeler__username").annotate(n=Count("id")))
    return votes, round_of, skips


def _statistics(campaign: Campaign) -> dict:
    """The part of the report computed from every judgment (cached on the page)."""
    votes, round_of, skips = campaign_votes(campaign)
    by_round: dict[int, list[Vote]] = {}
    for vote in votes:
        round_id = round_of.get(vote.pair_id)
        if round_id is not None:
            by_round.setdefault(round_id, []).append(vote)
    numbers = dict(campaign.rounds.filter(pk__in=by_round).values_list("pk", "number"))
    bias = agreement.position_bias(votes)
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
        "thresholds": {
            "min_kappa_overlap": agreement.MIN_KAPPA_OVERLAP,
            "min_flag_judgments": agreement.MIN_FLAG_JUDGMENTS,
            "min_flag_gold": agreement.MIN_FLAG_GOLD,
            "position_bias_p": agreement.POSITION_BIAS_P,
            "position_bias_min_gap": agreement.POSITION_BIAS_MIN_GAP,
            "gold_accuracy_min": agreement.GOLD_ACCURACY_MIN,
            "majority_agreement_min": agreement.MAJORITY_AGREEMENT_MIN,
            "reading_words_per_second": agreement.READING_WORDS_PER_SECOND,
            "too_fast_rate_max": agreement.TOO_FAST_RATE_MAX,
        },
    }


def _cached_statistics(campaign: Campaign) -> dict:
    key = f"quality-{campaign.pk}-v{CACHE_VERSION}"
    try:
        with redis_guard.guard("quality report"):
            found = cache.get(key)
            if found is not None and found.get("campaign") == campaign.slug:
                return found
            report = _statistics(campaign)
            cache.set(key, report, timeout=FRESH_SECONDS)
            return report
    except redis_guard.RedisDown:
        return _statistics(campaign)


def quality_report(campaign: Campaign, *, fresh: bool = False) -> dict:
    """The report as one JSON-ready dict; statistics up to FRESH_SECONDS old unless `fresh`."""
    report = dict(_statistics(campaign) if fresh else _cached_statistics(campaign))
    excluded = dict(Judgment.objects.filter(pair__campaign=campaign, labeler__isnull=False)
                    .filter(Exclusion.excluded_judgments(campaign))
                    .values_list("labeler__username").annotate(n=Count("id")))
    report["labelers"] = [{**row, "excluded": excluded.get(row["username"], 0)} for row in report["labelers"]]
    report["exclusions"] = [
        {"id": e.pk, "what": e.describe(), "labeler": e.labeler.get_username() if e.labeler_id else None,
         "since": e.since.isoformat() if e.since else None, "judgment": e.judgment_id, "reason": e.reason,
         "by": e.created_by.get_username() if e.created_by_id else None, "at": e.created_at.isoformat()}
        for e in Exclusion.objects.filter(campaign=campaign, lifted_at__isnull=True)
        .select_related("labeler", "created_by")
    ]
    return report
