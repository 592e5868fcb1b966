"""Sampling: consistent shapes, log-probabilities that a forward pass reproduces, left padding
that changes nothing, EOS ends a response, seeds reproduce; the CLI writes JSONL and ends with JSON.
Runs on the tiny demo policy (built once per checkout, shared with the other engine tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.demo_tasks import make_prompts
from training.engine.common import EngineError, format_prompt, load_causal_lm
from training.engine.sample import (
    SampleArgs,
    generate,
    main,
    sample_responses,
    sample_with_stats,
    sequence_logprobs,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_policy() -> str:
    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy

    return str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny"))


@pytest.fixture(scope="module")
def loaded(tiny_policy):
    return load_causal_lm(tiny_policy, torch.device("cpu"))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    # Different families give prompts of different lengths, so the batch is really left-padded.
    return [format_prompt(p) for p in make_prompts(10, seed=2, split="heldout")]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_it_returns_consistent_shapes_masks_and_eos_handling(loaded, prompts):
    model, tokenizer = loaded
    rollout = generate(model, tokenizer, prompts, max_new_tokens=40, temperature=0.7, batch_size=4,
                       generator=seeded(0))
    n, t_r = rollout.response_ids.shape
    assert n == len(prompts) == len(rollout.texts) == rollout.query_ids.size(0)
    assert rollout.response_mask.shape == rollout.logprobs.shape == (n, t_r) and rollout.ended.shape == (n,)
    assert rollout.query_ids.shape == rollout.query_mask.shape
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert rollout.ended.any(), "the tiny policy should end most answers"
    for i in range(n):
        mask = rollout.response_mask[i]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # real tokens first, then padding
        assert (rollout.logprobs[i, length:] == 0).all() and (rollout.logprobs[i, :length] < 0).all()
        assert (rollout.response_ids[i, length:] == pad).all()
        query_len = int(rollout.query_mask[i].sum())
        assert rollout.query_mask[i, -query_len:].all()  # left padding: the prompt ends in the last column
        if rollout.ended[i]:
            assert rollout.response_ids[i, length - 1] == eos  # EOS kept and counted
            assert eos not in rollout.response_ids[i, : length - 1].tolist()
        else:
            assert length == 40
        assert "<|endoftext|>" not in rollout.texts[i] and rollout.texts[i] == rollout.texts[i].strip()
    assert any(rollout.texts)


def test_it_returns_logprobs_that_a_forward_pass_reproduces(loaded, prompts):
    model, tokenizer = loaded
    for temperature in (0.7, 1.3):
        rollout = generate(model, tokenizer, prompts, max_new_tokens=24, temperature=temperature, batch_size=16,
                           generator=seeded(1))
        with torch.no_grad():
            recomputed = sequence_logprobs(model, rollout, temperature=temperature)
        torch.testing.assert_close(recomputed, rollout.logprobs, atol=2e-4, rtol=1e-4)


def test_it_gives_the_same_answer_alone_as_beside_longer_prompts(loaded, prompts):
    model, tokenizer = loaded
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    shortest = prompts[lengths.index(min(lengths))]
    assert max(lengths) > min(lengths)
    alone = generate(model, tokenizer, [shortest], max_new_tokens=24, temperature=0)
    batched = generate(model, tokenizer, prompts, max_new_tokens=24, temperature=0, batch_size=len(prompts))
    row = prompts.index(shortest)
    assert batched.texts[row] == alone.texts[0]
    length = int(alone.response_mask[0].sum())
    torch.testing.assert_close(batched.logprobs[row, :length], alone.logprobs[0, :length], atol=1e-4, rtol=1e-4)


def test_a_group_of_samples_of_one_prompt_runs_the_prompt_once_and_each_sample_keeps_its_own_logprobs(
        loaded, prompts):
    model, tokenizer = loaded
    groups = [prompt for prompt in prompts[:3] for _ in range(4)]  # GRPO's groups: 4 samples of each prompt
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape) if not prefill_rows else None,
        with_kwargs=True)
    try:
        rollout = generate(model, tokenizer, groups, max_new_tokens=24, temperature=1.0, batch_size=12,
                           generator=seeded(3))
    finally:
        hook.remove()
    assert prefill_rows[0][0] == 3  # the three distinct prompts, not twelve rows
    assert len(set(rollout.texts)) > 3  # the samples of a prompt differ
    with torch.no_grad():
        recomputed = sequence_logprobs(model, rollout, temperature=1.0)
    torch.testing.assert_close(recomputed, rollout.logprobs, atol=2e-4, rtol=1e-4)
    greedy = generate(model, tokenizer, groups, max_new_tokens=24, temperature=0, batch_size=12)
    alone = generate(model, tokenizer, prompts[:3], max_new_tokens=24, temperature=0)
    assert greedy.texts == [text for text in alone.texts for _ in range(4)]


def test_it_reproduces_a_seed_and_varies_with_another(loaded, prompts):
    model, tokenizer = loaded
    first = generate(model, tokenizer, prompts, max_new_tokens=24, generator=seeded(5))
    again = generate(model, tokenizer, prompts, max_new_tokens=24, generator=seeded(5))
    other = generate(model, tokenizer, prompts, max_new_tokens=24, generator=seeded(6))
    assert first.texts == again.texts
    assert first.texts != other.texts
    # Nucleus sampling with a vanishing mass keeps only the most likely token: greedy decoding.
    nucleus = generate(model, tokenizer, prompts, max_new_tokens=24, top_p=1e-6, generator=seeded(7))
    greedy = generate(model, tokenizer, prompts, max_new_tokens=24, temperature=0)
    assert nucleus.texts == greedy.texts


def test_it_refuses_bad_requests_clearly(loaded, tmp_path):
    model, tokenizer = loaded
    with pytest.raises(EngineError, match="no prompts"):
        generate(model, tokenizer, [])
    with pytest.raises(EngineError, match="exceeds the model's 256 positions"):
        generate(model, tokenizer, [format_prompt("word " * 300)], max_new_tokens=8)
    with pytest.raises(EngineError, match="does not exist"):
        sample_responses(str(tmp_path / "no-model"), ["What is 2 + 2?"])
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    with pytest.raises(EngineError, match="has no prompts"):
        main(SampleArgs(model=str(tmp_path / "no-model"), prompts=str(empty)))


def test_it_samples_several_responses_per_instruction(tiny_policy):
    instructions = make_prompts(6, seed=4, split="heldout")
    responses = sample_responses(tiny_policy, instructions, num_per_prompt=3, max_new_tokens=32, seed=0,
                                 device="cpu")
    assert [len(r) for r in responses] == [3] * 6
    assert sum(len(set(r)) > 1 for r in responses) >= 3  # samples differ within a prompt
    assert responses == sample_responses(tiny_policy, instructions, num_per_prompt=3, max_new_tokens=32, seed=0,
                                         device="cpu")


def test_it_marks_the_responses_the_length_limit_cut_and_only_those(tiny_policy):
    instructions = make_prompts(6, seed=4, split="heldout")
    settings = dict(num_per_prompt=2, seed=0, device="cpu")
    # Two tokens: the policy answers in a sentence, so no response can end by itself.
    cut_texts, cut_stats, cut = sample_with_stats(tiny_policy, instructions, max_new_tokens=2, **settings)
    assert cut == [[True, True]] * 6 and cut_stats["sample/ended_fraction"] == 0.0
    # Room to finish: a response that ended is not marked; one still marked used every token it had.
    texts, stats, truncated = sample_with_stats(tiny_policy, instructions, max_new_tokens=48, **settings)
    flags = [flag for row in truncated for flag in row]
    assert [len(row) for row in truncated] == [2] * 6 and not all(flags)
    assert sum(flags) == round((1 - stats["sample/ended_fraction"]) * len(flags))
    _, tokenizer = load_causal_lm(tiny_policy, torch.device("cpu"))
    for text, flag in zip((t for row in texts for t in row), flags):
        if flag:
            assert len(tokenizer(text)["input_ids"]) >= 48 - 2, text  # (re-encoding may merge a token or two)


def test_it_runs_from_the_command_line_and_ends_with_json(tiny_policy, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    instructions = make_prompts(5, seed=8, split="heldout")
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in instructions[:3])
                       + "".join(p + "\n" for p in instructions[3:]))
    out = tmp_path / "samples.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "training.engine.sample", "--model", tiny_policy, "--prompts", str(prompts),
         "--out", str(out), "--num-per-prompt", "2", "--max-new-tokens", "32", "--seed", "3", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["sample/responses"] == 10 and metrics["sample/tokens_per_s"] > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == instructions
    assert all(len(r["responses"]) == 2 for r in rows)
