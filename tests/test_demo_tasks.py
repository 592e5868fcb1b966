"""The demo task families: prompts parse back to their answers, the rule judges rank right above
wrong and the preferred style above the others, and held-out prompts never leak into training."""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations

import pytest

from demo.demo_tasks import (
    FAMILIES,
    PREFERRED_STYLE,
    RULE_JUDGES,
    STYLES,
    Task,
    detect_style,
    evaluate,
    is_correct,
    judge_score,
    make_prompts,
    make_sft_examples,
    make_tasks,
    parse_task,
    respond,
)
from training.engine.common import format_prompt


def wrong_answer(task: Task) -> str:
    """A plausible but wrong answer of the right shape, per family."""
    f = task.fields
    if task.family == "arithmetic":
        return str(int(task.answer) + 1)
    if task.family == "reverse":
        return " ".join(f["words"])  # the original order
    if task.family == "sort":
        return ", ".join(sorted(f["words"], reverse=True))
    if task.family == "category":
        return ", ".join(f["items"])  # every item, members or not
    return f"Could you please {f['request']} or else?"


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks(150, seed=3)


def test_it_recovers_each_task_and_its_answer_from_the_prompt_text_alone(tasks):
    for task in tasks:
        for text in (task.instruction, format_prompt(task.instruction), f"  {task.instruction}\n"):
            parsed = parse_task(text)
            assert parsed is not None, text
            assert (parsed.family, parsed.answer) == (task.family, task.answer)
    assert parse_task("Tell me a story about a dragon.") is None
    assert judge_score("Tell me a story about a dragon.", "Once upon a time") == 0.0


def test_it_scores_every_correct_answer_above_every_wrong_one(tasks):
    rng = random.Random(0)
    for task in tasks:
        right = [respond(task, style, rng) for style in STYLES]
        wrong = [respond(task, style, rng, answer=wrong_answer(task)) for style in STYLES]
        assert all(is_correct(task.instruction, r) for r in right), right
        assert not any(is_correct(task.instruction, w) for w in wrong), wrong
        for name, judge in RULE_JUDGES.items():
            if name == "respectful":  # judges the manner alone: test_the_respectful_judge_dislikes_curt_answers_alone
                continue
            assert min(judge(task.instruction, r) for r in right) > max(judge(task.instruction, w) for w in wrong), name


def test_the_respectful_judge_dislikes_curt_answers_alone_right_or_wrong(tasks):
    rng = random.Random(3)
    judge = RULE_JUDGES["respectful"]
    for task in tasks:
        for answer in (None, wrong_answer(task)):
            scores = {style: judge(task.instruction, respond(task, style, rng, answer=answer)) for style in STYLES}
            assert scores.pop("curt") < min(scores.values()), (task.instruction, scores)


def test_it_prefers_the_chosen_style_among_correct_answers(tasks):
    rng = random.Random(1)
    assert PREFERRED_STYLE == "sentence"
    for task in tasks:
        answers = {style: respond(task, style, rng) for style in STYLES}
        for style in STYLES:
            judge = RULE_JUDGES[f"correct_{style}"]
            best = max(answers, key=lambda s: judge(task.instruction, answers[s]))
            assert best == style, (task.instruction, style, best)
        default = {s: judge_score(task.instruction, a) for s, a in answers.items()}
        assert max(default, key=default.get) == PREFERRED_STYLE


def test_it_detects_the_style_a_response_was_written_in_right_or_wrong(tasks):
    rng = random.Random(2)
    for task in tasks:
        for style in STYLES:
            assert detect_style(task.instruction, respond(task, style, rng)) == style
            assert detect_style(task.instruction, respond(task, style, rng, answer=wrong_answer(task))) == style
    task = tasks[0]
    assert detect_style(task.instruction, "zzz ### 12 12 the the") is None


def test_it_gives_garbage_and_empty_responses_low_scores(tasks):
    rng = random.Random(3)
    garbage = ["", "   ", "the the the the the", "Here it is: Have a wonderful day!", "?!?!", "ñññ 12 ###"]
    for task in tasks[:30]:
        for text in garbage + [" ".join(rng.choice(["cat", "7", "please", "the"]) for _ in range(8))]:
            assert judge_score(task.instruction, text) < 0.5
            assert not is_correct(task.instruction, text)
    # Padding a right answer with junk breaks its style and costs it its place above wrong answers' ceiling.
    task = tasks[0]
    junk = respond(task, "sentence", rng) + " banana banana banana"
    assert judge_score(task.instruction, junk) < judge_score(task.instruction, respond(task, "sentence", rng))


def test_it_rarely_ties_two_different_responses(tasks):
    rng = random.Random(4)
    ties = total = 0
    for task in tasks[:60]:
        responses = {respond(task, s, rng) for s in STYLES for _ in range(3)}
        responses |= {respond(task, s, rng, answer=wrong_answer(task)) for s in STYLES}
        for a, b in combinations(sorted(responses), 2):
            total += 1
            ties += judge_score(task.instruction, a) == judge_score(task.instruction, b)
    assert total > 1000
    assert ties / total < 0.02


def test_it_keeps_heldout_prompts_out_of_the_training_split():
    train = set(make_prompts(4000, seed=0, split="train"))
    heldout = make_prompts(400, seed=0, split="heldout")
    assert len(set(heldout)) > 350
    assert not train & set(heldout)
    assert not {e["instruction"] for e in make_sft_examples(2000, seed=5)} & set(heldout)
    assert {parse_task(p).family for p in heldout} == set(FAMILIES)
    # The split is by problem, not phrasing: a held-out sum asked another way is still held out.
    for task in make_tasks(100, seed=1, split="heldout", families=["arithmetic"]):
        f = task.fields
        for phrasing in (f"What is {f['a']} {f['op']} {f['b']}?", f"Compute {f['a']} {f['op']} {f['b']}."):
            assert phrasing not in train


def test_it_mixes_styles_and_families_in_the_sft_examples_reproducibly():
    examples = make_sft_examples(1000, seed=7)
    assert examples == make_sft_examples(1000, seed=7)
    assert examples != make_sft_examples(1000, seed=8)
    styles = Counter(e["style"] for e in examples)
    families = Counter(e["family"] for e in examples)
    assert set(styles) == set(STYLES) and min(styles.values()) > 120
    assert styles[PREFERRED_STYLE] < 0.3 * len(examples)  # room for preferences to shape
    assert families == {"arithmetic": 223, "reverse": 222, "sort": 222, "category": 222, "polite": 111}
    for e in examples:
        assert e["input"] == ""
        assert is_correct(e["instruction"], e["output"])
        assert detect_style(e["instruction"], e["output"]) == e["style"]


def test_it_summarises_correctness_and_style_mix():
    tasks = make_tasks(20, seed=9, split="heldout")
    rng = random.Random(0)
    responses = [respond(t, "terse", rng) if i % 2 else respond(t, "curt", rng, answer=wrong_answer(t))
                 for i, t in enumerate(tasks)]
    summary = evaluate([t.instruction for t in tasks], responses)
    assert summary["demo/correct"] == pytest.approx(0.5)
    assert summary["demo/style_terse"] == pytest.approx(0.5) and summary["demo/style_curt"] == pytest.approx(0.5)
    assert 0.3 < summary["demo/judge_mean"] < 0.7
