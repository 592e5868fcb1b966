"""The DPO stage: its losses and gradients against TRL's DPOTrainer, learning, LoRA with a chat template, resume."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from demo import demo_tasks
from demo.tiny_models import build_policy
from training.engine import dpo
from training.engine.checkpoints import read_checkpoint_meta, resume_dir
from training.engine.common import ADAPTER_DIR, load_causal_lm

TIMING_KEYS = {"dpo/tokens_per_second", "dpo/train_seconds", "dpo/loop_seconds"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama 3.2 Instruct stand-in, with its chat template."""
    return str(build_policy("llama", tmp_path_factory.mktemp("llama") / "policy"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A tiny random GPT-2: a base model, prompts in the instruction template."""
    return str(build_policy("gpt2", tmp_path_factory.mktemp("gpt2") / "policy"))


def style_pairs(n: int, seed: int) -> list[dict]:
    """A learnable preference: the answer in a sentence is preferred to the same answer padded with chatter."""
    rng = random.Random(seed)
    return [{"prompt": task.instruction, "chosen": demo_tasks.respond(task, "sentence", rng),
             "rejected": demo_tasks.respond(task, "padded", rng), "margin": rng.choice([0.0, 1 / 3, 2 / 3, 1.0])}
            for task in demo_tasks.make_tasks(n, seed, "train")]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_args(policy: str, train: str, out: Path, **overrides) -> dpo.DPOArgs:
    settings = dict(policy=policy, train=train, out=str(out), lr=1e-3, batch_size=8, eval_batch_size=16,
                    max_length=256, warmup_ratio=0.0, log_every=1, eval_every=0, device="cpu")
    return dpo.DPOArgs(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------
# The loss against the reference implementation


def trl_loss_and_grads(policy, ref, tokenizer, pairs: list[dict], loss_type: str, beta: float, tmp_path: Path):
    """TRL 1.16 DPOTrainer's loss on these encoded pairs (its own collator and _compute_loss), and its gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    config = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], loss_type=[loss_type], beta=beta,
                       use_cpu=True, bf16=False)  # bf16 would run TRL's reference under autocast
    texts = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # required; the batch is ours
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=texts, processing_class=tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in pairs])
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_its_loss_and_gradients_equal_trl_dpo_trainer_s(tiny_llama, tmp_path, loss_type):
    from datasets import Dataset

    policy, tokenizer = load_causal_lm(tiny_llama, torch.device("cpu"))
    ref = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference apart from the policy, so the log-ratios are not all 0
        for param in ref.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    rows = style_pairs(6, seed=1)
    ds = Dataset.from_list([{**r, "prompt_turns": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    pairs, cut = dpo.ResponseEncoder(tokenizer, 512).encode(ds)
    assert cut == 0 and len({len(p["chosen"]) for p in pairs}) > 1  # padding on both sides is exercised

    trl_loss, trl_grads = trl_loss_and_grads(copy.deepcopy(policy), copy.deepcopy(ref), tokenizer, pairs,
                                             loss_type, 0.1, tmp_path)

    ours = copy.deepcopy(policy).train()
    with torch.no_grad():
        ref_c, ref_r, _, _ = dpo.sequence_logps(ref, pairs, tokenizer.pad_token_id, torch.device("cpu"), None)
    chosen, rejected, tokens_c, tokens_r = dpo.sequence_logps(ours, pairs, tokenizer.pad_token_id,
                                                              torch.device("cpu"), None)
    loss, _ = dpo.preference_loss(chosen, rejected, ref_c, ref_r, tokens_c, tokens_r, beta=0.1, loss_type=loss_type)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert abs(loss.item() - 0.6931) > 1e-3  # not the loss of a policy equal to its reference
    grads = dict(ours.named_parameters())
    assert max((grads[n].grad - g).abs().max().item() for n, g in trl_grads.items()) < 1e-5
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-3


def test_conservative_dpo_is_the_loss_under_labels_flipped_with_probability_eps():
    h = torch.tensor([2.0, -1.0, 0.5])  # log-ratio gaps of three pairs
    zeros, ones = torch.zeros(3), torch.ones(3)

    def loss(gap, eps):
        return dpo.preference_loss(gap, zeros, zeros, zeros, ones, ones, beta=0.1, label_smoothing=eps)[0]

    assert torch.allclose(loss(h, 0.2), 0.8 * loss(h, 0.0) + 0.2 * loss(-h, 0.0))
    assert not torch.allclose(loss(h, 0.2), loss(h, 0.0))


def test_a_pair_weighs_one_plus_strength_weight_times_its_margin():
    pairs = [{"margin": 0.0}, {"margin": 1.0}]
    weight = dpo.pair_weights(dpo.DPOArgs(strength_weight=1.0), pairs, torch.device("cpu"))
    gaps, zeros, ones = torch.tensor([1.0, -3.0]), torch.zeros(2), torch.ones(2)
    weighted, _ = dpo.preference_loss(gaps, zeros, zeros, zeros, ones, ones, beta=0.1, weight=weight)
    each = -torch.nn.functional.logsigmoid(0.1 * gaps)
    assert torch.allclose(weighted, (each[0] + 2 * each[1]) / 3)
    assert dpo.pair_weights(dpo.DPOArgs(), pairs, torch.device("cpu")) is None


def test_a_pair_from_an_older_round_weighs_older_rounds_weight_to_the_k_times_its_strength_weight():
    pairs = [{"margin": 1.0, "round_weight": 1.0}, {"margin": 0.0, "round_weight": 0.25}]
    weight = dpo.pair_weights(dpo.DPOArgs(strength_weight=1.0, older_rounds_weight=0.5), pairs, torch.device("cpu"))
    assert weight.tolist() == [2.0, 0.25]
    gaps, zeros, ones = torch.tensor([1.0, -3.0]), torch.zeros(2), torch.ones(2)
    weighted, _ = dpo.preference_loss(gaps, zeros, zeros, zeros, ones, ones, beta=0.1, weight=weight)
    each = -torch.nn.functional.logsigmoid(0.1 * gaps)
    assert torch.allclose(weighted, (2 * each[0] + 0.25 * each[1]) / 2.25)
    assert not torch.allclose(weighted, each.mean())


def test_older_rounds_weight_0_trains_on_the_newest_round_s_pairs_only(tiny_gpt2, tmp_path):
    rows = [{**row, "round": 1 + i % 3} for i, row in enumerate(style_pairs(12, seed=3))]  # rounds 1, 2, 3
    rows += [{**row, "round": None} for row in style_pairs(4, seed=4)]  # imported
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    newest_only = dpo.main(tiny_args(tiny_gpt2, train, tmp_path / "newest", eval_fraction=0.0,
                                     older_rounds_weight=0.0), lambda event: None)
    assert newest_only["dpo/train_pairs"] == 4 and newest_only["dpo/steps"] == 1
    every = dpo.main(tiny_args(tiny_gpt2, train, tmp_path / "every", eval_fraction=0.0, older_rounds_weight=0.5),
                     lambda event: None)
    assert every["dpo/train_pairs"] == 16


def test_a_long_pair_loses_the_start_of_its_prompt_then_the_end_of_its_reply():
    prompt, reply = list(range(10)), list(range(100, 110))
    assert dpo.fit_length(prompt, reply[:2], 12) == (prompt, reply[:2])
    assert dpo.fit_length(prompt, reply[:4], 12) == (prompt[2:], reply[:4])
    assert dpo.fit_length(prompt, reply, 12) == (prompt[4:], reply[:6])  # max_length // 2 prompt tokens stay


def test_it_refuses_label_smoothing_with_ipo_and_an_unknown_loss_before_loading_anything(tmp_path):
    from training.engine.common import EngineError

    for bad, said in (({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid loss only"),
                      ({"loss_type": "hinge"}, "unknown loss_type")):
        with pytest.raises(EngineError, match=said):
            dpo.main(dpo.DPOArgs(policy="missing", train="missing.jsonl", out=str(tmp_path / "out"), **bad))


# ---------------------------------------------------------------------------------------------
# The stage


def test_it_raises_held_out_accuracy_of_the_implicit_reward(tiny_gpt2, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(80, seed=0))
    events = []
    metrics = dpo.main(tiny_args(tiny_gpt2, train, tmp_path / "out", eval_fraction=0.2, beta=0.5), events.append)
    assert metrics["dpo/steps"] == 8 and metrics["dpo/eval_pairs"] >= 16
    first = next(e["metrics"] for e in events if e.get("step") == 1)
    assert abs(first["dpo/loss"] - 0.6931) < 1e-3  # step 1: the policy is its own reference
    assert metrics["dpo/eval_accuracy"] >= 0.9
    assert metrics["dpo/rewards_chosen"] > metrics["dpo/rewards_rejected"] and metrics["dpo/margin"] > 0
    assert metrics["dpo/loss"] < first["dpo/loss"]
    assert read_checkpoint_meta(tmp_path / "out")["stage"] == "dpo"
    assert not resume_dir(tmp_path / "out").exists()


def test_it_trains_a_chat_model_with_lora_and_checkpointing_into_a_merged_policy(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(40, seed=2))
    metrics = dpo.main(tiny_args(tiny_llama, train, tmp_path / "out", lora_r=8, gradient_checkpointing=True,
                                 loss_type="ipo", lr=5e-3, system_prompt="Answer briefly."))
    assert metrics["dpo/eval_accuracy"] >= 0.75
    assert (tmp_path / "out" / ADAPTER_DIR).is_dir()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_it_resumes_after_a_stop_to_the_uninterrupted_run_s_metrics_and_weights(tiny_gpt2, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(48, seed=3))
    whole = dpo.main(tiny_args(tiny_gpt2, train, tmp_path / "whole", epochs=2, eval_every=3))

    class Stop(Exception):
        pass

    def stop_at_4(event):
        if event.get("step") == 4:
            raise Stop

    args = tiny_args(tiny_gpt2, train, tmp_path / "cut", epochs=2, eval_every=3)
    with pytest.raises(Stop):
        dpo.main(args, stop_at_4)
    assert read_checkpoint_meta(resume_dir(tmp_path / "cut"))["step"] == 4
    events = []
    resumed = dpo.main(args, events.append)
    assert events[0]["step"] == 4 and "resumed" in events[0]["log"]
    assert {k: v for k, v in resumed.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in whole.items() if k not in TIMING_KEYS}
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Online DPO: fresh pairs of the policy's own samples, labelled by a reward source


@pytest.fixture
def shorter_is_better(monkeypatch) -> str:
    """A rule judge, rule:shorter, that prefers the shorter response (a preference a tiny random policy can learn)."""
    monkeypatch.setitem(demo_tasks.RULE_JUDGES, "shorter", lambda prompt, response: -float(len(response)))
    return "rule:shorter"


def online_args(policy: str, train: str, out: Path, judge: str, **overrides) -> dpo.DPOArgs:
    prompts = [task.instruction for task in demo_tasks.make_tasks(24, 5, "train")]
    return tiny_args(policy, train, out, reward_models=[judge], prompts=prompts, online_prompts=8,
                     online_samples=4, max_new_tokens=24, temperature=1.0, **overrides)


def test_online_pairs_hold_the_reward_s_best_sample_against_its_worst(tiny_gpt2, tmp_path, shorter_is_better):
    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(16, seed=1))
    run = dpo.setup(online_args(tiny_gpt2, train, tmp_path / "out", shorter_is_better), lambda event: None,
                    dpo.LoopTimer())
    dpo.refresh_online_pairs(run)
    pairs = run.online_pairs
    assert len(pairs) >= 6  # eight prompts, four samples each: a pair unless all four are as long
    decode = run.tokenizer.decode
    for pair in pairs:
        chosen, rejected = (decode(pair[side], skip_special_tokens=True).strip() for side in ("chosen", "rejected"))
        assert len(chosen) < len(rejected)
        assert pair["score_gap"] == len(rejected) - len(chosen)
        assert {"ref_chosen", "ref_rejected"} <= pair.keys()
    run.step = 1  # the next step samples afresh: other responses
    dpo.refresh_online_pairs(run)
    assert [p["chosen"] for p in run.online_pairs] != [p["chosen"] for p in pairs]


def test_online_dpo_trains_on_its_pairs_against_the_labelled_pairs_preference(tiny_gpt2, tmp_path, monkeypatch):
    # The labelled pairs prefer the shorter answer (padded ones are rejected); the reward prefers the longer one.
    monkeypatch.setitem(demo_tasks.RULE_JUDGES, "longer", lambda prompt, response: float(len(response)))
    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(96, seed=2))
    events = []
    metrics = dpo.main(online_args(tiny_gpt2, train, tmp_path / "out", "rule:longer", beta=0.5), events.append)
    steps = [e["metrics"] for e in events if e.get("stage") == "dpo" and "dpo/online_margin" in e["metrics"]]
    assert steps[0]["dpo/online_pairs"] >= 6 and steps[0]["dpo/online_score_gap"] > 0
    assert steps[0]["dpo/online_margin"] == 0  # step 1: the policy is its reference
    # Fresh samples every step, yet the policy's implicit reward comes to rank them as the reward does.
    later = [m["dpo/online_margin"] for m in steps[len(steps) // 2:]]
    assert sum(later) / len(later) > 0.2
    assert metrics["dpo/steps"] == len(steps)


def test_online_dpo_resumes_between_refreshes_to_the_uninterrupted_run_s_weights(tiny_gpt2, tmp_path,
                                                                               shorter_is_better):
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(48, seed=3))
    whole = dpo.main(online_args(tiny_gpt2, train, tmp_path / "whole", shorter_is_better, online_every=3))

    class Stop(Exception):
        pass

    def stop_at_4(event):  # step 4 trains on the pairs sampled at step 3 (from a policy the resumed run never sees)
        if event.get("step") == 4:
            raise Stop

    args = online_args(tiny_gpt2, train, tmp_path / "cut", shorter_is_better, online_every=3)
    with pytest.raises(Stop):
        dpo.main(args, stop_at_4)
    resumed = dpo.main(args)
    assert resumed["dpo/online_margin"] == whole["dpo/online_margin"] and whole["dpo/online_pairs"] > 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_online_dpo_trains_a_chat_model_under_lora_against_its_base(tiny_llama, tmp_path, shorter_is_better):
    train = write_jsonl(tmp_path / "pairs.jsonl", style_pairs(24, seed=4))
    args = online_args(tiny_llama, train, tmp_path / "out", shorter_is_better, lora_r=4, max_length=128)
    run = dpo.setup(args, lambda event: None, dpo.LoopTimer())
    assert run.online.reference is None  # no second copy: the LoRA model's base is the reference
    dpo.refresh_online_pairs(run)
    assert run.online_pairs and all(p["chosen"][-1] == p["rejected"][-1] for p in run.online_pairs)  # end of turn
    # Step 1: the adapters start at zero, so the policy's log-probs are its base's, the reference's.
    logps = dpo.sequence_logps(run.model, run.online_pairs, run.tokenizer.pad_token_id, run.ranks.device, None)
    assert torch.allclose(logps[0], torch.tensor([p["ref_chosen"] for p in run.online_pairs]), atol=1e-4)
    metrics = dpo.main(args)
    assert metrics["dpo/online_pairs"] > 0 and metrics["dpo/online_score_gap"] > 0
