"""One door per state change of the labeling domain.

Views, management commands, Celery tasks, the admin and tests call these functions; nothing
else creates or changes pairs, assignments or judgments.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Q, Sum, Value
from django.db.models.functions import Coalesce, Now
from django.dispatch import Signal
from django.utils import timezone

from annotate import live
from annotate.limits import INT32_MAX
from annotate.models import (
    LIVE_LEASE_SQL,
    AILabeler,
    AILabelingRun,
    AIRevision,
    AIVerdict,
    Assignment,
    Axis,
    AxisChoice,
    Campaign,
    EvalPrompt,
    EvalSet,
    Exclusion,
    Judgment,
    Pair,
    Principle,
    Prompt,
    Response,
    WarningAcknowledgment,
    content_hash,
)
from pairloop import redis_guard

log = logging.getLogger(__name__)

CANDIDATES_PER_CLAIM = 16
CLAIM_ROUNDS = 5  # fresh candidate lists to try when others hold every candidate we saw


class JudgmentError(ValueError):
    """A submit the labeler must be told about (not allowed, lease gone, bad strength)."""


# ---------------------------------------------------------------------------------------------
# The queue
# ---------------------------------------------------------------------------------------------

def _count_live_leases(pair_id: int, now, exclude_id: int | None = None) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT count(*) FROM {Assignment._meta.db_table} a
                WHERE a.pair_id = %s AND {LIVE_LEASE_SQL} AND a.id <> %s""",
            [pair_id, now, exclude_id or 0],
        )
        return cursor.fetchone()[0]


def judged_today(campaign: Campaign, labeler, now=None) -> int:
    now = now or timezone.now()
    start = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    with connection.cursor() as cursor:  # shown on every pair: plain SQL, on the (labeler, created_at) index
        cursor.execute(
            f"""SELECT count(*) FROM {Judgment._meta.db_table} j JOIN {Pair._meta.db_table} p ON p.id = j.pair_id
                WHERE j.labeler_id = %s AND j.created_at >= %s AND p.campaign_id = %s""",
            [labeler.pk, connection.ops.adapt_datetimefield_value(start), campaign.pk],
        )
        return cursor.fetchone()[0]


LEFT_RECOUNT_SECONDS = 300
LEFT_WITHOUT_REDIS_SECONDS = 15  # while Redis is down, each process recounts at most this often


def judgments_left(campaign: Campaign) -> int:
    """Judgments still wanted in the campaign, shown on every pair.

    Counting them scans every open pair (about 100 ms of PostgreSQL at a million pairs, on every core
    it may use), so the count lives in the cache: recounted exactly every LEFT_RECOUNT_SECONDS and right
    after pairs are added, and in between each judgment counts it down and each undo counts it up
    (`_count_left`). Changes made around the actions (an admin closing pairs by hand, a new overlap)
    show at the next recount. While Redis is down each process counts from the database instead, at
    most every LEFT_WITHOUT_REDIS_SECONDS.
    """

    def compute():
        total = Pair.objects.filter(campaign=campaign, is_open=True, gold_choice="").aggregate(
            wanted=Coalesce(Sum(campaign.overlap + F("extra_judgments") - F("judgments_count")), 0)
        )["wanted"]
        return int(total)

    key, fresh = _left_keys(campaign.pk)
    remembered = _LEFT_IN_PROCESS.get(campaign.pk)
    if remembered is not None and remembered[1] > time.monotonic():
        return remembered[0]  # this process asked Redis less than a second ago
    try:
        with redis_guard.guard("judgments left"):
            cached = cache.get_many([key, fresh])
            value = cached.get(key)
            if value is not None and fresh in cached:
                _LEFT_IN_PROCESS[campaign.pk] = (value, time.monotonic() + 1.0)
                return value
            # One request recounts; the others keep showing the last value meanwhile.
            if value is None or cache.add(key + "-lock", 1, timeout=30):
                value = compute()
                cache.set(key, value, timeout=None)
                cache.set(fresh, 1, timeout=LEFT_RECOUNT_SECONDS)
                cache.delete(key + "-lock")
            return value
    except redis_guard.RedisDown:
        value = compute()
        _LEFT_IN_PROCESS[campaign.pk] = (value, time.monotonic() + LEFT_WITHOUT_REDIS_SECONDS)
        return value


def _count_left(campaign_id: int, delta: int) -> None:
    """A judgment (-1) or an undo (+1) moves the cached "left in campaign" without a recount."""
    try:
        with redis_guard.guard("count judgments left"):
            cache.incr(_left_keys(campaign_id)[0], delta)
    except ValueError:
        pass  # not counted yet: the next page shown counts
    except redis_guard.RedisDown:
        pass  # the next exact recount corrects it
    remembered = _LEFT_IN_PROCESS.get(campaign_id)
    if remembered is not None:
        _LEFT_IN_PROCESS[campaign_id] = (remembered[0] + delta, remembered[1])


_LEFT_IN_PROCESS: dict[int, tuple[int, float]] = {}  # campaign id -> (judgments left, until when)


def forget_judgments_left(campaign: Campaign) -> None:
    """Drop the cached count, value and all: the next page recounts before it shows one (a fresh start,
    as tests need: their databases reuse campaign ids). Adding pairs only marks the count stale, so
    that one request recounts while the others keep showing the last value."""
    _LEFT_IN_PROCESS.pop(campaign.pk, None)
    try:
        with redis_guard.guard("forget judgments left"):
            cache.delete_many(_left_keys(campaign.pk))
    except redis_guard.RedisDown:
        pass  # a restarted Redis holds no count; a reachable one recounts within LEFT_RECOUNT_SECONDS


def _left_keys(campaign_id: int) -> tuple[str, str]:
    key = f"campaign-{campaign_id}-left"
    return key, key + "-fresh"


@dataclass
class Claim:
    assignment: Assignment | None
    reason: str = ""  # why there is no assignment: "empty", "cap" or "busy" (all taken; try again)


def claim_next_pair(campaign: Campaign, labeler, now=None) -> Claim:
    """Lease the next pair to this labeler, or say why there is none.

    A live lease the labeler already holds comes back first (a reload shows the same pair).
    Otherwise: the highest-priority open pair this labeler never had whose judgments plus live
    leases are below the campaign's overlap. Each candidate is locked (`FOR UPDATE SKIP LOCKED`
    on PostgreSQL; SQLite runs IMMEDIATE transactions, one writer at a time) and its leases are
    counted again under the lock, so concurrent claims never exceed the overlap.
    """
    now = now or timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT a.id FROM {Assignment._meta.db_table} a JOIN {Pair._meta.db_table} p ON p.id = a.pair_id
                WHERE a.labeler_id = %s AND p.campaign_id = %s AND {LIVE_LEASE_SQL} LIMIT 1""",
            [labeler.pk, campaign.pk, now],
        )
        holds_one = cursor.fetchone() is not None
    mine = holds_one and (
        Assignment.objects.live(now).select_related("pair__prompt", "pair__response_a", "pair__response_b")
        .filter(labeler=labeler, pair__campaign=campaign)
        .order_by("created_at")
        .first()
    )
    if mine:
        return Claim(mine)
    if campaign.daily_cap is not None and judged_today(campaign, labeler, now) >= campaign.daily_cap:
        return Claim(None, "cap")

    seen_by_me = Assignment.objects.filter(pair=OuterRef("pk"), labeler=labeler)
    if campaign.gold_rate > 0 and random.random() < campaign.gold_rate:
        gold = _claim_gold(campaign, labeler, seen_by_me, now)
        if gold is not None:
            return Claim(gold)
    for _ in range(CLAIM_ROUNDS):
        candidates = _candidates(campaign, labeler, now)
        if not candidates:
            return Claim(None, "empty")
        for pair_id in candidates:
            assignment = _lease(campaign, labeler, pair_id, now)
            if assignment is not None:
                return Claim(assignment)
        # Every candidate was taken while we looked (others hold them): look again.
    return Claim(None, "busy")


def _candidates(campaign: Campaign, labeler, now) -> list[int]:
    """Open pairs this labeler never had, with room under the overlap: best priority first, then
    oldest first. Labelers arriving together do not wait on each other: a candidate another claim
    has locked is skipped (SKIP LOCKED) and the next one tried."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT p.id FROM {Pair._meta.db_table} p
                WHERE p.campaign_id = %s AND p.is_open AND p.gold_choice = ''
                  AND NOT EXISTS (SELECT 1 FROM {Assignment._meta.db_table} s
                                  WHERE s.pair_id = p.id AND s.labeler_id = %s)
                  AND p.judgments_count + (SELECT count(*) FROM {Assignment._meta.db_table} a
                                           WHERE a.pair_id = p.id AND {LIVE_LEASE_SQL}) < %s + p.extra_judgments
                ORDER BY p.priority DESC, p.id LIMIT %s""",
            [campaign.pk, labeler.pk, now, campaign.overlap, CANDIDATES_PER_CLAIM],
        )
        return [row[0] for row in cursor.fetchall()]


def _lease(campaign: Campaign, labeler, pair_id: int, now) -> Assignment | None:
    """Lock one candidate (skipping it if another claim holds it), recount under the lock, lease it."""
    skip_locked = "FOR UPDATE OF p SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT p.judgments_count, p.prompt_id, p.response_a_id, p.response_b_id, p.gold_choice,
                           pr.text, ra.text, rb.text, pr.turns, p.extra_judgments
                    FROM {Pair._meta.db_table} p
                    JOIN {Prompt._meta.db_table} pr ON pr.id = p.prompt_id
                    JOIN {Response._meta.db_table} ra ON ra.id = p.response_a_id
                    JOIN {Response._meta.db_table} rb ON rb.id = p.response_b_id
                    WHERE p.id = %s AND p.is_open {skip_locked}""",
                [pair_id],
            )
            row = cursor.fetchone()
            if row is None:
                return None  # another labeler holds it right now
            count, prompt_id, a_id, b_id, gold, prompt_text, a_text, b_text, turns, extra = row
            if count + _count_live_leases(pair_id, now) >= campaign.overlap + extra:
                return None
            a_on_left = random.random() < 0.5
            expires = now + timedelta(seconds=campaign.lease_seconds)
            cursor.execute(
                f"""INSERT INTO {Assignment._meta.db_table}
                    (pair_id, labeler_id, a_on_left, created_at, shown_at, expires_at, completed_at, skipped)
                    VALUES (%s, %s, %s, %s, %s, %s, NULL, false) RETURNING id""",
                [pair_id, labeler.pk, a_on_left, now, now, expires],
            )
            assignment_id = cursor.fetchone()[0]
    except IntegrityError:
        return None  # this labeler claimed it in another tab a moment ago
    # Build the objects the page needs from the row we already have: no second round trip.
    pair = Pair(id=pair_id, campaign=campaign, prompt_id=prompt_id, response_a_id=a_id, response_b_id=b_id,
                judgments_count=count, extra_judgments=extra, gold_choice=gold, is_open=True)
    turns = Prompt._meta.get_field("turns").from_db_value(turns, None, connection)  # chat: a conversation
    pair.prompt = Prompt(id=prompt_id, campaign=campaign, text=prompt_text, turns=turns)
    pair.response_a = Response(id=a_id, prompt_id=prompt_id, text=a_text)
    pair.response_b = Response(id=b_id, prompt_id=prompt_id, text=b_text)
    return Assignment(id=assignment_id, pair=pair, labeler=labeler, a_on_left=a_on_left, created_at=now,
                      shown_at=now, expires_at=expires)


def _claim_gold(campaign: Campaign, labeler, seen_by_me, now) -> Assignment | None:
    """A gold item (a pair with a known answer) this labeler has not seen. Gold items are shown to
    every labeler, so they have no overlap limit; they measure each labeler's agreement."""
    pair = (
        Pair.objects.filter(campaign=campaign).exclude(gold_choice="").exclude(Exists(seen_by_me))
        .order_by("-priority", "id").first()
    )
    if pair is None:
        return None
    try:
        with transaction.atomic():
            return Assignment.objects.create(
                pair=pair, labeler=labeler, a_on_left=random.random() < 0.5, created_at=now, shown_at=now,
                expires_at=now + timedelta(seconds=campaign.lease_seconds),
            )
    except IntegrityError:
        return None


SHOWN_CHOICES = {"a": Judgment.A, "b": Judgment.B, "tie": Judgment.TIE, "both_bad": Judgment.BOTH_BAD}


def submit_judgment(
    *,
    assignment_id: int,
    labeler,
    choice: str = "",
    strength: int | None = None,
    choices: dict[str, str] | None = None,
    strengths: dict[str, int | None] | None = None,
    rationale: str = "",
    milliseconds: int | None = None,
    source: str = Judgment.HUMAN,
    campaign: Campaign | None = None,
    now=None,
) -> tuple[Judgment, bool]:
    """Record a labeler's choice on their assignment; returns (judgment, created).

    `choice` is in the labeler's terms: "a" is the response shown on the left as A. A campaign with
    further axes takes `choices` instead, {axis key: choice} for every axis (and `strengths`, {axis key:
    1-4} where an axis asks it): one submit stores them all, as one judgment of the pair. Submitting
    the same assignment twice returns the first judgment (a double-click records one).
    Raises Assignment.DoesNotExist for an assignment that is not this labeler's (or, when
    `campaign` is given, not in that campaign).

    The hot path of labeling: plain SQL, five statements in one transaction (lock the assignment,
    insert the judgment, close the assignment, count it on the pair), no ORM query building.
    Tie-break: when the judgment completes a pair whose judgments split (no choice made more often
    than every other) and the campaign allows more, the pair asks for one more judgment (two more
    statements, only then).
    """
    now = now or timezone.now()
    if choices is None and choice not in SHOWN_CHOICES:
        raise JudgmentError(f"unknown choice {choice!r}")
    lock = "FOR UPDATE OF a" if connection.features.has_select_for_update_of else ""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT a.pair_id, a.a_on_left, a.completed_at IS NOT NULL, a.skipped, {LIVE_LEASE_SQL},
                           p.campaign_id, p.gold_choice
                    FROM {Assignment._meta.db_table} a JOIN {Pair._meta.db_table} p ON p.id = a.pair_id
                    WHERE a.id = %s AND a.labeler_id = %s {lock}""",
                [now, assignment_id, labeler.pk],
            )
            row = cursor.fetchone()
            if row is None or (campaign is not None and row[5] != campaign.pk):
                raise Assignment.DoesNotExist(f"no assignment {assignment_id} of this labeler")
            pair_id, a_on_left, done, skipped, live, campaign_id, gold_choice = row
            if done:
                existing = Judgment.objects.filter(assignment_id=assignment_id).first()
                if existing is not None:
                    return existing, False
            if skipped:
                raise JudgmentError("you skipped this pair")
            if campaign is None:
                campaign = Campaign.objects.get(pk=campaign_id)
            further = campaign.axes()[1:]
            if choices is not None:
                choice, strength = _on_first_axis(campaign, further, choices, strengths or {})
            elif further:
                raise JudgmentError("this campaign asks several questions: give a choice for each axis ("
                                    + ", ".join(axis.key for axis in campaign.axes()) + ")")
            named = bool(further)  # errors name the axis when there are several
            canonical, strength = _canonical(campaign.axes()[0], choice, strength, a_on_left, named)
            on_further = [(axis, *_canonical(axis, choices[axis.key], (strengths or {}).get(axis.key), a_on_left,
                                             named)) for axis in further]
            if not live and not gold_choice:
                # The lease ran out: its slot may have gone to someone else. Count under the pair's lock.
                pair = Pair.objects.select_for_update().get(pk=pair_id)
                taken = pair.judgments_count + _count_live_leases(pair_id, now, exclude_id=assignment_id)
                if taken >= campaign.overlap + pair.extra_judgments:
                    raise JudgmentError("your lease on this pair ran out and others have judged it since")
            judgment = Judgment(
                pair_id=pair_id,
                assignment_id=assignment_id,
                labeler=labeler,
                choice=canonical,
                strength=strength,
                rationale=(rationale or "").strip()[:5000] if campaign.ask_rationale else "",
                milliseconds=milliseconds if milliseconds is None else min(max(0, int(milliseconds)), INT32_MAX),
                a_on_left=bool(a_on_left),
                source=source,
                created_at=now,
            )
            cursor.execute(
                f"""INSERT INTO {Judgment._meta.db_table} (pair_id, assignment_id, labeler_id, choice, strength,
                        rationale, milliseconds, a_on_left, source, created_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
                [pair_id, assignment_id, labeler.pk, judgment.choice, judgment.strength, judgment.rationale,
                 judgment.milliseconds, judgment.a_on_left, source,
                 connection.ops.adapt_datetimefield_value(now)],
            )
            judgment.id = cursor.fetchone()[0]
            judgment._state.adding, judgment._state.db = False, connection.alias
            if on_further:  # every further axis in one statement
                cursor.execute(
                    f"""INSERT INTO {AxisChoice._meta.db_table} (judgment_id, axis_id, choice, strength)
                        VALUES {", ".join(["(%s, %s, %s, %s)"] * len(on_further))}""",
                    [value for axis, c, st in on_further for value in (judgment.id, axis.pk, c, st)],
                )
            cursor.execute(f"UPDATE {Assignment._meta.db_table} SET completed_at = %s WHERE id = %s",
                           [now, assignment_id])
            cursor.execute(
                f"""UPDATE {Pair._meta.db_table} SET judgments_count = judgments_count + 1,
                    is_open = (judgments_count + 1 < %s + extra_judgments AND gold_choice = '') WHERE id = %s
                    RETURNING is_open, extra_judgments""",
                [campaign.overlap, pair_id],
            )
            still_open, extra = cursor.fetchone()
            tie_break = (not gold_choice and not still_open and extra < campaign.tie_break_limit
                         and _split(cursor, pair_id))
            if tie_break:
                # The judgments split: one more, up to the campaign's limit (the UPDATE locked the pair).
                cursor.execute(f"""UPDATE {Pair._meta.db_table} SET extra_judgments = extra_judgments + 1,
                                   is_open = true WHERE id = %s""", [pair_id])
            if not still_open and not tie_break and not gold_choice and queue_emptied.has_listeners(Campaign):
                _tell_if_emptied(campaign, judgment)
    except IntegrityError:
        return Judgment.objects.get(pair_id=row[0], labeler=labeler), False
    if not gold_choice and not tie_break:
        _count_left(campaign_id, -1)  # with a tie-break, one judgment made and one more wanted: no change
    return judgment, True


def _on_first_axis(campaign: Campaign, further: list, choices: dict, strengths: dict) -> tuple[str, int | None]:
    """Check that `choices` names every axis of the campaign and no other; the first axis's (choice, strength)."""
    keys = [campaign.axis_key, *(axis.key for axis in further)]
    unknown = sorted(set(choices) - set(keys))
    if unknown:
        raise JudgmentError(f"no axis {', '.join(map(repr, unknown))} here: the axes are {', '.join(keys)}")
    missing = [key for key in keys if not choices.get(key)]
    if missing:
        raise JudgmentError(f"give a choice on every axis: missing {', '.join(missing)}")
    return choices[campaign.axis_key], strengths.get(campaign.axis_key)


def _canonical(axis, choice: str, strength, a_on_left: bool, named: bool) -> tuple[str, int | None]:
    """A choice in shown terms on one axis, checked against what it offers, as (choice in the pair's terms,
    strength or None)."""
    where = f" on {axis.key}" if named else ""
    if choice not in SHOWN_CHOICES:
        raise JudgmentError(f"unknown choice {choice!r}{where}")
    canonical = SHOWN_CHOICES[choice]
    if canonical not in axis.choices_offered():
        raise JudgmentError(f"this campaign does not offer '{dict(Judgment.CHOICES)[canonical]}'{where}")
    if canonical in (Judgment.A, Judgment.B) and axis.ask_strength:
        if strength is None:
            raise JudgmentError(f"say how much better{where}: strength 1 to 4")
        if not 1 <= int(strength) <= 4:
            raise JudgmentError(f"strength must be 1 to 4{where}")
        strength = int(strength)
    else:
        strength = None
    if not a_on_left and canonical in (Judgment.A, Judgment.B):
        canonical = Judgment.B if canonical == Judgment.A else Judgment.A
    return canonical, strength


def _split(cursor, pair_id: int) -> bool:
    """Whether a pair's judgments split: no one choice was made more often than every other."""
    cursor.execute(f"""SELECT count(*) AS n FROM {Judgment._meta.db_table} WHERE pair_id = %s
                       GROUP BY choice ORDER BY n DESC LIMIT 2""", [pair_id])
    counts = [row[0] for row in cursor.fetchall()]
    return len(counts) == 2 and counts[0] == counts[1]


# Sent (campaign=, judgment=) on commit when a judgment closed the campaign's last open pair.
queue_emptied = Signal()


def _tell_if_emptied(campaign: Campaign, judgment: Judgment) -> None:
    """This judgment closed its pair: if no open pair is left (on the queue's partial index), say so."""
    if not Pair.objects.filter(campaign_id=campaign.pk, is_open=True, gold_choice="").exists():
        # Robust: the judgment is committed already, whatever a listener does.
        transaction.on_commit(lambda: queue_emptied.send_robust(sender=Campaign, campaign=campaign,
                                                                judgment=judgment))


def skip_assignment(*, assignment_id: int, labeler, campaign: Campaign | None = None) -> Assignment:
    """Give a pair back without judging it; this labeler will not be shown it again.

    Raises Assignment.DoesNotExist for an assignment that is not this labeler's (or, when `campaign` is
    given, not in that campaign), as submit_judgment does.
    """
    mine = Assignment.objects.filter(pk=assignment_id, labeler=labeler)
    if campaign is not None:
        mine = mine.filter(pair__campaign=campaign)
    with transaction.atomic():
        assignment = mine.select_for_update(of=("self",)).get()
        if assignment.completed_at is None and not assignment.skipped:
            assignment.skipped = True
            assignment.save(update_fields=["skipped"])
    return assignment


def _undoable(campaign: Campaign, labeler, now):
    """This labeler's own judgments (page or API) in the campaign inside the undo window, newest first."""
    window = timedelta(seconds=settings.PAIRLOOP["UNDO_SECONDS"])
    return (Judgment.objects.filter(labeler=labeler, pair__campaign=campaign, source__in=Judgment.UNDOABLE,
                                    created_at__gte=now - window)
            .order_by("-created_at", "-pk"))


def last_undoable_judgment_id(campaign: Campaign, labeler, now=None) -> int | None:
    """The judgment "Undo last" takes back right now (None when there is none): the page sends its id,
    so undo takes back what the labeler saw as their last, and only that."""
    seconds = settings.PAIRLOOP["UNDO_SECONDS"]
    if not seconds:
        return None
    since = (now or timezone.now()) - timedelta(seconds=seconds)
    with connection.cursor() as cursor:  # on every page shown: plain SQL, on the (labeler, created_at) index
        cursor.execute(
            f"""SELECT j.id FROM {Judgment._meta.db_table} j JOIN {Pair._meta.db_table} p ON p.id = j.pair_id
                WHERE j.labeler_id = %s AND j.created_at >= %s AND j.source IN (%s, %s) AND p.campaign_id = %s
                ORDER BY j.created_at DESC, j.id DESC LIMIT 1""",
            [labeler.pk, connection.ops.adapt_datetimefield_value(since), *Judgment.UNDOABLE, campaign.pk],
        )
        row = cursor.fetchone()
    return row[0] if row else None


class UndoRefused(ValueError):
    """An undo that changes nothing, with the reason the labeler is told."""


def undo_last_judgment(
    campaign: Campaign, labeler, now=None, *, judgment_id: int | None = None
) -> Judgment | None:
    """Take back this labeler's last judgment in the campaign if it is recent enough.

    With `judgment_id` (what the labeling page sends: the last judgment when it was shown), only that
    judgment is taken back, and only while it is still the labeler's last: a second undo sent with the
    same id (a fast double `u`, two tabs) raises UndoRefused and changes nothing. Without it, whatever
    is last now. Returns None when nothing is recent enough.
    The pair comes back to the labeler as a live lease, so the next page shows it again.
    """
    now = now or timezone.now()
    with transaction.atomic():
        undoable = _undoable(campaign, labeler, now).select_for_update(of=("self",))
        undoable = undoable.select_related("assignment")
        if judgment_id is None:
            judgment = undoable.first()
        else:
            # Lock the named judgment: a concurrent undo of it waits here, then finds it gone.
            judgment = undoable.filter(pk=judgment_id).first()
            if judgment is None:
                if Judgment.objects.filter(pk=judgment_id, labeler=labeler, pair__campaign=campaign).exists():
                    return None  # still there: only too old to undo
                raise UndoRefused("That judgment was undone already.")
            if _undoable(campaign, labeler, now).values_list("pk", flat=True).first() != judgment.pk:
                raise UndoRefused("Nothing undone: you have judged another pair since.")
        if judgment is None:
            return None
        pair = Pair.objects.select_for_update().get(pk=judgment.pair_id)
        assignment = judgment.assignment
        AxisChoice.objects.filter(judgment=judgment).delete()  # taken back with it, all axes at once
        judgment.delete()
        pair.judgments_count = max(0, pair.judgments_count - 1)
        # Tie-breaks stand only for splits still seen: the k-th was asked for at overlap + k - 1 judgments.
        pair.extra_judgments = min(pair.extra_judgments, max(0, pair.judgments_count - campaign.overlap + 1))
        pair.is_open = pair.judgments_count < campaign.overlap + pair.extra_judgments
        pair.save(update_fields=["judgments_count", "extra_judgments", "is_open"])
        if assignment is not None:
            assignment.completed_at = None
            assignment.shown_at = now
            assignment.expires_at = now + timedelta(seconds=campaign.lease_seconds)
            assignment.save(update_fields=["completed_at", "shown_at", "expires_at"])
    if not pair.gold_choice:
        _count_left(campaign.pk, +1)
    return judgment


# ---------------------------------------------------------------------------------------------
# Labelers leaving
# ---------------------------------------------------------------------------------------------

def deactivate_user(user, now=None) -> int:
    """Take a user out of labeling instead of deleting them: their judgments stay and count.

    They are signed out on their next request (annotate.auth loads only active users) and their live
    leases end now, so those pairs go back to the queue at once. Returns the number of leases ended.
    Deleting a user who has assignments or judgments is refused (PROTECT): this is the way out.
    """
    now = now or timezone.now()
    model = type(user)
    with transaction.atomic():
        model._default_manager.filter(pk=user.pk, is_active=True).update(is_active=False)
        user.is_active = False
        released = Assignment.objects.live(now).filter(labeler_id=user.pk).update(expires_at=now)
    return released


def acknowledge_content_warning(campaign: Campaign, user, now=None) -> WarningAcknowledgment:
    """Record that the user read the campaign's content warning; the label page then shows pairs."""
    acknowledgment, _ = WarningAcknowledgment.objects.get_or_create(
        campaign=campaign, user=user, defaults={"acknowledged_at": now or timezone.now()})
    return acknowledgment


# ---------------------------------------------------------------------------------------------
# Leaving judgments out of export and training, reversibly
# ---------------------------------------------------------------------------------------------

class ExclusionError(ValueError):
    """An exclusion that cannot be made as asked, with the reason the admin is told; nothing changed."""


def exclude_judgments(campaign: Campaign, *, by, reason: str, labeler=None, since=None,
                      judgment: Judgment | None = None, now=None) -> Exclusion:
    """Leave a labeler's judgments (all, or from `since` on) or one judgment out of export and training.

    Nothing is deleted; include_again() brings them back. Raises ExclusionError, changing nothing, when
    the reason is empty, both or neither of labeler and judgment are given, or the judgment is not the
    campaign's.
    """
    reason = (reason or "").strip()
    if not reason:
        raise ExclusionError("say why: the reason is shown with every export that leaves them out")
    if (labeler is None) == (judgment is None):
        raise ExclusionError("exclude either a labeler's judgments or one judgment")
    if judgment is not None:
        if since is not None:
            raise ExclusionError("'since' applies to a labeler's judgments, not to one judgment")
        if judgment.pair.campaign_id != campaign.pk:
            raise ExclusionError(f"judgment {judgment.pk} is not in campaign {campaign.slug}")
    return Exclusion.objects.create(campaign=campaign, labeler=labeler, since=since, judgment=judgment,
                                    reason=reason[:2000], created_by=by, created_at=now or timezone.now())


def include_again(exclusion: Exclusion, *, by, now=None) -> Exclusion:
    """Lift an exclusion: its judgments count again (an export is then what it was before it)."""
    with transaction.atomic():
        exclusion = Exclusion.objects.select_for_update().get(pk=exclusion.pk)
        if exclusion.lifted_at is None:
            exclusion.lifted_at = now or timezone.now()
            exclusion.lifted_by = by
            exclusion.save(update_fields=["lifted_at", "lifted_by"])
    return exclusion


# ---------------------------------------------------------------------------------------------
# Adding pairs (import, demo seed, a round's new samples)
# ---------------------------------------------------------------------------------------------

@dataclass
class PairInput:
    """One pair to add. `preferred` is "a" when response_a is known to be better (TRL chosen)."""

    prompt: str | list[dict]
    response_a: str
    response_b: str
    preferred: str | None = None
    margin: float | None = None
    meta: dict = field(default_factory=dict)
    truncated: tuple[bool, bool] = (False, False)  # a policy's response the length limit cut (it never ended)
    checkpoints: tuple[str, str] | None = None  # the checkpoints that wrote response_a and response_b; None: add_pairs'


def _prompt_text(prompt) -> tuple[str, list | None]:
    if isinstance(prompt, str):
        return prompt, None
    turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in prompt]
    if len(turns) == 1:
        return turns[0]["content"], turns
    return "\n\n".join(f"**{t['role']}:** {t['content']}" for t in turns), turns


@dataclass
class AddResult:
    created: int = 0
    skipped: int = 0


def add_pairs(
    campaign: Campaign,
    items: Iterable[PairInput],
    *,
    round=None,
    priority: int = 0,
    source: str = Response.IMPORT,
    checkpoints: tuple[str, str] = ("", ""),
    generation: dict | None = None,
    batch_size: int = 1000,
    notify: bool = True,
    purpose: str = Pair.TRAINING,
) -> AddResult:
    """Add pairs to a campaign in batches (bounded memory); duplicates are skipped and counted. `purpose`:
    Pair.TRAINING, or Pair.EVALUATION for a round's blind evaluation (never exported for training).

    Runs in one transaction: the caller validated everything first, and a failure adds nothing.
    """
    result = AddResult()
    batch: list[PairInput] = []
    with transaction.atomic():
        for item in items:
            batch.append(item)
            if len(batch) >= batch_size:
                _add_batch(campaign, batch, result, round, priority, source, checkpoints, generation or {}, purpose)
                batch = []
        if batch:
            _add_batch(campaign, batch, result, round, priority, source, checkpoints, generation or {}, purpose)
        if notify and result.created:
            transaction.on_commit(lambda: live.pairs_arrived(campaign, result.created))
    _LEFT_IN_PROCESS.pop(campaign.pk, None)
    try:
        with redis_guard.guard("mark judgments left stale"):
            cache.delete(_left_keys(campaign.pk)[1])  # recount on the next page shown (others: within 1 s)
    except redis_guard.RedisDown:
        pass  # a restarted Redis holds no count; a reachable one recounts within LEFT_RECOUNT_SECONDS
    return result


def _add_batch(campaign, batch, result, round, priority, source, checkpoints, generation, purpose):
    now = timezone.now()
    # Prompts: get or create by content hash.
    prompt_rows = {}
    for item in batch:
        text, turns = _prompt_text(item.prompt)
        prompt_rows.setdefault(content_hash(text), (text, turns))
    existing = dict(Prompt.objects.filter(campaign=campaign, hash__in=prompt_rows).values_list("hash", "id"))
    Prompt.objects.bulk_create(
        [Prompt(campaign=campaign, text=t, turns=turns, hash=h, created_at=now)
         for h, (t, turns) in prompt_rows.items() if h not in existing],
        ignore_conflicts=True,
    )
    prompt_ids = dict(Prompt.objects.filter(campaign=campaign, hash__in=prompt_rows).values_list("hash", "id"))

    # Responses: get or create by (prompt, content hash).
    wanted = {}
    for item in batch:
        pid = prompt_ids[content_hash(_prompt_text(item.prompt)[0])]
        made_by = item.checkpoints or checkpoints
        for text, checkpoint, cut in ((item.response_a, made_by[0], item.truncated[0]),
                                      (item.response_b, made_by[1], item.truncated[1])):
            wanted.setdefault((pid, content_hash(text)), (text, checkpoint, cut))
    hashes = {h for (_, h) in wanted}
    have = {(p, h): i for p, h, i in Response.objects.filter(prompt_id__in=set(prompt_ids.values()), hash__in=hashes)
            .values_list("prompt_id", "hash", "id")}
    Response.objects.bulk_create(
        [Response(prompt_id=p, text=text, hash=h, source=source, round=round, checkpoint=ckpt,
                  generation={**generation, "truncated": True} if cut else generation, created_at=now)
         for (p, h), (text, ckpt, cut) in wanted.items() if (p, h) not in have],
        ignore_conflicts=True,
    )
    response_ids = {(p, h): i for p, h, i in Response.objects.filter(prompt_id__in=set(prompt_ids.values()), hash__in=hashes)
                    .values_list("prompt_id", "hash", "id")}

    # Pairs: skip those already in the campaign (either order) and repeats inside the batch.
    planned = []
    for item in batch:
        pid = prompt_ids[content_hash(_prompt_text(item.prompt)[0])]
        a = response_ids[(pid, content_hash(item.response_a))]
        b = response_ids[(pid, content_hash(item.response_b))]
        planned.append((item, pid, a, b, Pair.key_for(a, b)))
    known = set(Pair.objects.filter(campaign=campaign, key__in=[p[4] for p in planned]).values_list("key", flat=True))
    new_pairs, judged = [], []
    for item, pid, a, b, key in planned:
        if key in known or a == b:
            result.skipped += 1
            continue
        known.add(key)
        pair = Pair(campaign=campaign, prompt_id=pid, response_a_id=a, response_b_id=b, key=key, priority=priority,
                    round=round, purpose=purpose, created_at=now)
        if item.preferred is not None:
            # A preference that arrives with the data (TRL chosen/rejected) counts as judged.
            pair.judgments_count = 1
            pair.is_open = False
            judged.append((pair, item))
        new_pairs.append(pair)
    Pair.objects.bulk_create(new_pairs)
    if judged:
        # bulk_create sets primary keys on PostgreSQL and SQLite alike.
        Judgment.objects.bulk_create(
            [Judgment(pair=pair, labeler=None, choice=Judgment.A if item.preferred == "a" else Judgment.B,
                      strength=_strength_from_margin(item.margin), source=Judgment.IMPORTED, created_at=now)
             for pair, item in judged]
        )
    result.created += len(new_pairs)


def _strength_from_margin(margin: float | None) -> int | None:
    """The inverse of Judgment.margin(): an imported margin back to the 1-4 strength scale."""
    if margin is None:
        return None
    return max(1, min(4, int(round(float(margin) * 3)) + 1))


# ---------------------------------------------------------------------------------------------
# Campaigns
# ---------------------------------------------------------------------------------------------

CAMPAIGN_SETTINGS = ("name", "instructions", "axis_key", "question", "allow_tie", "allow_both_bad", "ask_strength",
                     "ask_rationale",
                     "overlap", "tie_break_limit", "lease_seconds", "daily_cap", "gold_rate", "content_warning",
                     "min_new_share", "is_active")
# The models a campaign's rounds train and how its policy samples: set in the Django admin.
CAMPAIGN_MODEL_SETTINGS = ("policy_model", "reference_model", "reward_model", "system_prompt", "max_new_tokens",
                           "temperature", "top_p", "stop_strings")


def _check_settings(values: dict) -> None:
    """Refuse unknown settings, and empty values where the column takes none (full_clean lets an empty value
    through on a blank=True field, and the database would refuse it with an error instead)."""
    unknown = set(values) - set(CAMPAIGN_SETTINGS) - set(CAMPAIGN_MODEL_SETTINGS)
    if unknown:
        raise ValueError(f"unknown campaign settings: {', '.join(sorted(unknown))}")
    empty = {name: "This field cannot be null." for name, value in values.items()
             if value is None and not Campaign._meta.get_field(name).null}
    if empty:
        raise ValidationError(empty)


def create_campaign(*, slug: str, name: str, **settings_) -> Campaign:
    """A new campaign with these settings (the model's defaults for the rest). Raises ValidationError
    naming each bad field (a slug in use, a name too long) and creates nothing."""
    _check_settings(settings_)
    campaign = Campaign(slug=slug, name=name, **settings_)
    campaign.full_clean()
    campaign.save()
    return campaign


def change_campaign_settings(campaign: Campaign, **changes) -> Campaign:
    """Change a campaign's settings. A new overlap reopens the pairs that now want more judgments and
    closes those that have enough, in the same transaction, so the queue follows at once. Raises
    ValidationError naming each bad field and changes nothing."""
    _check_settings(changes)
    with transaction.atomic():
        campaign = Campaign.objects.select_for_update().get(pk=campaign.pk)
        new_overlap = "overlap" in changes and changes["overlap"] != campaign.overlap
        for name, value in changes.items():
            setattr(campaign, name, value)
        campaign.full_clean(exclude=["slug"])
        campaign.save(update_fields=list(changes))
        if new_overlap:
            # Gold items and imported preferences (judged when they arrived) keep their state.
            pairs = Pair.objects.filter(campaign=campaign, gold_choice="")
            wanted = campaign.overlap + F("extra_judgments")  # tie-breaks want one more each
            pairs.filter(is_open=True, judgments_count__gte=wanted).update(is_open=False)
            (pairs.filter(is_open=False, judgments_count__lt=wanted)
             .exclude(Exists(Judgment.objects.filter(pair=OuterRef("pk"), source=Judgment.IMPORTED)))
             .update(is_open=True))
    if new_overlap:
        forget_judgments_left(campaign)
    return campaign


# ---------------------------------------------------------------------------------------------
# Axes: further questions asked on every pair
# ---------------------------------------------------------------------------------------------

def save_axis(axis: Axis) -> Axis:
    """Add a further axis to its campaign, or change one (its question, choices, place). Raises
    ValidationError naming each bad field (a key in use, the first axis's key) and saves nothing."""
    axis.full_clean()
    axis.save()
    return axis


def remove_axis(axis: Axis) -> None:
    """Remove a further axis nobody has answered yet; one with choices is kept (ProtectedError)."""
    axis.delete()


# ---------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalInput:
    """One row of an evaluation set: its line in the file, the prompt (text or chat turns), a reference or ""."""

    line: int
    prompt: str | list
    reference: str = ""


def eval_set_version(items: list[EvalInput]) -> str:
    """The version of an evaluation set: a hash of its prompts and references in order, as an export's."""
    return content_hash(*(part for item in items for part in (_prompt_text(item.prompt)[0], item.reference)))[:16]


class EvalSetRefused(ValueError):
    """An evaluation set refused whole; `problems` holds (line, field, reason) of each bad row."""

    def __init__(self, problems: list[tuple[int, str, str]]):
        super().__init__("; ".join(f"line {line}, field {field!r}: {reason}" for line, field, reason in problems))
        self.problems = problems


def add_eval_set(campaign: Campaign, name: str, items: list[EvalInput]) -> tuple[EvalSet, bool]:
    """Store the rows as an evaluation set of the campaign (the one its rounds are evaluated on from now on);
    the same content again returns the version already there, (set, False). Raises EvalSetRefused, storing
    nothing, for a prompt repeated or one the campaign trains on (a prompt is in one or the other)."""
    rows = [(item, *_prompt_text(item.prompt)) for item in items]
    seen: dict[str, int] = {}
    errors = []
    for item, text, _ in rows:
        if content_hash(text) in seen:
            errors.append((item.line, "prompt", f"repeats the prompt of line {seen[content_hash(text)]}"))
        seen.setdefault(content_hash(text), item.line)
    training = set(Prompt.training(campaign).filter(hash__in=list(seen)).values_list("hash", flat=True))
    errors += [(item.line, "prompt", "is a training prompt of this campaign: an evaluation prompt never is")
               for item, text, _ in rows if content_hash(text) in training]
    if not rows:
        errors.append((0, "", "no prompts"))
    if errors:
        raise EvalSetRefused(sorted(errors))
    version = eval_set_version(items)
    with transaction.atomic():
        Campaign.objects.select_for_update().get(pk=campaign.pk)
        existing = EvalSet.objects.filter(campaign=campaign, version=version).first()
        if existing is not None:
            return existing, False
        eval_set = EvalSet.objects.create(campaign=campaign, name=name[:200], version=version)
        EvalPrompt.objects.bulk_create([
            EvalPrompt(eval_set=eval_set, position=item.line, text=text, turns=turns, reference=item.reference,
                       hash=content_hash(text)) for item, text, turns in rows])
    return eval_set, True


# ---------------------------------------------------------------------------------------------
# AI labelers
# ---------------------------------------------------------------------------------------------

class AILabelerTaken(ValidationError):
    """An AI labeler's name (or its account's) already taken on its campaign: nothing was created."""


class AILabelerBusy(ValueError):
    """An AI labeler that cannot be changed or removed now (a live run, or judgments that hang on it)."""


def _constitution(campaign: Campaign, principles: Iterable[str | tuple[str, str]]) -> list[tuple[str, str]]:
    """The principles as (text, axis), texts stripped. Raises ValidationError naming each bad one by its index
    (principles[i].text, principles[i].axis), or the list (principles) when it is empty or leaves an axis of
    the campaign unanswered."""
    rows = [(p, "") if isinstance(p, str) else tuple(p) for p in principles]
    if not rows:
        raise ValidationError({"principles": "a constitution needs at least one principle"})
    keys = {axis.key for axis in campaign.axes()}
    errors = {}
    for index, (text, axis) in enumerate(rows):
        if not text.strip():
            errors[f"principles[{index}].text"] = "a principle cannot be empty"
        if axis and axis not in keys:
            errors[f"principles[{index}].axis"] = AILabeler.axes_problem(campaign, [axis])
    if errors:
        raise ValidationError(errors)
    problem = AILabeler.axes_problem(campaign, [axis for _, axis in rows])
    if problem:
        raise ValidationError({"principles": problem})
    return [(text.strip(), axis) for text, axis in rows]


def create_ai_labeler(campaign: Campaign, *, name: str, model: str, principles: Iterable[str | tuple[str, str]],
                      **settings_) -> AILabeler:
    """A new AI labeler of the campaign with its account and constitution: each principle a text, or
    (text, axis). Raises ValidationError naming each bad field (a principle by its index) and creates
    nothing; AILabelerTaken when the campaign has a labeler of that name."""
    principles = _constitution(campaign, principles)
    if AILabeler.objects.filter(campaign=campaign, name=name).exists():
        raise AILabelerTaken({"name": f"campaign {campaign.slug} has an AI labeler named {name} already"})
    labeler = AILabeler(campaign=campaign, name=name, model=model, **settings_)
    labeler.full_clean(exclude=["account"])
    try:
        with transaction.atomic():
            labeler.account = ai_labeler_account(campaign, name)
            labeler.save()
            Principle.objects.bulk_create(Principle(labeler=labeler, text=text, axis=axis)
                                          for text, axis in principles)
    except IntegrityError:  # the same name made at the same time, or an account name another labeler holds
        raise AILabelerTaken({"name": f"the AI labeler {name} or its account "
                                      f"{AILabeler.account_name(campaign, name)} exists already"}) from None
    return labeler


def replace_principles(labeler: AILabeler, principles: Iterable[str | tuple[str, str]]) -> AILabeler:
    """Replace an AI labeler's constitution (each principle a text, or (text, axis)); its verdicts keep the
    principle text they were asked with. Raises ValidationError naming each bad principle, and
    AILabelerBusy while a run of it is queued or running; changes nothing then."""
    principles = _constitution(labeler.campaign, principles)
    with transaction.atomic():
        AILabeler.objects.select_for_update().get(pk=labeler.pk)  # a start waits for this, or this for it
        if labeler.runs.filter(status__in=AILabelingRun.LIVE).exists():
            raise AILabelerBusy(f"AI labeler {labeler.name} is running: stop it before changing its principles")
        labeler.principles.all().delete()
        Principle.objects.bulk_create(Principle(labeler=labeler, text=text, axis=axis) for text, axis in principles)
    return labeler


def delete_ai_labeler(labeler: AILabeler) -> None:
    """Remove an AI labeler that never judged, with its principles and runs; its account stays, as a
    labeler of the same name would take it up again. Raises AILabelerBusy, removing nothing, while a run
    of it is live or once it has verdicts or revisions (they are kept, and the labeler with them)."""
    with transaction.atomic():
        AILabeler.objects.select_for_update().get(pk=labeler.pk)
        if labeler.runs.filter(status__in=AILabelingRun.LIVE).exists():
            raise AILabelerBusy(f"AI labeler {labeler.name} is running: stop it first")
        if labeler.verdicts.exists() or labeler.revisions.exists():
            raise AILabelerBusy(f"AI labeler {labeler.name} has judged pairs or proposed revisions: its verdicts "
                                "are kept with it, so it cannot be deleted")
        labeler.delete()


def ai_labeler_account(campaign: Campaign, name: str):
    """The account an AI labeler's judgments are made under: no password, a member of its campaign."""
    from django.contrib.auth import get_user_model

    account, created = get_user_model().objects.get_or_create(username=AILabeler.account_name(campaign, name))
    if created:
        account.set_unusable_password()
        account.save(update_fields=["password"])
    campaign.members.add(account)
    return account


def release_assignment(*, assignment_id: int, labeler) -> None:
    """Give back a lease that will not be judged now (its asking failed): the pair returns to the queue at
    once, and this labeler may be given it again. A judged or skipped assignment stays as it is."""
    Assignment.objects.filter(pk=assignment_id, labeler=labeler, completed_at__isnull=True, skipped=False,
                              judgment__isnull=True).delete()


def record_ai_judgment(ai_labeler: AILabeler, *, assignment_id: int, verdicts: list[dict], choice: str | None,
                       strength: int | None = None, choices: dict[str, str] | None = None,
                       strengths: dict[str, int | None] | None = None) -> Judgment | None:
    """Store an AI labeler's verdicts on its assignment and the judgment they make, in one transaction:
    `choice` in shown terms ("a" the left response), or None to skip the pair; on a campaign with several
    axes, `choices` and `strengths` per axis key as submit_judgment takes them. Each verdict is a dict of
    AIVerdict's fields (principle, axis, prompts, raw answers, choices, probabilities, outcome)."""
    with transaction.atomic():
        judgment = None
        if choice is None:
            assignment = skip_assignment(assignment_id=assignment_id, labeler=ai_labeler.account,
                                         campaign=ai_labeler.campaign)
            pair_id = assignment.pair_id
        else:
            judgment, _ = submit_judgment(assignment_id=assignment_id, labeler=ai_labeler.account, choice=choice,
                                          strength=strength, choices=choices, strengths=strengths,
                                          source=Judgment.AI, campaign=ai_labeler.campaign,
                                          rationale=f"AI labeler {ai_labeler.name}: {ai_labeler.model}")
            pair_id = judgment.pair_id
        AIVerdict.objects.bulk_create(AIVerdict(labeler=ai_labeler, pair_id=pair_id, judgment=judgment,
                                                model=ai_labeler.model, **verdict) for verdict in verdicts)
    return judgment


def propose_revision(ai_labeler: AILabeler, *, prompt: Prompt, original: str, revision: str, policy: str,
                     revision_side: str, provenance: dict, priority: int = 0) -> AIRevision | None:
    """Put an AI labeler's revision of a policy's answer into the queue as a pair, the revision as response
    `revision_side` ("a" or "b"; the caller spreads them: training.cai.cai_revise) and the original as the other,
    with its proposal, revision preferred: people confirm or overturn it by judging the pair as any other.
    `provenance` holds AIRevision's principle, prompts and raw answers. Returns None, adding nothing, when the pair
    is in the campaign already."""
    if revision_side not in (Judgment.A, Judgment.B):
        raise ValueError(f"revision_side must be {Judgment.A!r} or {Judgment.B!r}, got {revision_side!r}")
    now = timezone.now()
    with transaction.atomic():
        responses = []
        for text, source, checkpoint, generation in (
                (original, Response.POLICY, policy, {}),
                (revision, Response.REVISION, f"AI revision: {ai_labeler.name} ({ai_labeler.model})",
                 {"ai_labeler": ai_labeler.name, "model": ai_labeler.model})):
            response, _ = Response.objects.get_or_create(
                prompt=prompt, hash=content_hash(text),
                defaults=dict(text=text, source=source, checkpoint=checkpoint, generation=generation, created_at=now))
            responses.append(response)
        key = Pair.key_for(responses[0].pk, responses[1].pk)
        if responses[0].pk == responses[1].pk or Pair.objects.filter(campaign=prompt.campaign, key=key).exists():
            return None
        response_a, response_b = responses[::-1] if revision_side == Judgment.A else responses
        pair = Pair.objects.create(campaign=prompt.campaign, prompt=prompt, response_a=response_a,
                                   response_b=response_b, key=key, priority=priority, created_at=now)
        proposal = AIRevision.objects.create(labeler=ai_labeler, pair=pair, model=ai_labeler.model, policy=policy,
                                             proposed_choice=revision_side, created_at=now, **provenance)
        transaction.on_commit(lambda: live.pairs_arrived(prompt.campaign, 1))
    forget_judgments_left(prompt.campaign)
    return proposal


AI_LABELING_TASK = "training.ai_label"  # training/tasks.py: the run's body is training.ai_labeling.run_ai_labeling
MAX_RUN_COUNT = 100_000  # pairs one run may be asked for: a typo's bound, far above a day's endpoint budget


def start_ai_labeling(labeler: AILabeler, *, count: int, user=None) -> AILabelingRun:
    """Queue a run of the AI labeler over up to `count` pairs of its campaign's queue, sent to a worker on
    commit (a local model to the training queue). Raises ValidationError, creating nothing, for a bad count
    or while another run of the same labeler is queued or running."""
    if not 1 <= count <= MAX_RUN_COUNT:
        raise ValidationError({"count": f"ask for 1 to {MAX_RUN_COUNT:,} pairs"})
    with transaction.atomic():
        AILabeler.objects.select_for_update().get(pk=labeler.pk)  # two starts at once: one run
        if labeler.runs.filter(status__in=AILabelingRun.LIVE).exists():
            raise ValidationError(f"AI labeler {labeler.name} is running already: stop it first")
        problem = AILabeler.axes_problem(labeler.campaign, labeler.principles.values_list("axis", flat=True))
        if problem:
            raise ValidationError(f"AI labeler {labeler.name} cannot start: {problem}")
        run = AILabelingRun.objects.create(labeler=labeler, count=count, started_by=user)
        transaction.on_commit(lambda: _send_ai_labeling(run))
    return run


def _send_ai_labeling(run: AILabelingRun) -> None:
    """Hand the run to a worker by its task's name; when the queue cannot take it, fail it with the reason."""
    try:
        current_app.send_task(AI_LABELING_TASK, args=[run.pk], queue=run.labeler.queue())
    except Exception as exc:  # noqa: BLE001 - kombu and redis-py raise several types for a lost broker
        log.exception("could not queue AI labeling run %s", run.pk)
        AILabelingRun.objects.filter(pk=run.pk, status=AILabelingRun.QUEUED).update(
            status=AILabelingRun.FAILED, finished_at=timezone.now(),
            error=f"Could not reach the job queue (Redis): {type(exc).__name__}: {exc}")


def stop_ai_labeling(run: AILabelingRun, now=None) -> AILabelingRun:
    """Stop a run: a queued one at once, a running one before its next pair (the pair being asked is stored
    whole or not at all). Stopping a running run a second time ends it at once, for a worker that died; a
    worker still at it stops at its next pair. A finished run stays as it is."""
    now = now or timezone.now()
    AILabelingRun.objects.filter(pk=run.pk, status=AILabelingRun.QUEUED).update(
        status=AILabelingRun.STOPPED, stop_requested=True, finished_at=now)
    AILabelingRun.objects.filter(pk=run.pk, status=AILabelingRun.RUNNING, stop_requested=True).update(
        status=AILabelingRun.STOPPED, finished_at=now, note="stopped without waiting for its worker")
    AILabelingRun.objects.filter(pk=run.pk, status=AILabelingRun.RUNNING).update(stop_requested=True)
    run.refresh_from_db()
    return run


def fail_stale_ai_labeling_runs() -> list[AILabelingRun]:
    """Running AI labeling runs whose heartbeat is older than PAIRLOOP_HEARTBEAT_STALE_SECONDS fail with the
    reason (their worker was killed or lost the database); read on the database's clock, as the worker writes
    it. Called by Celery beat with the training jobs' check."""
    stale_after = settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"]
    cutoff = ExpressionWrapper(Now() - Value(timedelta(seconds=stale_after)), output_field=DateTimeField())
    silent = AILabelingRun.objects.filter(status=AILabelingRun.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=timezone.now() - timedelta(
            seconds=stale_after)))
    failed = []
    for run in silent.select_related("labeler"):
        error = (f"The worker stopped: no heartbeat for over {stale_after} s (PAIRLOOP_HEARTBEAT_STALE_SECONDS); "
                 "it was probably killed. The pairs it judged stay; start a new run for the rest.")
        if silent.filter(pk=run.pk).update(status=AILabelingRun.FAILED, finished_at=Now(), error=error):
            log.warning("%s: %s", run, error)  # still silent as it is failed: a beat meanwhile keeps it running
            failed.append(run)
    return failed
