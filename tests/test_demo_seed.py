"""The demo seed as a newcomer's first command runs it, its output going to a log rather than a terminal:
the demo policy's answers become pairs, a simulated labeler judges most of them (marked simulated, so
the export and the campaign page say so), a modest number stay open for people, and a round can be
launched at once. Progress shows as plain lines with the time left."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command

from annotate.actions import claim_next_pair
from annotate.exporting import raw_rows
from annotate.models import Campaign, Judgment, Pair
from demo import demo_tasks
from tests.conftest import PASSWORD
from training import actions
from training.engine.common import LineProgress

pytestmark = pytest.mark.django_db


@pytest.fixture
def chains(monkeypatch):
    """The chains a launch would have sent to Celery (never sent to a broker here)."""
    sent: list[list[int]] = []
    monkeypatch.setattr("training.dispatch.start_chain", lambda job_ids: sent.append(list(job_ids)))
    return sent


def test_it_seeds_judged_simulated_pairs_leaves_some_for_people_and_a_round_can_be_launched(
        client, chains, django_capture_on_commit_callbacks):
    out = io.StringIO()  # not a terminal, as when scripts/demo's output goes to a log
    call_command("seed_demo", "--preset", "tiny", "--prompts", "60", "--judged", "80", stdout=out)
    printed = out.getvalue()

    campaign = Campaign.objects.get(slug="demo")
    simulated = Judgment.objects.filter(pair__campaign=campaign, source=Judgment.SIMULATED)
    usable = simulated.filter(choice__in=[Judgment.A, Judgment.B]).count()
    assert usable == 80 and not Judgment.objects.filter(pair__campaign=campaign).exclude(
        source=Judgment.SIMULATED).exists()
    # overlap 1: every judged pair is closed, so people are never offered it
    assert not Pair.objects.filter(campaign=campaign, judgments__isnull=False, is_open=True).exists()
    open_pairs = Pair.objects.filter(campaign=campaign, is_open=True).count()
    assert open_pairs > 0
    assert (f"judged {simulated.count():,} pairs, marked simulated: 80 usable judgments in the campaign; "
            f"{open_pairs:,} pairs wait for people.") in printed
    assert "Enough to launch a training round now." in printed

    # Plain progress lines, not a bar: the sampling and the judging, with the time left.
    assert re.search(r"^seed_demo: sample [\d,]+ / [\d,]+ \(\d+%\), .* so far, about .* left$", printed, re.M)
    assert re.search(r"^seed_demo: simulated judgments 80 / 80 \(100%\), .* so far$", printed, re.M)
    assert "\r" not in printed

    # A labeler is offered an open pair, never one the simulated labeler judged.
    claim = claim_next_pair(campaign, campaign.members.get(username="labeler1"))
    assert claim.assignment.pair.judgments_count == 0
    # The export says which judgments are simulated; the campaign page shows the bot's source.
    assert {row["source"] for row in raw_rows(campaign)} == {Judgment.SIMULATED}
    admin = campaign.members.get(username="admin")
    admin.set_password(PASSWORD)
    admin.save()
    assert client.login(username="admin", password=PASSWORD)
    page = client.get(campaign.get_absolute_url()).content.decode()
    assert re.search(r"<td>sim-correct_sentence-1</td><td>simulated</td><td>\d+</td>", page)

    # Two questions: helpful, and respectful, which the simulated labeler answers by the curt openers alone.
    assert [axis.key for axis in campaign.axes()] == ["helpful", "respectful"]
    respectful = {(row["response_a"], row["response_b"]): row["axes"][1]["choice"] for row in raw_rows(campaign)}
    curt_one_side = {sides: choice for sides, choice in respectful.items()
                     if demo_tasks.is_curt(sides[0]) != demo_tasks.is_curt(sides[1])}
    assert respectful and curt_one_side
    polite_wins = sum(choice == ("b" if demo_tasks.is_curt(a) else "a") for (a, b), choice in curt_one_side.items())
    assert polite_wins >= 0.6 * len(curt_one_side)  # 25% label noise
    assert all(choice == "tie" for (a, b), choice in respectful.items()
               if demo_tasks.is_curt(a) == demo_tasks.is_curt(b))

    with django_capture_on_commit_callbacks(execute=True):
        config = actions.launch_config(campaign, "tiny")
        round_ = actions.launch_round(campaign, admin, config)
    assert round_.number == 1 and len(chains) == 1 and len(chains[0]) == round_.jobs.count()
    assert (config.safety_axis, config.reward_combination, config.safety_weight) == ("respectful", "weighted", 0.3)


def test_it_prints_a_progress_line_every_few_seconds_and_percent_with_the_time_left():
    out, now = io.StringIO(), [0.0]
    progress = LineProgress("demo-policy (demo)", out, every_seconds=15, every_fraction=0.1,
                            clock=lambda: now[0])
    progress({"stage": "demo_policy", "step": 0, "total": 1, "log": "building the demo policy once"})
    for step in range(0, 3001, 10):  # 3,000 steps at 5 a second: 10 minutes
        now[0] = step / 5
        progress({"stage": "sft", "step": step, "total": 3000, "metrics": {"sft/loss": 1.25}})
    lines = out.getvalue().splitlines()
    assert lines[0] == "demo-policy (demo): building the demo policy once"
    assert lines[1] == ("demo-policy (demo): sft 80 / 3,000 (3%), 16 s so far, about 9 min 44 s left; "
                        "loss 1.25")
    assert lines[-1] == "demo-policy (demo): sft 3,000 / 3,000 (100%), 10 min 00 s so far; loss 1.25"
    # every 15 s (40 lines in 10 minutes), the 10% marks falling among them
    assert 38 <= len(lines) - 1 <= 42
    assert "sft 300 / 3,000 (10%), 1 min 00 s so far, about 9 min 00 s left; loss 1.25" in out.getvalue()


def test_it_prints_lines_instead_of_a_bar_when_the_engine_cli_s_stderr_is_not_a_terminal(capsys):
    from training.engine.common import TqdmProgress

    progress = TqdmProgress("sample")
    for step in range(0, 101, 10):
        progress({"stage": "sample", "step": step, "total": 100})
    progress.close()
    err = capsys.readouterr().err
    assert "sample: sample 10 / 100 (10%)" in err and "sample: sample 100 / 100 (100%)" in err
    assert "\r" not in err and "it/s" not in err
