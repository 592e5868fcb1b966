"""Simulated labelers: bots judge pairs through the labeling doors, by a demo rule judge or a reward
model, with label noise, marked simulated so human statistics leave them out."""

from __future__ import annotations

import io
import random

import pytest
from django.core.management import CommandError, call_command

from annotate.actions import PairInput, add_pairs
from annotate.models import Assignment, Judgment
from demo import demo_tasks
from demo.simulate import make_judge, simulate_labelers
from tests.conftest import make_campaign

pytestmark = pytest.mark.django_db


def demo_campaign(n=30, **options):
    """Demo prompts, each with a right answer in the preferred style against a wrong or curt one."""
    rng = random.Random(0)
    campaign = make_campaign(slug="demo-sim", **options)
    items = []
    for task in demo_tasks.make_tasks(n, seed=1, split="train"):
        good = demo_tasks.respond(task, demo_tasks.PREFERRED_STYLE, rng)
        bad = demo_tasks.respond(task, "curt", rng) if rng.random() < 0.5 else "I do not know."
        items.append(PairInput(task.instruction, *((good, bad) if rng.random() < 0.5 else (bad, good))))
    add_pairs(campaign, items, notify=False)
    return campaign


def preferred_by_rule(judgment: Judgment) -> bool:
    chosen, rejected = judgment.chosen_rejected()
    prompt = judgment.pair.prompt.text
    return demo_tasks.judge_score(prompt, chosen.text) > demo_tasks.judge_score(prompt, rejected.text)


def test_it_judges_like_the_rule_without_noise_and_against_it_with_full_noise():
    campaign = demo_campaign()
    judge = make_judge("rule:correct_sentence")
    result = simulate_labelers(campaign, judge, noise=0.0, count=12)
    assert result.judgments == 12 and result.flipped == 0
    judgments = list(Judgment.objects.select_related("pair__prompt", "pair__response_a", "pair__response_b"))
    assert len(judgments) == 12
    assert all(j.source == Judgment.SIMULATED and j.labeler.username == "sim-correct_sentence-1" for j in judgments)
    assert all(preferred_by_rule(j) for j in judgments)
    # Each went through the labeling queue: a lease per judgment, strength from the score gap.
    assert Assignment.objects.filter(completed_at__isnull=False).count() == 12
    assert all(1 <= j.strength <= 4 for j in judgments)

    flipped = simulate_labelers(campaign, make_judge("rule:correct_sentence"), noise=1.0, count=10, seed=3)
    assert flipped.flipped == 10
    later = Judgment.objects.exclude(pk__in=[j.pk for j in judgments]).select_related(
        "pair__prompt", "pair__response_a", "pair__response_b")
    assert later.count() == 10 and not any(preferred_by_rule(j) for j in later)


def test_it_shares_the_work_among_bots_and_stops_when_the_queue_is_empty():
    campaign = demo_campaign(n=10, overlap=2)
    result = simulate_labelers(campaign, make_judge("rule:correct"), noise=0.25, count=1000, labelers=3)
    # Ten pairs wanted twice each: 20 judgments, never two by one bot on one pair.
    assert result.judgments == 20 and result.stopped == "empty"
    per_bot = {name: Judgment.objects.filter(labeler__username=name).count()
               for name in ("sim-correct-1", "sim-correct-2", "sim-correct-3")}
    assert sum(per_bot.values()) == 20 and min(per_bot.values()) > 0


def test_it_judges_by_a_reward_model(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from training.engine.common import default_reward_backbone, load_tokenizer

    tokenizer = load_tokenizer(default_reward_backbone())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, num_labels=1))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = make_judge(f"rm:{tmp_path / 'rm'}", device="cpu")
    campaign = demo_campaign(n=6)
    result = simulate_labelers(campaign, judge, noise=0.0, count=6)
    assert result.judgments == 6
    for judgment in Judgment.objects.select_related("pair__prompt", "pair__response_a", "pair__response_b"):
        chosen, rejected = judgment.chosen_rejected()
        scores = judge.score([judgment.pair.prompt.text] * 2, [chosen.text, rejected.text])
        assert scores[0] > scores[1]


def test_it_says_which_style_the_rule_prefers_and_refuses_unknown_judges():
    campaign = demo_campaign(n=8)
    out = io.StringIO()
    call_command("simulate_labelers", campaign.slug, "--judge", "rule:correct_sentence", "--noise", "0.25",
                 "--count", "5", stdout=out)
    text = out.getvalue()
    assert "'sentence' style" in text and "Recorded 5 simulated judgments" in text
    assert Judgment.objects.filter(source=Judgment.SIMULATED).count() == 5
    with pytest.raises(CommandError, match="unknown rule judge 'nonsense'"):
        call_command("simulate_labelers", campaign.slug, "--judge", "rule:nonsense", "--count", "1")
    with pytest.raises(CommandError, match="rule:NAME or rm:PATH"):
        call_command("simulate_labelers", campaign.slug, "--judge", "coin", "--count", "1")
    with pytest.raises(CommandError, match="noise is a probability"):
        call_command("simulate_labelers", campaign.slug, "--noise", "1.5", "--count", "1")
