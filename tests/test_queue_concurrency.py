"""The pair queue: many labelers at once on PostgreSQL never exceed the overlap nor judge a pair
twice; and, on any database, leases expire, skips and undo behave, the daily cap holds, priority
is respected and sides are shuffled."""

from __future__ import annotations

import random
import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from annotate.actions import (
    JudgmentError,
    PairInput,
    add_pairs,
    claim_next_pair,
    skip_assignment,
    submit_judgment,
    undo_last_judgment,
)
from annotate.models import Assignment, Judgment, Pair
from tests.conftest import make_campaign


def make_labelers(n: int, prefix: str = "worker") -> list[User]:
    """Labelers without password hashing (the actions need no login): bulk, so 50 cost nothing."""
    User.objects.bulk_create([User(username=f"{prefix}-{i:03d}", password="!") for i in range(n)])
    return list(User.objects.filter(username__startswith=f"{prefix}-").order_by("username"))


def judge(assignment, labeler, choice="tie", now=None):
    return submit_judgment(assignment_id=assignment.pk, labeler=labeler, choice=choice, now=now)


# ---------------------------------------------------------------------------------------------
# Concurrency (PostgreSQL)
# ---------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_it_drains_100_pairs_with_50_labelers_at_once_to_exactly_k_judgments_each():
    if connection.vendor != "postgresql":
        pytest.skip(f"needs PostgreSQL (SKIP LOCKED claims under real concurrency); DATABASE_URL is {connection.vendor}")
    overlap, n_pairs, n_labelers = 3, 100, 50
    labelers = make_labelers(n_labelers)
    campaign = make_campaign("rush", n_pairs=n_pairs, members=labelers, overlap=overlap, ask_strength=False)

    start = threading.Barrier(n_labelers)
    confirmed: Counter = Counter()  # labeler id -> judgments the action said it created
    errors: list[BaseException] = []

    def work(labeler):
        try:
            start.wait()
            while True:
                claim = claim_next_pair(campaign, labeler)
                if claim.assignment is None:
                    assert claim.reason in ("empty", "busy")
                    if claim.reason == "busy":
                        continue  # others held every candidate for a moment: the page retries too
                    return
                _, created = submit_judgment(assignment_id=claim.assignment.pk, labeler=labeler,
                                             choice=random.choice(["a", "b", "tie", "both_bad"]))
                confirmed[labeler.pk] += int(created)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            connection.close()  # each thread had its own connection

    threads = [threading.Thread(target=work, args=(labeler,)) for labeler in labelers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a labeler thread hung (a lock never released?)"
    assert errors == []

    judgments = Judgment.objects.filter(pair__campaign=campaign)
    assert judgments.count() == overlap * n_pairs == sum(confirmed.values())
    per_pair = Counter(judgments.values_list("pair_id", flat=True))
    assert len(per_pair) == n_pairs and set(per_pair.values()) == {overlap}
    pairs_labelers = list(judgments.values_list("pair_id", "labeler_id"))
    assert len(set(pairs_labelers)) == len(pairs_labelers), "a labeler judged a pair twice"
    assert not Pair.objects.filter(campaign=campaign, is_open=True).exists()
    assert set(Pair.objects.filter(campaign=campaign).values_list("judgments_count", flat=True)) == {overlap}
    # Every lease ended in a judgment: none was handed out beyond the overlap.
    assert Assignment.objects.filter(pair__campaign=campaign).count() == overlap * n_pairs
    assert not Assignment.objects.filter(pair__campaign=campaign, completed_at__isnull=True).exists()
    assert len(confirmed) > 1, "one labeler did all the work: the threads did not run at once"


# ---------------------------------------------------------------------------------------------
# The queue's rules, one labeler at a time (any database)
# ---------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_it_never_leases_a_pair_beyond_its_overlap():
    first, second, third = make_labelers(3)
    campaign = make_campaign("two-of-one", n_pairs=1, members=[first, second, third], overlap=2)
    assert claim_next_pair(campaign, first).assignment is not None
    assert claim_next_pair(campaign, second).assignment is not None
    claim = claim_next_pair(campaign, third)
    assert (claim.assignment, claim.reason) == (None, "empty")


@pytest.mark.django_db
def test_it_returns_an_expired_lease_and_refuses_a_late_submit_on_a_full_pair():
    slow, quick = make_labelers(2)
    campaign = make_campaign("lease", n_pairs=1, members=[slow, quick], overlap=1, lease_seconds=600)
    t0 = timezone.now()
    held = claim_next_pair(campaign, slow, now=t0).assignment
    assert claim_next_pair(campaign, quick, now=t0 + timedelta(seconds=599)).assignment is None

    expired = t0 + timedelta(seconds=601)
    taken = claim_next_pair(campaign, quick, now=expired).assignment
    assert taken is not None and taken.pair_id == held.pair_id
    judge(taken, quick, now=expired)

    with pytest.raises(JudgmentError, match="lease on this pair ran out"):
        judge(held, slow, now=expired + timedelta(seconds=5))
    assert Judgment.objects.filter(pair_id=held.pair_id).count() == 1
    assert Pair.objects.get(pk=held.pair_id).judgments_count == 1


@pytest.mark.django_db
def test_it_accepts_a_late_submit_when_nobody_took_the_pair_meanwhile():
    (slow,) = make_labelers(1)
    campaign = make_campaign("late", n_pairs=1, members=[slow], overlap=1, lease_seconds=60)
    t0 = timezone.now()
    held = claim_next_pair(campaign, slow, now=t0).assignment
    _, created = judge(held, slow, now=t0 + timedelta(minutes=30))
    assert created
    assert not Pair.objects.get(pk=held.pair_id).is_open


@pytest.mark.django_db
def test_it_skips_a_pair_for_the_labeler_and_gives_it_to_someone_else():
    skipper, other = make_labelers(2)
    campaign = make_campaign("skippy", n_pairs=2, members=[skipper, other], overlap=1)
    first = claim_next_pair(campaign, skipper).assignment
    skip_assignment(assignment_id=first.pk, labeler=skipper)
    second = claim_next_pair(campaign, skipper).assignment
    assert second.pair_id != first.pair_id
    judge(second, skipper)
    assert claim_next_pair(campaign, skipper).reason == "empty"  # the skipped pair never comes back
    assert claim_next_pair(campaign, other).assignment.pair_id == first.pair_id
    with pytest.raises(JudgmentError, match="skipped"):
        judge(first, skipper)


@pytest.mark.django_db
def test_it_undoes_only_within_the_window_and_reopens_the_pair():
    (labeler,) = make_labelers(1)
    campaign = make_campaign("oops", n_pairs=2, members=[labeler], overlap=1)
    window = settings.PAIRLOOP["UNDO_SECONDS"]
    t0 = timezone.now()
    first = claim_next_pair(campaign, labeler, now=t0).assignment
    judge(first, labeler, choice="tie", now=t0)
    # Too late: nothing changes.
    assert undo_last_judgment(campaign, labeler, now=t0 + timedelta(seconds=window + 1)) is None
    assert Judgment.objects.count() == 1

    second = claim_next_pair(campaign, labeler, now=t0).assignment
    t1 = t0 + timedelta(seconds=10)
    judge(second, labeler, choice="both_bad", now=t1)
    undone = undo_last_judgment(campaign, labeler, now=t1 + timedelta(seconds=window - 1))
    assert undone is not None and undone.pair_id == second.pair_id  # the last one, not the first
    pair = Pair.objects.get(pk=second.pair_id)
    assert (pair.judgments_count, pair.is_open) == (0, True)
    assert list(Judgment.objects.values_list("pair_id", flat=True)) == [first.pair_id]
    again = claim_next_pair(campaign, labeler, now=t1 + timedelta(seconds=window))
    assert again.assignment.pk == second.pk  # the same lease, live again


@pytest.mark.django_db
def test_it_stops_a_labeler_at_the_daily_cap_until_the_next_day():
    (labeler,) = make_labelers(1)
    campaign = make_campaign("capped", n_pairs=4, members=[labeler], daily_cap=2)
    now = timezone.now()
    for _ in range(2):
        judge(claim_next_pair(campaign, labeler, now=now).assignment, labeler, now=now)
    claim = claim_next_pair(campaign, labeler, now=now)
    assert (claim.assignment, claim.reason) == (None, "cap")
    assert claim_next_pair(campaign, labeler, now=now + timedelta(days=1)).assignment is not None


@pytest.mark.django_db
def test_it_serves_higher_priority_pairs_first():
    (labeler,) = make_labelers(1)
    campaign = make_campaign("ranked", members=[labeler])
    add_pairs(campaign, [PairInput(f"low {i}", f"x{i}", f"y{i}") for i in range(3)], priority=0, notify=False)
    add_pairs(campaign, [PairInput(f"high {i}", f"x{i}", f"y{i}") for i in range(2)], priority=5, notify=False)
    add_pairs(campaign, [PairInput("middle", "x", "y")], priority=2, notify=False)
    served = []
    for _ in range(6):
        assignment = claim_next_pair(campaign, labeler).assignment
        served.append(assignment.pair.prompt.text)
        judge(assignment, labeler)
    assert served == ["high 0", "high 1", "middle", "low 0", "low 1", "low 2"]


@pytest.mark.django_db
def test_it_shuffles_sides_per_assignment_and_records_them():
    (labeler,) = make_labelers(1)
    campaign = make_campaign("sides", n_pairs=40, members=[labeler])
    orders = []
    for _ in range(40):
        assignment = claim_next_pair(campaign, labeler).assignment
        left, right = assignment.shown()
        pair = assignment.pair
        assert (left, right) == ((pair.response_a, pair.response_b) if assignment.a_on_left
                                 else (pair.response_b, pair.response_a))
        orders.append(Assignment.objects.get(pk=assignment.pk).a_on_left)
        skip_assignment(assignment_id=assignment.pk, labeler=labeler)
    # Both orders occur (a fixed order would fail this with certainty; a fair coin with 2 * 2**-40).
    assert 0 < sum(orders) < len(orders)
