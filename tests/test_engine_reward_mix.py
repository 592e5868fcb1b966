"""Several reward sources combined: the weighted formula, the Llama 2 gate, each source whitened first, a ready
safety classifier's P(safe), per-source curves in PPO's metrics, and clear errors before any step.
Tiny random models built by demo/tiny_models.py; CPU, seconds each; no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training.engine.common import EngineError
from training.engine.reward import (
    GATED_SHARE,
    CombinedReward,
    SafetyClassifier,
    check_reward_sources,
    combine,
)
from training.engine.sources import GATED, WEIGHTED, RewardMixArgs

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Name a colour.", "What is 2 + 3?", "Say hello.", "Name a city.", "Count to three.", "Name a fruit."]
RESPONSES = ["Red.", "The answer is 5.", "hello hello hello", "Paris", "one two three four five", "An apple a day"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    """A tiny random two-label BERT classifier: label 1 stands for 'safe'."""
    from demo.tiny_models import build_reward

    return str(build_reward("bert", tmp_path_factory.mktemp("classifier"), labels=2))


def length_quality(prompts: list[str], responses: list[str]) -> list[float]:
    """A quality reward that differs between responses: their length in characters."""
    return [float(len(r)) for r in responses]


def whitened(values: torch.Tensor) -> torch.Tensor:
    """A first batch's scores over its own mean and (population) std, as the running moments start."""
    return (values - values.mean()) / (values.var(unbiased=False).sqrt() + 1e-8)


def p_safe(classifier: str, label: int = 1) -> torch.Tensor:
    return SafetyClassifier(classifier, label, torch.device("cpu")).score(PROMPTS, RESPONSES)


def test_a_tiny_classifier_loads_and_scores_each_response_by_the_probability_of_its_safe_label(classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    safe, unsafe = p_safe(classifier, 1), p_safe(classifier, 0)
    assert safe.shape == (len(RESPONSES),) and ((0 < safe) & (safe < 1)).all()
    assert torch.allclose(safe + unsafe, torch.ones(len(RESPONSES)), atol=1e-6)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier)
    with torch.no_grad():
        one = torch.softmax(model(**tokenizer(RESPONSES[1], return_tensors="pt")).logits, -1)[0, 1]
    assert safe[1].item() == pytest.approx(one.item(), abs=1e-5)  # the response alone, as the classifier was made
    assert len(set(safe.tolist())) > 1


def test_weighted_is_the_books_formula_of_whitened_quality_and_safety(classifier):
    mix = RewardMixArgs(reward_names=["safety"], reward_combination=WEIGHTED, safety_weight=0.3)
    reward = CombinedReward([f"classifier:1:{classifier}"], [1.0], torch.device("cpu"), length_quality, mix=mix)
    total, parts = reward(PROMPTS, RESPONSES)
    safe = p_safe(classifier)
    quality = torch.tensor(length_quality(PROMPTS, RESPONSES))
    expected = 0.7 * whitened(quality) + 0.3 * whitened(torch.logit(safe))
    assert torch.allclose(total, expected, atol=1e-5)
    assert parts == pytest.approx({"safety": safe.mean().item(), "reward_fn": quality.mean().item()})


def test_gated_takes_the_safety_score_where_p_safe_is_under_the_threshold_and_quality_elsewhere(classifier):
    safe = p_safe(classifier)
    threshold = safe.median().item() + 1e-7  # the lower half of the responses is "unsafe"
    mix = RewardMixArgs(reward_names=["safety"], reward_combination=GATED, safety_threshold=threshold)
    reward = CombinedReward([f"classifier:1:{classifier}"], [1.0], torch.device("cpu"), length_quality, mix=mix)
    total, parts = reward(PROMPTS, RESPONSES)
    unsafe = safe < threshold
    assert 0 < unsafe.sum() < len(RESPONSES)
    quality = whitened(torch.tensor(length_quality(PROMPTS, RESPONSES)))
    assert torch.allclose(total[unsafe], whitened(torch.logit(safe))[unsafe], atol=1e-5)
    assert torch.allclose(total[~unsafe], quality[~unsafe], atol=1e-5)
    assert parts[GATED_SHARE] == pytest.approx(unsafe.float().mean().item())


def test_the_gate_and_the_weights_on_scores_given_by_hand():
    quality, safety = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-5.0, -6.0, -7.0])
    probability = torch.tensor([0.10, 0.50, 0.149])
    total, gated = combine(quality, safety, probability, RewardMixArgs(reward_combination=GATED))  # Llama 2's 0.15
    assert total.tolist() == [-5.0, 2.0, -7.0] and gated.tolist() == [True, False, True]
    total, _ = combine(quality, safety, probability, RewardMixArgs(reward_combination=WEIGHTED, safety_weight=0.25))
    assert torch.allclose(total, torch.tensor([0.75 - 1.25, 1.5 - 1.5, 2.25 - 1.75]))


def test_each_source_is_whitened_by_its_running_moments_which_a_resumed_run_takes_over(classifier):
    mix = RewardMixArgs(reward_names=["safety"], reward_combination=WEIGHTED)
    first = CombinedReward([f"classifier:1:{classifier}"], [1.0], torch.device("cpu"), length_quality, mix=mix)
    first(PROMPTS, RESPONSES)
    resumed = CombinedReward([f"classifier:1:{classifier}"], [1.0], torch.device("cpu"), length_quality, mix=mix)
    resumed.load_state_dict(first.state_dict())
    later = (PROMPTS[:3], ["A much longer answer than any before it.", "Yes.", "No."])
    assert torch.equal(first(*later)[0], resumed(*later)[0])
    fresh = CombinedReward([f"classifier:1:{classifier}"], [1.0], torch.device("cpu"), length_quality, mix=mix)
    assert not torch.allclose(fresh(*later)[0], resumed(*later)[0])


@pytest.mark.parametrize(
    "sources, mix, message",
    [
        (["classifier:{c}"], RewardMixArgs(reward_combination=GATED), "classifier:LABEL:PATH"),
        (["classifier:1:{c}"], RewardMixArgs(), "a safety reward source needs reward_combination weighted or gated"),
        (["classifier:1:{c}"], RewardMixArgs(reward_combination="mean"), "reward_combination must be one of"),
        (["classifier:1:{c}"], RewardMixArgs(reward_combination=GATED, reward_roles=["safety", "quality"]),
         "2 reward roles for 1"),
        (["classifier:1:{c}"], RewardMixArgs(reward_combination=GATED, reward_roles=["harmless"]),
         "reward role 'harmless' is not one of quality, safety"),
        (["classifier:1:{c}"], RewardMixArgs(reward_combination=WEIGHTED, safety_weight=1.5),
         "safety_weight must be between 0 and 1"),
        (["classifier:1:/nonexistent/classifier"], RewardMixArgs(reward_combination=GATED), "does not exist"),
    ],
)
def test_it_refuses_bad_sources_and_mixes_with_a_clear_error(classifier, sources, mix, message):
    with pytest.raises(EngineError, match=re.escape(message)):
        check_reward_sources([s.format(c=classifier) for s in sources], [], True, mix)


def test_a_label_the_classifier_does_not_have_is_refused_naming_its_labels(classifier):
    with pytest.raises(EngineError, match=r"has 2 labels .*label 2 is not one of them"):
        SafetyClassifier(classifier, 2, torch.device("cpu"))


def test_ppo_gated_on_a_classifier_records_each_sources_curve_every_step(classifier, tmp_path):
    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy
    from training.engine.ppo import PPOArgs, main

    policy = str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny"))
    events = []
    args = PPOArgs(policy=policy, prompts=PROMPTS[:4], out=str(tmp_path / "ppo"), steps=2, batch_size=4,
                   mini_batch_size=4, samples_per_prompt=1, max_new_tokens=8, device="cpu", save_every=0,
                   reward_models=["rule:correct", f"classifier:1:{classifier}"], reward_names=["quality", "safety"],
                   reward_combination=GATED, safety_threshold=0.5)
    final = main(args, events.append)
    steps = [e["metrics"] for e in events if e.get("metrics")]
    assert len(steps) == 2
    for metrics in steps:
        assert {"ppo/reward/quality", "ppo/reward/safety", "ppo/reward/gated"} <= set(metrics)
        assert 0 < metrics["ppo/reward/safety"] < 1
    assert final["ppo/reward/safety"] == steps[-1]["ppo/reward/safety"]
