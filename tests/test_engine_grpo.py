"""GRPO on tiny models: its loss and gradients equal TRL 1.16 GRPOTrainer's on the same batch, a rule judge's
reward rises, LoRA trains adapters only, and resume after a stop equals the uninterrupted run. CPU, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import ADAPTER_DIR, EngineError, forward_response
from training.engine.grpo import GRPOArgs, group_advantages, grpo_loss, main, resume_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from a second thread on a shared 2-core machine; restored afterwards."""
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


def tiny_args(policy: str, prompts, out: Path, **overrides) -> GRPOArgs:
    settings = dict(policy=policy, prompts=prompts, out=str(out), steps=4, batch_size=16, samples_per_prompt=4,
                    mini_batch_size=8, lr=3e-4, max_new_tokens=16, save_every=0, device="cpu", seed=0)
    settings.update(overrides)
    return GRPOArgs(**settings)


def _state(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---- the loss against TRL's -------------------------------------------------------------------------


def _trl_trainer(policy_dir: Path, out: Path, beta: float, epsilon: float, temperature: float):
    """TRL 1.16's GRPOTrainer on the policy at `policy_dir`, with the paper's loss (loss_type="grpo", the KL
    term without TRL's importance-sampling correction, as Shao et al. eq. 3 writes it)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(out), loss_type="grpo", beta=beta, epsilon=epsilon, temperature=temperature,
        use_bias_correction_kl=False, num_generations=4, per_device_train_batch_size=4, use_cpu=True,
        bf16=False, fp16=False, report_to="none", save_strategy="no", disable_dropout=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}), processing_class=tokenizer)
    trainer.model.eval()  # no gradient-accumulation scaling, as in TRL's eval mode; dropout is off anyway
    return trainer


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_its_loss_and_gradients_equal_trl_grpo_trainers_on_the_same_batch(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from demo.tiny_models import build_policy

    beta, epsilon, temperature = 0.04, 0.2, 0.7
    policy_dir = build_policy(family, tmp_path / "policy")
    ours = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    trainer = _trl_trainer(policy_dir, tmp_path / "trl", beta, epsilon, temperature)

    # A fixed batch: 2 prompts x G=4 completions of different lengths (right-padded), and their rewards.
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size - 8
    prompt_ids = torch.randint(5, vocab, (2, 7), generator=g).repeat_interleave(4, 0)  # (8, 7), no padding
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.randint(5, vocab, (8, 6), generator=g)  # (8, 6)
    lengths = torch.tensor([6, 3, 5, 1, 4, 6, 2, 5])
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    completion_ids = completion_ids * completion_mask  # pad id 0 past the end
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1])
    adv = group_advantages(rewards, 4, "group", scale=True)  # (8,)

    logprobs, _, _ = forward_response(ours, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)
    mask = completion_mask.float()
    # pi_old and pi_ref off the current policy, far enough that some ratios clip and the KL is not 0.
    old = (logprobs.detach() + 0.3 * torch.randn(logprobs.shape, generator=g)) * mask
    ref = (logprobs.detach() + 0.5 * torch.randn(logprobs.shape, generator=g)) * mask

    loss, terms = grpo_loss(logprobs, old, ref, adv, mask, epsilon, beta)
    loss.backward()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref}
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    assert terms["clipfrac"] > 0 and terms["token_kl"] > 0  # the batch exercises the clip and the KL term
    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    theirs = dict(trainer.model.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4), name
    assert abs(terms["token_kl"].item() - trainer._metrics["eval"]["kl"][-1]) < 1e-5
    assert abs(terms["clipfrac"].item() - trainer._metrics["eval"]["clip_ratio/region_mean"][-1]) < 1e-6


def test_its_group_advantages_are_the_scores_normalised_within_each_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.7, 0.7])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as TRL: 0.5
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [std + 1e-4] * 4 + [1e-4] * 4)
    assert torch.allclose(group_advantages(scores, 4, "group", scale=True), expected)
    # RLOO's baseline leaves each score out of its own mean (Ahmadian et al. 2024), unscaled here.
    assert torch.allclose(group_advantages(scores, 4, "rloo", scale=False),
                          torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0]))


# ---- the stage on the tiny demo policy --------------------------------------------------------------


def test_it_raises_a_rule_reward_beside_the_demos_rule_judge(tiny_policy, instructions, tmp_path):
    history = []
    args = tiny_args(tiny_policy, instructions, tmp_path / "out", steps=16, batch_size=32, mini_batch_size=None,
                     lr=1e-3, reward_models=["rule:correct_sentence"])
    final = main(args, lambda e: history.append(e["metrics"]), reward_fn=starts_with_the)

    climbed = [m["grpo/reward/reward_fn"] for m in history]
    first, last = sum(climbed[:3]) / 3, sum(climbed[-3:]) / 3
    assert last > first + 0.25, f"reward {first:.2f} -> {last:.2f}"
    assert all(0 <= m["grpo/reward/rule:correct_sentence"] <= 1 for m in history)  # the judge scored every step
    assert final["grpo/reward"] == pytest.approx(
        final["grpo/reward/reward_fn"] + final["grpo/reward/rule:correct_sentence"], abs=1e-5)
    for key in ("grpo/loss", "grpo/kl", "grpo/token_kl", "grpo/reward_std", "grpo/clipfrac", "grpo/entropy",
                "grpo/score", "grpo/response_length", "grpo/eos_rate", "grpo/samples_per_second"):
        assert key in final
    before, after = _state(tiny_policy), _state(tmp_path / "out")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    assert read_checkpoint_meta(tmp_path / "out")["stage"] == "grpo"
    assert not resume_dir(tmp_path / "out").exists()


def longer_is_better(instructions: list[str], responses: list[str]) -> list[float]:
    """A reward that differs within a group even for a random policy, so every step moves it."""
    return [len(r) / 64 for r in responses]


@pytest.mark.parametrize("policy, reward", [("tiny_policy", starts_with_the), ("llama_policy", longer_is_better)])
def test_it_resumes_to_the_same_result_as_an_uninterrupted_run(policy, reward, instructions, tmp_path, request):
    start_dir = request.getfixturevalue(policy)

    class Stop(Exception):
        pass

    def stop_at_2(event):
        if event["step"] == 2 and "log" not in event:
            raise Stop

    uninterrupted = main(tiny_args(start_dir, instructions, tmp_path / "a", num_iterations=2),
                         reward_fn=reward)
    with pytest.raises(Stop):
        main(tiny_args(start_dir, instructions, tmp_path / "b", num_iterations=2), stop_at_2,
             reward_fn=reward)
    assert read_checkpoint_meta(resume_dir(tmp_path / "b"))["step"] == 2
    with pytest.raises(EngineError, match="made with other settings"):
        main(tiny_args(start_dir, instructions, tmp_path / "b", seed=1), reward_fn=reward)
    events = []
    resumed = main(tiny_args(start_dir, instructions, tmp_path / "b", num_iterations=2), events.append,
                   reward_fn=reward)

    assert [e["step"] for e in events if not e.get("log", "").startswith("resuming")] == [3, 4]
    a, b, start = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(start_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], start[k]) for k in a)  # the policy moved
    for key in ("grpo/reward", "grpo/kl", "grpo/loss", "grpo/clipfrac"):
        assert uninterrupted[key] == resumed[key]


def test_it_trains_lora_adapters_against_the_base_as_reference(tiny_policy, instructions, tmp_path):
    history = []
    main(tiny_args(tiny_policy, instructions, tmp_path / "out", lora_r=8, steps=3, lr=1e-2),
         lambda e: history.append(e["metrics"]), reward_fn=starts_with_the)

    assert (tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").exists()
    assert history[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == base
    assert history[-1]["grpo/kl"] > 1e-4  # the trained adapters moved the policy off its base
    before, after = _state(tiny_policy), _state(tmp_path / "out")  # the merged weights
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(samples_per_prompt=1), "at least 2"),
        (dict(batch_size=10), "not a multiple of samples_per_prompt"),
        (dict(baseline="median"), "baseline must be one of group, rloo"),
    ],
)
def test_it_refuses_bad_settings_before_any_step(tiny_policy, instructions, tmp_path, overrides, message):
    with pytest.raises(EngineError, match=message):
        main(tiny_args(tiny_policy, instructions, tmp_path / "out", **overrides), reward_fn=starts_with_the)
