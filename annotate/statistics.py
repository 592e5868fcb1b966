"""A campaign's figures: its queue (pairs, judgments, leases) and who judged what, as the campaign page
and the API show them."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from annotate import actions
from annotate.models import Assignment, Campaign, Exclusion, Judgment, Pair


@dataclass(frozen=True)
class QueueState:
    pairs: int
    open_pairs: int  # pairs that still need judgments
    judgments: int
    judgments_left: int  # judgments still wanted (actions.judgments_left: may lag by a few minutes)
    live_leases: int
    pairs_by_judgments: dict[str, int]  # pairs with 0, 1, 2... judgments


def queue_state(campaign: Campaign) -> QueueState:
    """The campaign's queue now: its pairs by judgments, the judgments made and wanted, the live leases."""
    pairs = Pair.objects.filter(campaign=campaign)
    by_count = dict(pairs.values_list("judgments_count").annotate(n=Count("id")).order_by())
    live = Assignment.objects.live().filter(pair__campaign=campaign)
    return QueueState(
        pairs=sum(by_count.values()),
        open_pairs=pairs.filter(is_open=True).count(),
        judgments=Judgment.objects.filter(pair__campaign=campaign).count(),
        judgments_left=actions.judgments_left(campaign),
        live_leases=live.count(),
        pairs_by_judgments={str(count): n for count, n in sorted(by_count.items())},
    )


def judgments_by_choice(campaign: Campaign) -> list[tuple[str, int]]:
    """Each choice a judgment may make (its label) with how many judgments made it, in the choices' order."""
    counts = dict(Judgment.objects.filter(pair__campaign=campaign).values_list("choice").annotate(n=Count("id")))
    return [(label, counts.get(value, 0)) for value, label in Judgment.CHOICES]


def usable_judgments(campaign: Campaign) -> int:
    """Judgments on training pairs that prefer one response (A or B) and no active exclusion leaves out: the
    Bradley-Terry pairs an export makes of them."""
    return (Judgment.objects.filter(pair__campaign=campaign, pair__purpose=Pair.TRAINING,
                                    choice__in=[Judgment.A, Judgment.B])
            .exclude(Exclusion.excluded_judgments(campaign)).count())


def labeler_figures(campaign: Campaign) -> QuerySet:
    """Per labeler and source, most judgments first: judgments in all, today, on gold items and agreeing
    with the gold answer."""
    on_gold = Q(pair__gold_choice__gt="")
    return (
        Judgment.objects.filter(pair__campaign=campaign)
        .exclude(labeler=None)
        .values("labeler__username", "source")
        .annotate(
            n=Count("id"),
            today=Count("id", filter=Q(created_at__date=timezone.localdate())),
            gold=Count("id", filter=on_gold),
            gold_agreed=Count("id", filter=on_gold & Q(choice=F("pair__gold_choice"))),
        )
        .order_by("-n")
    )
