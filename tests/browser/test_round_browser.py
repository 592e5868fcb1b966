"""What an admin sees in a real browser when launching a round: the launch form on the campaign's
rounds page, then the round page, live over its WebSocket with no reload, while a real Celery worker
runs the round's jobs on the test database (tiny demo policy, tiny reward backbone, tiny preset):
progress bars move, the PPO charts gain points, and every job ends succeeded."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from tests.browser.conftest import off_the_loop
from tests.browser.test_labeling_browser import log_in
from tests.test_round_worker import round_over, seed_campaign, tiny_reward_backbone
from tests.worker import Worker
from training import actions
from training.models import Job, Round

pytestmark = [pytest.mark.browser, pytest.mark.worker, pytest.mark.slow,
              pytest.mark.django_db(transaction=True)]

MARKER = "window.__marker"
PPO_STEPS = 6  # a few more than the tiny preset's 3, so the page is seen between PPO steps

# Every job on the page as the browser shows it: status text, the bar's value, the chart points the
# container counts and the points plotly actually drew (first trace of each chart).
SNAPSHOT = """() => ({
  marker: window.__marker || null,
  round: (document.getElementById('round-status') || {}).textContent || null,
  jobs: Array.from(document.querySelectorAll('article.job')).map(article => {
    const id = article.dataset.job;
    const bar = document.getElementById(`job-${id}-progress`);
    const charts = document.getElementById(`job-${id}-charts`);
    const plotted = Array.from(charts.querySelectorAll('.chart-small'))
      .map(div => (div.data && div.data[0] && div.data[0].x) ? div.data[0].x.length : 0);
    return {
      id: Number(id), kind: article.dataset.kind,
      status: document.getElementById(`job-${id}-status`).textContent.trim(),
      progress: bar ? Number(bar.getAttribute('aria-valuenow')) : null,
      points: Number(charts.dataset.points),
      plotted: plotted.length ? Math.max(...plotted) : 0,
    };
  }),
})"""


def test_it_launches_a_round_and_shows_progress_and_charts_grow_without_reloading(
        page, admin_user, tmp_path_factory):
    backbone = tiny_reward_backbone(tmp_path_factory.mktemp("rm") / "backbone")
    # Enough simulated judgments for the server's minimum (PAIRLOOP_MIN_JUDGMENTS, 50 by default).
    campaign = off_the_loop(seed_campaign, "live-round", n_prompts=48)
    assert off_the_loop(actions.usable_judgments, campaign) >= 50

    env = {"PAIRLOOP_REWARD_MODEL": str(backbone)}
    with Worker(env=env, purge=True) as worker:
        log_in(page, admin_user)
        page.goto(reverse("campaign_rounds", args=[campaign.slug]) + "?preset=tiny")
        page.select_option("#id_preset", "tiny")
        page.fill("#id_ppo_steps", str(PPO_STEPS))
        page.click("#launch-round")
        page.wait_for_url("**/rounds/*/", timeout=30_000)
        round_ = Round.objects.get(campaign=campaign)
        assert page.url.endswith(round_.get_absolute_url())
        assert round_.config["preset"] == "tiny" and round_.config["ppo_steps"] == PPO_STEPS
        page.wait_for_selector("#round-live")
        page.evaluate(f"{MARKER} = 'no reload since'")

        snapshots = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            snapshot = page.evaluate(SNAPSHOT)
            snapshots.append(snapshot)
            assert snapshot["marker"] == "no reload since", "the round page reloaded"
            if snapshot["round"] in ("failed", "cancelled"):
                break
            if snapshot["round"] == "succeeded" and all(j["status"] == "succeeded" for j in snapshot["jobs"]):
                break
            page.wait_for_timeout(200)
        last = snapshots[-1]
        assert last["round"] == "succeeded", (
            f"round page shows {last}\njs errors {page.js_errors}\n"
            f"jobs {off_the_loop(lambda: [(j.kind, j.status, j.error) for j in round_.jobs.all()])}\n"
            f"--- worker log ---\n{worker.log()[-6000:]}")

    jobs = off_the_loop(round_over, round_)  # raises with the failing job's error
    assert [job.kind for job in jobs] == ["export", "reward", "ppo", "sample", "enqueue", "evaluate"]
    assert [j["status"] for j in last["jobs"]] == ["succeeded"] * 6
    assert all(j["progress"] == 100 for j in last["jobs"])
    assert page.js_errors == []

    def moved(job_id: int, key: str, least: int) -> tuple[int, int] | None:
        """Two moments, one after the other, at which the value rose (the first at least `least`)
        while the job had not finished yet at the first."""
        seen = [(s["jobs"][i][key], s["jobs"][i]["status"]) for s in snapshots
                for i, j in enumerate(s["jobs"]) if j["id"] == job_id]
        for n, (earlier, status) in enumerate(seen):
            if earlier >= least and status == "running":
                later = next((v for v, _ in seen[n + 1:] if v > earlier), None)
                if later is not None:
                    return earlier, later
        return None

    # A progress bar moved part way and then further, on the page as loaded.
    bars = {job.kind: moved(job.pk, "progress", 1) for job in jobs}
    sampled = snapshots[:: max(1, len(snapshots) // 20)]
    assert any(b for b in bars.values()), f"no bar seen moving mid-job: {bars}\n{sampled}"
    earlier, later = next(b for b in bars.values() if b)
    assert 0 < earlier < later <= 100

    # The PPO charts gained points while PPO ran, and ended with one point per step.
    ppo = next(job for job in jobs if job.kind == Job.PPO)
    grew = moved(ppo.pk, "plotted", 1)
    assert grew, f"no PPO chart seen growing: {[s['jobs'][2] for s in snapshots]}"
    final = next(j for j in last["jobs"] if j["id"] == ppo.pk)
    assert final["plotted"] == final["points"] == PPO_STEPS == len(ppo.metrics)


VISIBLE_SECTIONS = """() => Array.from(document.querySelectorAll('#launch-form fieldset'))
  .filter(section => section.offsetParent !== null).map(section => section.querySelector('legend').textContent)"""


def test_the_launch_form_shows_only_the_sections_of_the_algorithm_chosen(page, admin_user):
    from annotate.models import Campaign

    campaign = off_the_loop(Campaign.objects.create, slug="round-types", name="Round types")
    log_in(page, admin_user)
    page.goto(reverse("campaign_rounds", args=[campaign.slug]))
    common = ["Sampling", "New pairs", "Evaluation", "Memory"]
    assert page.evaluate(VISIBLE_SECTIONS) == ["Round type", "Models and prompting", "Reward model", "Safety", "PPO",
                                               *common]
    page.select_option("#id_algorithm", "dpo")  # CSS alone hides what does not apply: no request, no script
    assert page.evaluate(VISIBLE_SECTIONS) == ["Round type", "Models and prompting", "DPO", *common]
    assert not page.is_visible("#id_reward_model") and page.is_visible("#id_reference")
    page.check("#id_dpo_online")  # online DPO trains a reward model: its section shows, Safety's does not
    assert page.evaluate(VISIBLE_SECTIONS) == ["Round type", "Models and prompting", "Reward model", "DPO", *common]
    assert page.is_visible("#id_reward_epochs") and not page.is_visible("#id_safety_classifier")
    page.uncheck("#id_dpo_online")
    assert not page.is_visible("#id_reward_epochs")
    page.select_option("#id_algorithm", "grpo")
    assert page.evaluate(VISIBLE_SECTIONS) == ["Round type", "Models and prompting", "Reward model", "Safety", "GRPO",
                                               *common]
    assert page.is_visible("#id_reward_model") and page.is_visible("#id_grpo_samples_per_prompt")
