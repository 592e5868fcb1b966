"""Rounds end to end with a real Celery worker and Redis, tiny settings: a campaign of demo prompts
whose responses the tiny demo policy wrote, labeled by a simulated labeler; a round trains a reward
model and PPO and puts the new policy's pairs in the queue; the next round starts from its policy.
And the fault: the worker is SIGKILLed during PPO, the job is marked failed, Resume finishes it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch
from django.core.management import call_command
from django.test import Client
from safetensors.torch import load_file

from annotate.actions import EvalInput, PairInput, add_eval_set, add_pairs, claim_next_pair, save_axis
from annotate.models import Axis, Campaign, Pair, Response
from demo import demo_tasks
from demo.simulate import make_judge, simulate_labelers
from tests.conftest import make_user
from tests.worker import Worker
from training import actions
from training.config import build_config
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.sample import sample_responses
from training.models import Job, Round
from training.starting_policy import default_policy

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 5


@pytest.fixture
def tiny_world(settings, tmp_path_factory):
    """Small minimum and quick staleness here and in the worker; a tiny reward backbone."""
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MIN_JUDGMENTS": 10, "HEARTBEAT_STALE_SECONDS": STALE_SECONDS}
    return {"env": {"PAIRLOOP_HEARTBEAT_STALE_SECONDS": str(STALE_SECONDS)},
            "reward_model": str(tiny_reward_backbone(tmp_path_factory.mktemp("rm") / "backbone"))}


def tiny_reward_backbone(path: Path) -> Path:
    """A 1-layer BERT with the packaged MiniLM tokenizer (untrained: the round trains it)."""
    from transformers import BertConfig, BertForSequenceClassification

    from training.engine.common import default_reward_backbone, load_tokenizer

    tokenizer = load_tokenizer(default_reward_backbone())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def seed_campaign(slug: str, n_prompts: int = 24, respectful: bool = False) -> Campaign:
    """Demo prompts, responses sampled from the tiny demo policy, labeled by a noisy rule labeler; with respectful,
    a second axis "respectful" that the respectful rule judge answers."""
    policy = default_policy("tiny")  # builds the tiny demo policy once (cached under MODELS_DIR)
    campaign = Campaign.objects.create(slug=slug, name=slug, overlap=1, **({"axis_key": "helpful"} if respectful else {}))
    if respectful:
        save_axis(Axis(campaign=campaign, key="respectful", question="Which answer is more respectful?", position=1))
    prompts = demo_tasks.make_prompts(n_prompts, seed=0, split="train")
    samples = sample_responses(policy, prompts, num_per_prompt=3, max_new_tokens=24, temperature=1.0, seed=0,
                               device="cpu")
    items = []
    for prompt, responses in zip(prompts, samples):
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        items += [PairInput(prompt, a, b) for a, b in zip(distinct, distinct[1:])]
    add_pairs(campaign, items, source=Response.SEED, checkpoints=(policy, policy), notify=False)
    axis_judges = {"respectful": make_judge("rule:respectful")} if respectful else None
    result = simulate_labelers(campaign, make_judge("rule:correct_sentence"), noise=0.25, count=1000,
                               axis_judges=axis_judges)
    assert actions.usable_judgments(campaign) >= 10, result
    return campaign


def wait_for(predicate, timeout: float, worker: Worker, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n--- worker log ---\n{worker.log()[-6000:]}")


def round_over(round_: Round):
    jobs = list(Job.objects.filter(round=round_).order_by("order"))
    if any(job.status in (Job.FAILED, Job.CANCELLED) for job in jobs):
        failed = next(job for job in jobs if job.status in (Job.FAILED, Job.CANCELLED))
        raise AssertionError(f"{failed.kind} job {failed.status}: {failed.error}\n{failed.log}")
    return jobs if all(job.status == Job.SUCCEEDED for job in jobs) else None


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def test_it_runs_two_rounds_end_to_end_and_the_new_pairs_reach_the_queue(tiny_world):
    campaign = seed_campaign("loop")
    held_out = demo_tasks.make_prompts(4, seed=0, split="heldout")
    add_eval_set(campaign, "held out", [EvalInput(i + 1, prompt) for i, prompt in enumerate(held_out)])
    pairs_before = campaign.pairs.count()
    config = build_config("tiny", {"reward_model": tiny_world["reward_model"]})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        first = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(first), 600, worker, "round 1 to finish")
        first.refresh_from_db()

        assert [job.kind for job in jobs] == ["export", "reward", "ppo", "sample", "enqueue", "evaluate"]
        assert all(job.celery_task_id and job.attempts == 1 for job in jobs)
        # The evaluation: round 1 against the SFT policy on the 4 held-out prompts, by the rule judge and the
        # round's reward model.
        evaluation = jobs[5].result
        assert evaluation["judges"] == ["rule:correct_sentence", "reward model (round 1)"]
        assert [(row["a"], row["b"], row["prompts"]) for row in evaluation["comparisons"]] == [("new", "sft", 4)] * 2
        assert [answer["prompt"] for answer in evaluation["answers"]] == held_out
        assert Path(first.dataset_path).name.startswith("round-1-") and first.data_version in first.dataset_path
        reward_meta = read_checkpoint_meta(first.reward_checkpoint)
        assert reward_meta["stage"] == "reward" and 0.0 <= jobs[1].result["rm/accuracy"] <= 1.0
        # A new policy checkpoint whose weights moved away from the SFT policy it started from.
        assert read_checkpoint_meta(first.policy_checkpoint)["stage"] == "ppo"
        assert first.policy_checkpoint == str(actions.round_dir(first) / "ppo-1" / "policy")
        start, trained = weights(first.parent_policy), weights(first.policy_checkpoint)
        assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)
        # Progress and metric points were written to the rows as the jobs ran.
        ppo = jobs[2]
        assert ppo.step == ppo.total_steps == config.ppo_steps
        assert [p["step"] for p in ppo.metrics] == list(range(1, config.ppo_steps + 1))
        assert all("ppo/kl" in p for p in ppo.metrics) and "Done." in ppo.log
        # New pairs, tagged with the round, in the queue ahead of the older ones.
        created = jobs[4].result["created"]
        assert created > 0 and campaign.pairs.count() == pairs_before + created
        new_pairs = campaign.pairs.filter(round=first)
        assert new_pairs.count() == created and all(p.is_open and p.priority == config.priority for p in new_pairs)
        new_texts = {t for s in jobs[3].result["samples"] for t in s["new"]}
        stored = [(p.response_a.text in new_texts, p.response_b.text in new_texts)
                  for p in new_pairs.select_related("response_a", "response_b")]
        assert all(a or b for a, b in stored)  # the new policy's answer on one side, response A of about half
        assert 0 < sum(a for a, _ in stored) < len(stored) or len(stored) == 1, stored
        claim = claim_next_pair(campaign, make_user("lab"))
        assert Pair.objects.get(pk=claim.assignment.pair_id).round_id == first.pk

        # Round two from the command line, followed to its end with --wait; its reward model starts from
        # the SFT policy (reward_model=sft, the demo preset's default). Nothing was labeled since round one,
        # so it is forced.
        out = io.StringIO()
        call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "reward_model=sft",
                     "--force", "--wait", "--poll", "0.5", stdout=out)
        assert "Round 2 done" in out.getvalue(), worker.log()[-4000:]
    second = Round.objects.get(campaign=campaign, number=2)
    assert second.parent_policy == first.policy_checkpoint
    assert round_over(second)
    ppo_args = read_checkpoint_meta(second.policy_checkpoint)["args"]
    assert ppo_args["policy"] == first.policy_checkpoint
    assert ppo_args["ref_policy"] == first.config["base_policy"]  # the KL penalty is to SFT in every round
    reward_meta = read_checkpoint_meta(second.reward_checkpoint)
    assert reward_meta["args"]["model"] == first.config["base_policy"]
    assert second.policy_checkpoint != first.policy_checkpoint
    assert campaign.pairs.filter(round=second).exists()


def test_it_marks_a_job_failed_when_its_worker_is_killed_and_resume_finishes_it(tiny_world):
    campaign = seed_campaign("fault", n_prompts=16)
    config = build_config("tiny", {"reward_model": tiny_world["reward_model"], "ppo_steps": "40",
                                   "ppo_save_every": "1"})
    worker = Worker(env=tiny_world["env"], purge=True).start()
    try:
        round_ = actions.launch_round(campaign, None, config)
        ppo = round_.jobs.get(kind=Job.PPO)
        wait_for(lambda: Job.objects.filter(pk=ppo.pk, status=Job.RUNNING, step__gte=3).exists(), 600, worker,
                 "PPO to reach step 3", poll=0.1)
        worker.kill()
    finally:
        worker.stop()
    killed_at = Job.objects.get(pk=ppo.pk).step
    assert killed_at < config.ppo_steps

    # Its heartbeat goes stale; beat marks it failed with a clear reason.
    failed = wait_for(lambda: actions.fail_stale_jobs(), 3 * STALE_SECONDS, worker, "the job to go stale", poll=1)
    assert [job.pk for job in failed] == [ppo.pk]
    ppo.refresh_from_db()
    assert ppo.status == Job.FAILED and "no heartbeat" in ppo.error and "killed" in ppo.error
    assert round_.status() == Job.FAILED
    resume_dir = actions.round_dir(round_) / "ppo-1" / "policy.resume"
    saved_step = read_checkpoint_meta(resume_dir)["step"]
    assert saved_step >= 2

    with Worker(env=tiny_world["env"]) as fresh:
        actions.resume_job(ppo)
        jobs = wait_for(lambda: round_over(round_), 600, fresh, "the resumed round to finish")
    ppo = jobs[2]
    assert ppo.attempts == 2 and ppo.step == config.ppo_steps and ppo.error == ""
    # The second attempt continued from the first one's checkpoint, not from step 0, writing into its own
    # directory.
    assert f"resuming from {resume_dir} at step {saved_step}" in ppo.log
    assert ppo.start_step == saved_step > 0
    round_.refresh_from_db()
    second_attempt = actions.round_dir(round_) / "ppo-2" / "policy"
    assert round_.policy_checkpoint == ppo.checkpoint_path == str(second_attempt)
    # The points tell one story: every step once, in order, the resumed run's from its checkpoint on.
    assert [p["step"] for p in ppo.metrics] == list(range(1, config.ppo_steps + 1))
    assert jobs[4].result["created"] > 0 and campaign.pairs.filter(round=round_).exists()
    assert not resume_dir.parent.exists()  # the earlier attempt's directory goes once the job succeeded


def round_page(user, round_: Round) -> str:
    client = Client()
    client.force_login(user)
    return client.get(round_.get_absolute_url()).content.decode()


def chart_keys(job: Job) -> set[str]:
    return {key for point in job.chart_points() for key in point if key != "step"}


def test_a_dpo_round_trains_on_the_pairs_without_a_reward_model_and_the_next_starts_from_its_policy(tiny_world,
                                                                                                  reviewer):
    campaign = seed_campaign("dpo-loop", n_prompts=16)
    pairs_before = campaign.pairs.count()
    config = build_config("tiny", {"algorithm": "dpo"})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        first = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(first), 300, worker, "the DPO round to finish")
        first.refresh_from_db()

        assert [job.kind for job in jobs] == ["export", "dpo", "sample", "enqueue", "evaluate"]
        assert first.reward_checkpoint == ""  # no reward model in a DPO round
        meta = read_checkpoint_meta(first.policy_checkpoint)
        assert meta["stage"] == "dpo" and meta["args"]["train"] == first.dataset_path
        assert meta["args"]["policy"] == first.parent_policy == first.config["base_policy"]
        start, trained = weights(first.parent_policy), weights(first.policy_checkpoint)
        assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)
        dpo = jobs[1]
        assert {"dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/rewards_chosen", "dpo/rewards_rejected"} <= chart_keys(dpo)
        assert dpo.step == dpo.total_steps > 0 and "Done." in dpo.log
        sample = jobs[2]
        assert sample.result["scored"] is False and sample.result["scores"] == {}
        assert "sample/judge_new" in sample.result  # the demo rule judge still measures it
        created = jobs[3].result["created"]
        assert created > 0 and campaign.pairs.count() == pairs_before + created

        page = round_page(reviewer, first)
        assert '<strong id="round-algorithm">DPO</strong>' in page
        assert "no reward model in a DPO round" in page and "dpo/margin" in page

        # Iterative DPO: the next round starts from this one's policy, trains on every round's pairs, and its
        # reference is the previous policy when asked (the command's path, followed with --wait).
        simulate_labelers(campaign, make_judge("rule:correct_sentence"), noise=0.25, count=1000)
        out = io.StringIO()
        call_command("launch_round", campaign.slug, "--preset", "tiny", "--set", "algorithm=dpo",
                     "--set", "dpo_reference=previous", "--wait", "--poll", "0.5", stdout=out)
        assert "Round 2 done" in out.getvalue(), worker.log()[-4000:]
    second = Round.objects.get(campaign=campaign, number=2)
    assert second.parent_policy == first.policy_checkpoint
    args = read_checkpoint_meta(second.policy_checkpoint)["args"]
    assert args["policy"] == first.policy_checkpoint and args["ref_policy"] is None
    trained_on = second.jobs.get(kind=Job.EXPORT).result["rows"]
    assert trained_on > first.jobs.get(kind=Job.EXPORT).result["rows"]  # round one's pairs, judged, included


def test_an_online_dpo_round_trains_a_reward_model_that_labels_fresh_pairs_of_its_policy(tiny_world):
    campaign = seed_campaign("dpo-online", n_prompts=16)
    config = build_config("tiny", {"algorithm": "dpo", "dpo_online": True, "reward_model": tiny_world["reward_model"]})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 300, worker, "the online DPO round to finish")
    round_.refresh_from_db()
    assert [job.kind for job in jobs] == ["export", "reward", "dpo", "sample", "enqueue", "evaluate"]
    args = read_checkpoint_meta(round_.policy_checkpoint)["args"]
    assert args["reward_models"] == [round_.reward_checkpoint] and args["online_samples"] == config.dpo_online_samples
    dpo = jobs[2]
    assert {"dpo/online_margin", "dpo/online_score_gap"} <= chart_keys(dpo)
    counts = [point["dpo/online_pairs"] for point in dpo.metrics if "dpo/online_pairs" in point]  # as it changed
    assert counts and min(counts) > 0 and dpo.result["dpo/online_pairs"] > 0  # fresh pairs at every step
    assert jobs[3].result["scored"] is True and jobs[4].result["created"] > 0


def test_a_grpo_round_trains_against_its_reward_model_and_fills_the_queue(tiny_world, reviewer):
    campaign = seed_campaign("grpo-loop", n_prompts=16)
    config = build_config("tiny", {"algorithm": "grpo", "reward_model": tiny_world["reward_model"]})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 300, worker, "the GRPO round to finish")
    round_.refresh_from_db()
    assert [job.kind for job in jobs] == ["export", "reward", "grpo", "sample", "enqueue", "evaluate"]
    meta = read_checkpoint_meta(round_.policy_checkpoint)
    assert meta["stage"] == "grpo" and meta["args"]["reward_models"] == [round_.reward_checkpoint]
    assert meta["args"]["ref_policy"] == round_.config["base_policy"]
    grpo = jobs[2]
    assert [p["step"] for p in grpo.metrics] == list(range(1, config.grpo_steps + 1))
    assert {"grpo/reward", "grpo/kl", "grpo/loss", "grpo/entropy"} <= chart_keys(grpo)
    assert jobs[3].result["scored"] is True and jobs[3].result["scores"]
    assert jobs[4].result["created"] > 0 and campaign.pairs.filter(round=round_).exists()
    page = round_page(reviewer, round_)
    assert '<strong id="round-algorithm">GRPO</strong>' in page and "grpo/loss" in page
    assert "no reward model" not in page and "mean reward-model score" in page


@pytest.mark.parametrize(("algorithm", "chosen", "steps", "resumed"), [
    ("dpo", {"dpo_batch_size": "2", "dpo_epochs": "3"}, None, "resumed from"),  # steps: from the pairs
    ("grpo", {"grpo_steps": "12"}, 12, "resuming from"),
])
def test_a_cancelled_policy_job_resumes_from_its_checkpoint_and_finishes_the_round(tiny_world, algorithm, chosen,
                                                                                   steps, resumed):
    """A DPO or GRPO job cancelled after step 3 resumes from the checkpoint it saved, every step's point once."""
    campaign = seed_campaign(f"{algorithm}-cancel", n_prompts=16)
    config = build_config("tiny", {"algorithm": algorithm, "reward_model": tiny_world["reward_model"], **chosen})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        job = round_.jobs.get(kind=algorithm)
        wait_for(lambda: Job.objects.filter(pk=job.pk, status=Job.RUNNING, step__gte=3).exists(), 300, worker,
                 f"{algorithm} to reach step 3", poll=0.1)
        actions.cancel_job(job)
        wait_for(lambda: Job.objects.filter(pk=job.pk, status=Job.CANCELLED).exists(), 60, worker,
                 f"the {algorithm} job to stop")
        job.refresh_from_db()
        resume_dir = actions.round_dir(round_) / f"{algorithm}-1" / "policy.resume"
        saved_step = read_checkpoint_meta(resume_dir)["step"]
        assert 3 <= saved_step == job.step < job.total_steps
        assert round_.status() == Job.CANCELLED

        actions.resume_job(job)
        jobs = {done.kind: done for done in wait_for(lambda: round_over(round_), 300, worker,
                                                     f"the resumed {algorithm} round to finish")}
    job = jobs[algorithm]
    assert job.attempts == 2 and job.step == job.total_steps and steps in (None, job.total_steps) and job.error == ""
    assert f"{resumed} {resume_dir} at step {saved_step}" in job.log and job.start_step == saved_step
    assert [p["step"] for p in job.metrics] == list(range(1, job.total_steps + 1))
    round_.refresh_from_db()
    assert round_.policy_checkpoint == str(actions.round_dir(round_) / f"{algorithm}-2" / "policy")
    assert jobs[Job.ENQUEUE].result["created"] > 0 and not resume_dir.parent.exists()


def test_a_ppo_round_gated_on_a_safety_classifier_records_both_rewards_curves(tiny_world, reviewer, tmp_path):
    from demo.tiny_models import build_reward

    classifier = build_reward("bert", tmp_path / "safety", labels=2)
    campaign = seed_campaign("safety-loop", n_prompts=16)
    config = build_config("tiny", {"reward_model": tiny_world["reward_model"], "safety_classifier": str(classifier),
                                   "safety_classifier_label": "1", "reward_combination": "gated",
                                   "safety_threshold": "0.5"})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 300, worker, "the gated PPO round to finish")
    round_.refresh_from_db()
    args = read_checkpoint_meta(round_.policy_checkpoint)["args"]
    assert args["reward_models"] == [round_.reward_checkpoint, f"classifier:1:{classifier}"]
    assert args["reward_roles"] == ["quality", "safety"] and args["reward_combination"] == "gated"
    ppo = jobs[2]
    curves = ("ppo/reward/quality", "ppo/reward/safety_classifier", "ppo/reward/gated")
    assert set(curves) <= chart_keys(ppo)
    safe = [p["ppo/reward/safety_classifier"] for p in ppo.metrics if "ppo/reward/safety_classifier" in p]
    assert len(safe) == config.ppo_steps and all(0 < p < 1 for p in safe)  # the mean P(safe), every step
    page = round_page(reviewer, round_)
    assert all(curve in page for curve in curves)


@pytest.mark.parametrize("combination", ["weighted", "gated"])
def test_a_ppo_round_on_two_axes_trains_a_reward_model_per_axis_and_optimises_their_combination(
        tiny_world, reviewer, combination):
    campaign = seed_campaign(f"axes-{combination}", n_prompts=16, respectful=True)
    config = build_config("tiny", {"reward_model": tiny_world["reward_model"], "safety_axis": "respectful",
                                   "reward_combination": combination, "safety_threshold": "0.5"})
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 400, worker, f"the {combination} two-axis round to finish")
    round_.refresh_from_db()
    export, reward, ppo = jobs[:3]
    assert [axis["axis"] for axis in export.result["axes"]] == ["helpful", "respectful"]
    checkpoints = dict(reward.result["axes"])
    assert checkpoints["helpful"] == round_.reward_checkpoint != checkpoints["respectful"]
    assert all(Path(path, "config.json").is_file() for path in checkpoints.values())
    args = read_checkpoint_meta(round_.policy_checkpoint)["args"]
    assert args["reward_models"] == [checkpoints["helpful"], checkpoints["respectful"]]
    assert args["reward_roles"] == ["quality", "safety"] and args["reward_combination"] == combination
    curves = {"ppo/reward/axis_helpful", "ppo/reward/axis_respectful"} | ({"ppo/reward/gated"} if combination == "gated"
                                                                           else set())
    assert curves <= chart_keys(ppo)
    sample = jobs[3].result
    assert set(sample["axis_scores"]) == {"helpful", "respectful"} and sample["scores"] == sample["axis_scores"]["helpful"]
    page = round_page(reviewer, round_)
    assert all(curve in page for curve in curves)
    assert 'title="reward model of the axis respectful"' in page and 'title="reward model of the axis helpful"' in page
