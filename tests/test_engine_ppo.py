"""PPO on the tiny demo policy: the reward rises, the KL stays bounded, resume is exact, bad input
is refused before any step. CPU, a few seconds each; no network, no ../shared."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import EngineError, StopWithoutSaving
from training.engine.ppo import (
    VALUE_HEAD_DIR,
    PPOArgs,
    ValueHead,
    compute_gae,
    leave_one_out,
    main,
    per_token_rewards,
    resume_dir,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A 0.1M-parameter model gains nothing from a second thread, and on a shared 2-core machine two
    OpenMP threads per process wait on each other; restore the setting for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_policy() -> str:
    """The tiny demo policy, built once per checkout (about 30 s) and shared by the engine tests."""
    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy

    return str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny"))


@pytest.fixture(scope="module")
def llama_policy(tmp_path_factory) -> str:
    """A tiny random Llama 3 policy: no pad token of its own, so the engine lends it eos (<|eot_id|>)."""
    from demo.tiny_models import build_policy

    return str(build_policy("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def instructions() -> list[str]:
    from demo.demo_tasks import make_prompts

    prompts = make_prompts(64, seed=0, split="train")
    return [p if isinstance(p, str) else p.get("prompt", p.get("instruction")) for p in prompts]


def starts_with_the(instructions: list[str], responses: list[str]) -> list[float]:
    """A rule reward the tiny policy can climb: answer in a sentence that starts with 'The'."""
    return [1.0 if r.strip().startswith("The") else 0.0 for r in responses]


def tiny_args(policy: str, prompts, out: Path, **overrides) -> PPOArgs:
    settings = dict(
        policy=policy,
        reward_models=[],
        prompts=prompts,
        out=str(out),
        steps=4,
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
        lr=3e-4,
        max_new_tokens=16,
        save_every=0,
        device="cpu",
        seed=0,
    )
    settings.update(overrides)
    return PPOArgs(**settings)


def _state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("samples_per_prompt", [1, 4])
def test_it_raises_a_rule_reward_while_the_kl_stays_bounded(tiny_policy, instructions, tmp_path, samples_per_prompt):
    history = []
    args = tiny_args(
        tiny_policy, instructions, tmp_path / "out", steps=24, batch_size=32, kl_coef=0.05,
        samples_per_prompt=samples_per_prompt,
    )
    final = main(args, lambda e: history.append(e["metrics"]), reward_fn=starts_with_the)

    first = sum(m["ppo/reward"] for m in history[:3]) / 3
    last = sum(m["ppo/reward"] for m in history[-3:]) / 3
    assert last > first + 0.25, f"reward {first:.2f} -> {last:.2f}"
    assert all(m["ppo/kl"] < 15.0 for m in history), [round(m["ppo/kl"], 2) for m in history]
    for key in (
        "ppo/kl",
        "ppo/entropy",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/value_loss",
        "ppo/policy_loss",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/eos_rate",
        "ppo/samples_per_second",
        "ppo/kl_coef",
    ):
        assert key in final

    # The final policy is a loadable save_pretrained directory that differs from the start.
    before, after = _state(tiny_policy), _state(tmp_path / "out")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert (tmp_path / "out" / VALUE_HEAD_DIR).is_dir()
    meta = read_checkpoint_meta(tmp_path / "out")
    assert meta["stage"] == "ppo" and meta["step"] == 24
    assert not resume_dir(tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["tiny_policy", "llama_policy"])
def test_it_resumes_to_the_same_result_as_an_uninterrupted_run(policy, instructions, tmp_path, request):
    start_dir = request.getfixturevalue(policy)

    class Stop(Exception):
        pass

    def stop_at_2(event):
        if event["step"] == 2 and "log" not in event:
            raise Stop

    uninterrupted = main(
        tiny_args(start_dir, instructions, tmp_path / "a"), reward_fn=starts_with_the
    )
    with pytest.raises(Stop):
        main(
            tiny_args(start_dir, instructions, tmp_path / "b"),
            stop_at_2,
            reward_fn=starts_with_the,
        )
    assert read_checkpoint_meta(resume_dir(tmp_path / "b"))["step"] == 2
    with pytest.raises(EngineError, match="made with other settings"):
        main(
            tiny_args(start_dir, instructions, tmp_path / "b", seed=1),
            reward_fn=starts_with_the,
        )
    resumed_events = []
    resumed = main(
        tiny_args(start_dir, instructions, tmp_path / "b"),
        resumed_events.append,
        reward_fn=starts_with_the,
    )

    assert [e["step"] for e in resumed_events if not e.get("log", "").startswith("resuming")] == [3, 4]
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    value_a, value_b = (ValueHead.from_pretrained(tmp_path / d / VALUE_HEAD_DIR) for d in ("a", "b"))
    assert torch.equal(value_a.summary.weight, value_b.summary.weight)
    assert value_a.summary.weight.abs().sum() > 0  # the critic learned something
    for key in ("ppo/reward", "ppo/kl", "ppo/value_loss", "ppo/policy_loss"):
        assert uninterrupted[key] == resumed[key]


def test_it_penalises_responses_that_never_emit_eos(tiny_policy, instructions, tmp_path):
    metrics = main(
        tiny_args(
            tiny_policy, instructions, tmp_path / "out", steps=1, max_new_tokens=2, missing_eos_penalty=2.0
        ),
        reward_fn=lambda ins, res: [0.5] * len(res),
    )
    assert metrics["ppo/eos_rate"] < 1.0
    assert metrics["ppo/reward"] == pytest.approx(0.5)
    assert metrics["ppo/score"] == pytest.approx(0.5 - 2.0 * (1.0 - metrics["ppo/eos_rate"]))


def test_it_computes_gae_that_bootstraps_from_zero_at_the_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta_2 = 1 - 0.5; delta_1 = 0 + 0.5 - 0.5 = 0; delta_0 = 0 -> A_t = sum lam^k delta_{t+k}
    expected = torch.tensor([[0.95**2 * 0.5, 0.95 * 0.5, 0.5, 0.0]])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, (expected + values) * mask)


def test_its_default_lambda_gives_the_return_to_go_minus_the_value():
    # The default lam=1 (gamma 1): each token's advantage is the sum of the rewards from it to the end of
    # the response, minus its own value, whatever the critic predicts for the tokens after it.
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.3, -4.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    defaults = PPOArgs()
    advantages, returns = compute_gae(rewards, values, mask, gamma=defaults.gamma, lam=defaults.lam)
    to_go = torch.tensor([[0.7, 0.8, 1.0, 0.0]])
    assert torch.allclose(advantages, (to_go - values) * mask)
    assert torch.allclose(returns, to_go)


def test_its_rewards_are_the_kl_penalty_at_every_token_plus_the_score_at_the_last():
    # rewards = -kl_coef * kl; rewards[last] += score (Ziegler et al. 2019 eq. 1), worked by hand.
    kl = torch.tensor([[0.5, -0.2, 0.1, 0.0], [0.3, 0.4, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    before = kl.clone()
    rewards = per_token_rewards(kl, scores, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.02, -0.01 + 2.0, 0.0],
                             [-0.03, -0.04 - 1.0, 0.0, 0.0],
                             [-0.07 + 0.5, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)
    assert torch.equal(kl, before)  # the KL it was given is left as it was (the metrics read it after)
    assert torch.allclose(per_token_rewards(kl, scores, mask, kl_coef=0.0).sum(1), scores)


def test_every_step_trains_on_the_kl_penalised_rewards(tiny_policy, instructions, tmp_path, monkeypatch):
    """main hands per_token_rewards the step's real per-token KL and args.kl_coef, and GAE gets its result."""
    from training.engine import ppo

    assembled, trained_on, history = [], [], []

    def assemble(kl, scores, mask, kl_coef):
        rewards = per_token_rewards(kl, scores, mask, kl_coef)
        assembled.append((kl.clone(), kl_coef, rewards))
        return rewards

    def gae(rewards, *rest, **options):
        trained_on.append(rewards)
        return compute_gae(rewards, *rest, **options)

    monkeypatch.setattr(ppo, "per_token_rewards", assemble)
    monkeypatch.setattr(ppo, "compute_gae", gae)
    main(tiny_args(tiny_policy, instructions, tmp_path / "out", steps=2, kl_coef=0.3, lr=1e-3),
         lambda event: history.append(event["metrics"]), reward_fn=starts_with_the)
    assert len(assembled) == len(trained_on) == len(history) == 2
    for (kl, kl_coef, rewards), gae_rewards, metrics in zip(assembled, trained_on, history):
        assert kl_coef == 0.3 and gae_rewards is rewards
        assert kl.sum(1).mean().item() == pytest.approx(metrics["ppo/kl"], rel=1e-5, abs=1e-7)
    assert assembled[1][0].abs().max() > 1e-3  # after an update the policy's tokens carry a KL penalty


def test_its_leave_one_out_baseline_cancels_what_a_prompt_gives_every_sample():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.7, 0.7])
    # Group 1: the one right answer gains 1 - 0, the others lose 1/3; group 2 agrees: no signal.
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(leave_one_out(scores, 4), expected)


def test_it_samples_each_prompt_several_times_in_a_row(tiny_policy, instructions, tmp_path):
    seen: list[list[str]] = []

    def recorded(batch_instructions, responses):
        seen.append(list(batch_instructions))
        return starts_with_the(batch_instructions, responses)

    main(tiny_args(tiny_policy, instructions, tmp_path / "out", steps=2, batch_size=32, samples_per_prompt=4),
         reward_fn=recorded)
    assert len(seen) == 2
    for batch in seen:  # 8 prompts a step, each answered 4 times in a row
        groups = [batch[i : i + 4] for i in range(0, 32, 4)]
        assert all(len(set(g)) == 1 for g in groups)
        assert len({g[0] for g in groups}) == 8


@pytest.mark.parametrize(
    "overrides, reward_fn, message",
    [
        (dict(prompts=[]), starts_with_the, "no prompts"),
        (dict(reward_models=["rule:no_such_rule"]), None, "unknown rule judge 'no_such_rule'"),
        (dict(policy="/nonexistent/policy"), starts_with_the, "does not exist"),
        (dict(reward_models=["/nonexistent/rm"]), None, "reward model path '/nonexistent/rm' does not exist"),
        (dict(reward_models=["rule:correct"], reward_weights=[1.0, 0.5]), None, "2 reward weights for 1"),
        (dict(reward_models=[]), None, "no reward"),
        (dict(prompts=["word " * 5000]), starts_with_the, "exceeds the policy's context"),
        (dict(samples_per_prompt=3), starts_with_the, "batch_size (16) is not a multiple of samples_per_prompt (3)"),
        (dict(mini_batch_size=0), starts_with_the, "mini_batch_size must be at least 1, got 0"),
        (dict(mini_batch_size=32), starts_with_the, "mini_batch_size (32) is larger than batch_size (16)"),
    ],
)
def test_it_refuses_bad_input_before_any_step(tiny_policy, tmp_path, overrides, reward_fn, message):
    events = []
    settings = {"policy": tiny_policy, "prompts": ["What is 2 + 3?"], **overrides}
    args = tiny_args(settings.pop("policy"), settings.pop("prompts"), tmp_path / "out", **settings)
    with pytest.raises(EngineError, match=re.escape(message)):
        main(args, events.append, reward_fn=reward_fn)
    assert events == []
    assert not (tmp_path / "out").exists()


def test_it_runs_from_the_command_line_and_ends_with_json(tiny_policy, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"What is {i} + {i}?"}) for i in range(8)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.engine.ppo",
            "--policy",
            tiny_policy,
            "--reward-model",
            "rule:correct",
            "--reward-weight",
            "2.0",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--batch-size",  # no --mini-batch-size: the default takes the whole batch of 8
            "8",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"ppo/reward", "ppo/kl", "ppo/samples_per_second"} <= set(final)
    assert (tmp_path / "out" / "config.json").exists()

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.engine.ppo",
            "--policy",
            tiny_policy,
            "--reward-model",
            "rule:nope",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "bad"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert bad.returncode != 0
    assert "unknown rule judge" in json.loads(bad.stdout.strip().splitlines()[-1])["error"]


def test_it_writes_no_checkpoint_when_stopped_without_saving(tiny_policy, instructions, tmp_path):
    """A worker that lost its job stops at its next report and leaves the checkpoint as it was."""
    events = []

    def taken_away_at_3(event):
        events.append(event)
        if event.get("step") == 3:
            raise StopWithoutSaving("the job runs elsewhere now")

    with pytest.raises(StopWithoutSaving):
        main(tiny_args(tiny_policy, instructions, tmp_path / "out", save_every=2), taken_away_at_3,
             reward_fn=starts_with_the)
    assert [e.get("checkpoint", False) for e in events] == [False, True, False]  # a save follows step 2
    assert read_checkpoint_meta(resume_dir(tmp_path / "out"))["step"] == 2  # not 3
    assert not (tmp_path / "out").exists()


def test_it_resumes_from_the_last_good_checkpoint_after_a_write_fails_and_a_swap_is_cut(
        tiny_policy, instructions, tmp_path, monkeypatch):
    from training.engine import common

    out = tmp_path / "out"
    real_save = torch.save
    saves = []

    def disk_full_on_the_second_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"\0" * 100)  # half a file, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(common.torch, "save", disk_full_on_the_second_save)
    with pytest.raises(OSError, match="No space left"):
        main(tiny_args(tiny_policy, instructions, out, save_every=1), reward_fn=starts_with_the)
    monkeypatch.undo()
    checkpoint = resume_dir(out)
    assert read_checkpoint_meta(checkpoint)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no half-written directory left

    # Then a crash between the two renames of a later swap: the checkpoint sits aside, not in its place.
    aside = tmp_path / f".{checkpoint.name}.old-1-1"
    checkpoint.rename(aside)
    events = []
    main(tiny_args(tiny_policy, instructions, out, save_every=1), events.append, reward_fn=starts_with_the)
    assert f"resuming from {aside} at step 1" in events[0]["log"]
    assert [e["step"] for e in events if not e.get("log", "").startswith("resuming")] == [2, 3, 4]
    assert read_checkpoint_meta(out)["step"] == 4


def test_it_resumes_from_an_earlier_attempt_s_checkpoint_and_writes_only_its_own(tiny_policy, instructions, tmp_path):
    class Killed(Exception):
        pass

    def killed_at_2(event):
        if event.get("step") == 2 and "log" not in event:
            raise Killed

    first, second = tmp_path / "ppo-1" / "policy", tmp_path / "ppo-2" / "policy"
    with pytest.raises(Killed):
        main(tiny_args(tiny_policy, instructions, first), killed_at_2, reward_fn=starts_with_the)
    before = {p.name: p.stat().st_mtime_ns for p in resume_dir(first).iterdir()}
    events = []
    main(tiny_args(tiny_policy, instructions, second, resume_from=str(resume_dir(first))), events.append,
         reward_fn=starts_with_the)
    assert f"resuming from {resume_dir(first)} at step 2" in events[0]["log"]
    assert read_checkpoint_meta(second)["step"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in resume_dir(first).iterdir()} == before
