"""LoRA (peft) and the memory switches in every training stage: SFT, the reward model and PPO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demo import demo_tasks
from demo.tiny_models import build_policy, build_reward
from training.engine import ppo, reward, sft
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import ADAPTER_DIR, EngineError, MemoryArgs, apply_lora

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_policy("llama", tmp_path_factory.mktemp("llama") / "policy"))


@pytest.fixture(scope="module")
def tiny_llama_reward(tmp_path_factory) -> str:
    return str(build_reward("llama", tmp_path_factory.mktemp("llama-rm") / "reward"))


@pytest.fixture(scope="module")
def tiny_policy() -> str:
    """The tiny demo policy (a GPT-2 that already answers the demo tasks), shared with test_engine_ppo."""
    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy

    return str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny"))


@pytest.fixture(scope="module")
def instructions() -> list[str]:
    return demo_tasks.make_prompts(64, seed=0, split="train")


@pytest.fixture
def recomputed(monkeypatch) -> list[str]:
    """The layers a stage ran under activation checkpointing, one entry a call: transformers hands
    torch.utils.checkpoint.checkpoint (bound in transformers.modeling_utils) to every layer when it is switched
    on, and a layer calls it only in a training forward pass."""
    import transformers.modeling_utils as modeling_utils

    calls: list[str] = []
    real = modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(type(getattr(function, "args", [function])[0]).__name__)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    return calls


def starts_with_the(instructions: list[str], responses: list[str]) -> list[float]:
    """A rule reward the tiny policy can climb: answer in a sentence that starts with 'The'."""
    return [1.0 if r.strip().startswith("The") else 0.0 for r in responses]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ppo_args(policy: str, prompts, out: Path, **overrides) -> ppo.PPOArgs:
    settings = dict(policy=policy, reward_models=[], prompts=prompts, out=str(out), steps=4, batch_size=16,
                    mini_batch_size=8, ppo_epochs=2, lr=2e-3, max_new_tokens=16, save_every=0, device="cpu", seed=0,
                    lora_r=16)
    settings.update(overrides)
    return ppo.PPOArgs(**settings)


def state(path, auto_class: str = "AutoModelForCausalLM") -> dict[str, torch.Tensor]:
    import transformers

    return getattr(transformers, auto_class).from_pretrained(path).state_dict()


def test_it_trains_under_5_percent_of_a_tiny_llama_s_parameters(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), MemoryArgs(lora_r=8), "CAUSAL_LM")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    n_trained = sum(p.numel() for n, p in model.named_parameters() if n in trained)
    n_total = sum(p.numel() for p in model.parameters())
    assert 0 < n_trained < 0.05 * n_total, (n_trained, n_total)
    # peft's default for Llama: adapters on the query and value projections, nothing else trained.
    assert trained and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trained)


def test_it_refuses_target_modules_the_model_lacks_and_8_bit_adam_without_cuda(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", demo_tasks.make_sft_examples(8, seed=1))
    with pytest.raises(EngineError, match="no modules named c_attn"):
        sft.main(sft.SFTArgs(model=tiny_llama, train=data, out=str(tmp_path / "a"), max_steps=1, device="cpu",
                             lora_r=4, lora_target_modules=["c_attn"]))
    with pytest.raises(EngineError, match="adam_8bit needs a CUDA device"):
        sft.main(sft.SFTArgs(model=tiny_llama, train=data, out=str(tmp_path / "b"), max_steps=1, device="cpu",
                             adam_8bit=True))


def test_it_raises_a_rule_reward_with_lora_against_the_base_as_reference(tiny_policy, instructions, tmp_path):
    history = []
    out = tmp_path / "out"
    ppo.main(ppo_args(tiny_policy, instructions, out, steps=24, batch_size=32, kl_coef=0.05),
             lambda e: history.append(e["metrics"]), reward_fn=starts_with_the)

    first = sum(m["ppo/reward"] for m in history[:3]) / 3
    last = sum(m["ppo/reward"] for m in history[-3:]) / 3
    assert last > first + 0.25, f"reward {first:.2f} -> {last:.2f}"
    # LoRA's B starts at zero, so the first rollouts come from the base itself: with the adapters switched
    # off, the reference is that same base, and the first step's KL is zero.
    assert abs(history[0]["ppo/kl"]) < 1e-4, history[0]["ppo/kl"]
    assert 0 < history[-1]["ppo/kl"] < 15.0

    # The merged policy loads with the Auto class, and only the adapted weights (GPT-2's c_attn) moved.
    before, after = state(tiny_policy), state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".c_attn." in k for k in changed), sorted(changed)
    assert (out / ADAPTER_DIR / "adapter_config.json").exists()
    assert read_checkpoint_meta(out)["args"]["lora_r"] == 16


def test_its_merged_save_samples_the_same_tokens_as_the_adapter_on_its_base(tiny_policy, instructions, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    ppo.main(ppo_args(tiny_policy, instructions, out, steps=3), reward_fn=starts_with_the)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy), out / ADAPTER_DIR).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, padding_side="left")
    prompts = [demo_tasks.make_prompts(1, seed=s)[0] for s in range(4)]
    from training.engine.common import render_prompt

    inputs = tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        from_merged = merged.generate(**inputs, **settings)
        from_adapter = adapted.generate(**inputs, **settings)
        from_base = base.generate(**inputs, **settings)
    assert torch.equal(from_merged, from_adapter)
    assert not torch.equal(from_merged, from_base)  # the adapter learned something that shows in the samples


def test_it_resumes_a_lora_run_to_the_same_result_as_an_uninterrupted_one(tiny_policy, instructions, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_2(event):
        if event["step"] == 2 and "log" not in event:
            raise Stop

    uninterrupted = ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "a"), reward_fn=starts_with_the)
    with pytest.raises(Stop):
        ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "b"), stop_at_2, reward_fn=starts_with_the)
    checkpoint = ppo.resume_dir(tmp_path / "b")
    # The resumable checkpoint holds the adapter and the optimizer's state, not a second copy of the weights.
    assert (checkpoint / ADAPTER_DIR / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    with pytest.raises(EngineError, match="made with other settings"):
        ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "b", lora_r=8), reward_fn=starts_with_the)
    resumed = ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "b"), reward_fn=starts_with_the)

    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("ppo/reward", "ppo/kl", "ppo/value_loss", "ppo/policy_loss"):
        assert uninterrupted[key] == resumed[key]


def test_sft_with_lora_and_checkpointing_trains_saves_and_reloads(tiny_llama, tmp_path, recomputed):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", demo_tasks.make_sft_examples(64, seed=3))
    settings = dict(model=tiny_llama, train=data, max_steps=6, batch_size=8, lr=1e-2, device="cpu", seed=0,
                    log_every=1, lora_r=8)
    plain = sft.main(sft.SFTArgs(out=str(tmp_path / "plain"), **settings))
    assert recomputed == []
    checkpointed = sft.main(sft.SFTArgs(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **settings))
    layers = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    assert recomputed == ["LlamaDecoderLayer"] * 6 * layers  # every layer of every step's forward pass

    assert plain["sft/loss"] < plain["sft/first_loss"]
    # Recomputing activations in the backward pass changes memory, not arithmetic.
    assert checkpointed["sft/first_loss"] == pytest.approx(plain["sft/first_loss"], rel=1e-5)
    assert checkpointed["sft/loss"] == pytest.approx(plain["sft/loss"], rel=1e-4)
    before, after = state(tiny_llama), state(tmp_path / "plain")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # the merged save loads as it is


def test_sft_with_lora_resumes_after_a_cancel_to_the_same_weights(tiny_llama, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_3(event):
        if event["step"] == 3:
            raise Stop

    data = write_jsonl(tmp_path / "train.jsonl", demo_tasks.make_sft_examples(64, seed=3))
    settings = dict(model=tiny_llama, train=data, max_steps=6, batch_size=8, lr=1e-2, device="cpu", seed=0,
                    lora_r=8)
    sft.main(sft.SFTArgs(out=str(tmp_path / "a"), **settings))
    with pytest.raises(Stop):
        sft.main(sft.SFTArgs(out=str(tmp_path / "b"), **settings), stop_at_3)
    assert (tmp_path / "b" / ADAPTER_DIR).is_dir() and read_checkpoint_meta(tmp_path / "b")["step"] == 3
    sft.main(sft.SFTArgs(out=str(tmp_path / "b"), resume=True, **settings))
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_reward_model_with_lora_trains_its_score_head_and_reloads(tiny_llama_reward, tmp_path):
    rows = []
    for k, prompt in enumerate(demo_tasks.make_prompts(48, seed=5)):
        rows.append({"prompt": prompt, "chosen": f"The answer is {k}.", "rejected": "no"})
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "rm"
    metrics = reward.main(reward.RewardArgs(train=train, model=tiny_llama_reward, out=str(out), epochs=2, lr=1e-2,
                                            batch_size=8, max_length=128, eval_every=0, save_every=0, device="cpu",
                                            seed=0, lora_r=8))
    assert metrics["rm/steps"] > 0 and metrics["rm/accuracy"] > 0.5
    before = state(tiny_llama_reward, "AutoModelForSequenceClassification")
    after = state(out, "AutoModelForSequenceClassification")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "score.weight" in changed  # the head trains in full beside the adapters
    assert all(k == "score.weight" or k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    scores = reward.RewardScorer(str(out), device="cpu").score([rows[0]["prompt"]] * 2, ["The answer is 0.", "no"])
    assert scores[0] > scores[1]


def test_ppo_with_gradient_checkpointing_takes_the_same_steps(tiny_policy, instructions, tmp_path, recomputed):
    plain = ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "a", steps=3), reward_fn=starts_with_the)
    assert recomputed == []
    checkpointed = ppo.main(ppo_args(tiny_policy, instructions, tmp_path / "b", steps=3, gradient_checkpointing=True),
                            reward_fn=starts_with_the)
    assert recomputed and set(recomputed) == {"GPT2Block"}  # the policy's update, never the rollouts' sampling
    for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_reward_model_with_gradient_checkpointing_takes_the_same_steps(tiny_llama_reward, tmp_path,
                                                                           recomputed):
    rows = [{"prompt": prompt, "chosen": f"The answer is {k}.", "rejected": "no"}
            for k, prompt in enumerate(demo_tasks.make_prompts(32, seed=5))]
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    settings = dict(train=train, model=tiny_llama_reward, epochs=1, lr=1e-2, batch_size=8, max_length=128,
                    eval_every=0, save_every=0, device="cpu", seed=0, eval_fraction=0.0)
    plain = reward.main(reward.RewardArgs(out=str(tmp_path / "plain"), **settings))
    assert recomputed == []
    checkpointed = reward.main(reward.RewardArgs(out=str(tmp_path / "ckpt"), gradient_checkpointing=True,
                                                 **settings))
    assert recomputed and set(recomputed) == {"LlamaDecoderLayer"}
    for key in ("rm/loss", "rm/train_accuracy"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
