"""A round on a team's own chat model, end to end with a real Celery worker: a campaign names a tiny
Qwen2-shaped chat model (random weights, a local tokenizer, Qwen2.5's real ChatML template), its
prompts are conversations, and the round trains the reward model, PPO and sampling in that template
(DPO and GRPO rounds too, with LoRA on two training processes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from annotate.actions import PairInput, add_pairs
from annotate.models import Campaign, Prompt, Response
from demo.simulate import make_judge, simulate_labelers
from demo.tiny_models import build_policy, build_reward
from tests.conftest import make_user
from tests.test_round_worker import round_over, tiny_world, wait_for, weights  # noqa: F401 - tiny_world is a fixture
from tests.worker import Worker
from training import actions
from training.config import build_config
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import load_tokenizer
from training.engine.sample import sample_responses
from training.models import Job
from training.runner import ppo_prompts

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SYSTEM = "Answer in one short sentence."


def conversations(n: int) -> list[list[dict[str, str]]]:
    """Chat prompts: one user turn, or a user turn, a reply and a follow-up."""
    prompts = []
    for i in range(n):
        question = {"role": "user", "content": f"What is {i} plus {i + 1}?"}
        if i % 3:
            prompts.append([question])
        else:
            prompts.append([question, {"role": "assistant", "content": f"{2 * i + 1}."},
                            {"role": "user", "content": "Say it as a sentence."}])
    return prompts


def ends_at_once_often(policy: Path, share: float = 0.4, temperature: float = 0.7) -> Path:
    """Make a tiny random Llama 3 policy end about `share` of its answers at once: its blocks write nothing to
    the residual stream (each next token then depends on the last token alone, the same generation-prompt
    token for every prompt) and its <|eot_id|> row of the LM head points at that token's hidden state, with
    the logit that gives that share at `temperature` against the rest of the vocabulary."""
    from transformers import AutoModelForCausalLM

    from training.engine.common import render_prompt

    model = AutoModelForCausalLM.from_pretrained(policy)
    tokenizer = load_tokenizer(str(policy))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        last = tokenizer(render_prompt(tokenizer, "Hi", system_prompt=SYSTEM), add_special_tokens=False)["input_ids"][-1]
        hidden = model.model.norm(model.model.embed_tokens.weight[last])
        logit = temperature * math.log(share / (1 - share) * (model.config.vocab_size - 1))
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|eot_id|>")] = logit * hidden / hidden.dot(hidden)
    model.save_pretrained(policy)
    return policy


def chat_campaign(folder, slug: str = "chat", family: str = "qwen2", n_prompts: int = 12,
                  reshape=lambda policy: policy) -> tuple[Campaign, str, list]:
    """A campaign on a tiny chat policy (Qwen2's by default; `reshape` changes its weights first), with seed
    pairs judged by a simulated labeler."""
    policy = reshape(build_policy(family, folder / "policy"))
    campaign = Campaign.objects.create(slug=slug, name=slug, overlap=1, policy_model=str(policy),
                                       system_prompt=SYSTEM, max_new_tokens=12, stop_strings="###")
    prompts = conversations(n_prompts)
    samples = sample_responses(str(policy), prompts, num_per_prompt=3, max_new_tokens=12, temperature=1.0, seed=0,
                               system_prompt=SYSTEM, stop_strings=["###"], device="cpu")
    items = []
    for prompt, responses in zip(prompts, samples):
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        items += [PairInput(prompt, a, b) for a, b in zip(distinct, distinct[1:])]
    add_pairs(campaign, items, source=Response.SEED, checkpoints=(str(policy), str(policy)), notify=False)
    judge = make_judge(f"rm:{build_reward(family, folder / 'judge')}", device="cpu")
    simulate_labelers(campaign, judge, noise=0.0, count=1000)
    assert actions.usable_judgments(campaign) >= 10
    return campaign, policy, prompts


def test_a_round_trains_and_samples_a_chat_model_in_its_own_template(tiny_world, tmp_path_factory, client):
    campaign, policy, prompts = chat_campaign(tmp_path_factory.mktemp("chat-models"))

    # The launch form offers what the campaign names; the round runs on the tiny preset with them.
    config = build_config("tiny", actions.campaign_settings(campaign))
    assert (config.system_prompt, config.ppo_max_new_tokens, config.stop_list()) == (SYSTEM, 12, ["###"])
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 600, worker, "the chat round to finish")
    round_.refresh_from_db()
    assert round_.parent_policy == str(policy) and round_.config["base_policy"] == str(policy)

    tokenizer = load_tokenizer(str(policy))
    first = ppo_prompts(campaign)[0]
    expected = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *first], tokenize=False,
                                             add_generation_prompt=True)
    ppo_job, sample_job, enqueue_job = jobs[2], jobs[3], jobs[4]
    assert ppo_job.result["rendered_prompt"] == expected
    assert "The first prompt as the policy sees it:" in ppo_job.log  # each line of it is in the log too
    assert all(f"] {line}\n" in ppo_job.log for line in expected.splitlines())
    assert sample_job.result["rendered_prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert sample_job.result["generation"]["stop_strings"] == ["###"]
    # The trained policy keeps the chat template it was given.
    assert load_tokenizer(round_.policy_checkpoint).chat_template == tokenizer.chat_template

    # Its new pairs keep the conversations: the prompts they belong to hold the turns.
    new_pairs = campaign.pairs.filter(round=round_).select_related("prompt", "response_a", "response_b")
    assert enqueue_job.result["created"] == new_pairs.count() > 0
    multi_turn = [p for p in new_pairs if p.prompt.turns and len(p.prompt.turns) == 3]
    assert multi_turn and Prompt.objects.filter(campaign=campaign).count() == len(prompts)
    # A response the 12-token limit cut is marked so.
    cut = sum((s["new_cut"] + (s.get("other_cut") or [])).count(True) for s in sample_job.result["samples"])
    stored = {r.pk: r for p in new_pairs for r in (p.response_a, p.response_b)}  # either side may be the new one's
    assert sum(bool(r.generation.get("truncated")) for r in stored.values()) <= cut

    # The round page shows that prompt as the model saw it, as text.
    client.force_login(make_user("admin", is_staff=True, is_superuser=True))
    page = client.get(round_.get_absolute_url()).content.decode()
    assert "The first prompt exactly as the model saw it" in page
    assert "&lt;|im_start|&gt;system\nAnswer in one short sentence.&lt;|im_end|&gt;" in page


def test_a_lora_round_on_two_training_processes(tiny_world, tmp_path_factory):
    """PAIRLOOP_TRAINING_PROCESSES=2: the reward and PPO jobs run under accelerate launch (gloo on CPU), with LoRA."""
    from transformers import AutoModelForCausalLM

    campaign, policy, _ = chat_campaign(tmp_path_factory.mktemp("chat-lora"), slug="chat-lora")
    config = build_config("tiny", {**actions.campaign_settings(campaign), "lora_r": "4"})
    with Worker(env={**tiny_world["env"], "PAIRLOOP_TRAINING_PROCESSES": "2"}, purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 600, worker, "the LoRA round on two processes to finish")
    round_.refresh_from_db()
    reward_job, ppo_job = jobs[1], jobs[2]
    assert "reward on 2 processes" in reward_job.log and "ppo on 2 processes" in ppo_job.log
    assert ppo_job.result["ppo/kl"] != 0 and ppo_job.step == config.ppo_steps  # the policy moved off its reference
    # The saved policy: merged weights any transformers user loads, and the adapter beside them.
    assert (Path(round_.policy_checkpoint) / "adapter" / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(round_.policy_checkpoint).config.model_type == "qwen2"
    assert campaign.pairs.filter(round=round_).exists()


def test_a_round_sharded_with_fsdp_on_two_training_processes(tiny_world, tmp_path_factory):
    """The round setting fsdp with PAIRLOOP_TRAINING_PROCESSES=2: the reward and PPO jobs train every weight sharded
    over two processes (gloo on CPU) and save whole models the Auto classes load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    campaign, policy, _ = chat_campaign(tmp_path_factory.mktemp("chat-fsdp"), slug="chat-fsdp")
    config = build_config("tiny", {**actions.campaign_settings(campaign), "fsdp": "true"})
    with Worker(env={**tiny_world["env"], "PAIRLOOP_TRAINING_PROCESSES": "2"}, purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 600, worker, "the FSDP round on two processes to finish")
    round_.refresh_from_db()
    reward_job, ppo_job = jobs[1], jobs[2]
    assert "reward on 2 processes" in reward_job.log and "ppo on 2 processes" in ppo_job.log
    assert ppo_job.result["ppo/kl"] != 0 and ppo_job.step == config.ppo_steps  # the policy moved off its reference
    assert read_checkpoint_meta(round_.policy_checkpoint)["args"]["fsdp"] is True
    start, trained = weights(round_.parent_policy), weights(round_.policy_checkpoint)
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    assert AutoModelForCausalLM.from_pretrained(round_.policy_checkpoint).config.model_type == "qwen2"
    assert AutoModelForSequenceClassification.from_pretrained(round_.reward_checkpoint).config.num_labels == 1
    assert campaign.pairs.filter(round=round_).exists()


def test_a_dpo_and_a_grpo_round_of_a_chat_model_with_lora_on_two_training_processes(tiny_world, tmp_path_factory):
    """Each new round type on the chat campaign with LoRA over PAIRLOOP_TRAINING_PROCESSES=2 (gloo on CPU): a DPO
    round, then a GRPO round from its policy."""
    from transformers import AutoModelForCausalLM

    campaign, policy, _ = chat_campaign(tmp_path_factory.mktemp("chat-dpo-grpo"), slug="chat-dpo-grpo")
    chosen = {**actions.campaign_settings(campaign), "lora_r": "4"}
    env = {**tiny_world["env"], "PAIRLOOP_TRAINING_PROCESSES": "2"}
    configs = {algorithm: build_config("tiny", {**chosen, "algorithm": algorithm}) for algorithm in ("dpo", "grpo")}
    rounds = {}
    with Worker(env=env, purge=True) as worker:
        for algorithm, config in configs.items():
            # The GRPO round follows with nothing new labeled: forced.
            round_ = actions.launch_round(campaign, None, config, force=True)
            jobs = wait_for(lambda: round_over(round_), 600, worker, f"the {algorithm} round to finish")
            round_.refresh_from_db()
            rounds[algorithm] = (round_, {job.kind: job for job in jobs})
    dpo_round, dpo_jobs = rounds["dpo"]
    grpo_round, grpo_jobs = rounds["grpo"]
    assert grpo_round.parent_policy == dpo_round.policy_checkpoint  # iterative: GRPO starts where DPO ended
    assert "dpo on 2 processes" in dpo_jobs["dpo"].log and "grpo on 2 processes" in grpo_jobs["grpo"].log
    assert "reward on 2 processes" in grpo_jobs["reward"].log
    assert dpo_jobs["dpo"].step == dpo_jobs["dpo"].total_steps > 0 and grpo_jobs["grpo"].step == configs["grpo"].grpo_steps
    for round_, jobs in rounds.values():
        meta = read_checkpoint_meta(round_.policy_checkpoint)
        assert meta["stage"] == round_.config["algorithm"] and meta["args"]["lora_r"] == 4
        start, trained = weights(round_.parent_policy), weights(round_.policy_checkpoint)
        assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)  # the adapter trained
        # Merged weights any transformers user loads, the adapter beside them, the chat template kept.
        assert (Path(round_.policy_checkpoint) / "adapter" / "adapter_config.json").exists()
        assert AutoModelForCausalLM.from_pretrained(round_.policy_checkpoint).config.model_type == "qwen2"
        assert load_tokenizer(round_.policy_checkpoint).chat_template == load_tokenizer(str(policy)).chat_template
        # Its pairs were sampled in the template.
        assert jobs["sample"].result["rendered_prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        assert jobs["enqueue"].result["created"] == campaign.pairs.filter(round=round_).count() > 0
    # The round page's "as the model saw it": GRPO's whole turn; DPO's cut from the start to the tiny dpo_max_length.
    assert grpo_jobs["grpo"].result["rendered_prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert dpo_jobs["dpo"].result["rendered_prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_round_whose_policy_ends_some_answers_at_once_enqueues_only_real_ones(tiny_world, tmp_path_factory,
                                                                               client):
    """Any model may end its turn at once: the empty answers are counted and shown, never scored or paired."""
    campaign, policy, _ = chat_campaign(tmp_path_factory.mktemp("chat-empty"), slug="chat-empty", family="llama",
                                        n_prompts=24, reshape=ends_at_once_often)
    config = actions.launch_config(campaign, "tiny")
    with Worker(env=tiny_world["env"], purge=True) as worker:
        round_ = actions.launch_round(campaign, None, config)
        jobs = wait_for(lambda: round_over(round_), 600, worker, "the round with empty answers to finish")
    sample_job, enqueue_job = jobs[3], jobs[4]
    samples = sample_job.result["samples"]
    empty_new = sum(r == "" for s in samples for r in s["new"])
    empty_other = sum(r == "" for s in samples for r in s["other"])
    answers = sum(len(s["new"]) + len(s["other"]) for s in samples)
    assert 0 < empty_new + empty_other < answers  # some answers really were empty, not all
    assert (sample_job.result["sample/empty_new"], sample_job.result["sample/empty_opponent"]) == (empty_new,
                                                                                                  empty_other)
    assert enqueue_job.result["empty"] == empty_new + empty_other
    assert sample_job.result["sample/reward_new"] is not None
    new_pairs = campaign.pairs.filter(round=round_).select_related("response_a", "response_b")
    assert enqueue_job.result["created"] == new_pairs.count() > 0
    assert all(p.response_a.text.strip() and p.response_b.text.strip() for p in new_pairs)
    assert Job.objects.get(pk=sample_job.pk).status == Job.SUCCEEDED

    client.force_login(make_user("admin", is_staff=True, is_superuser=True))
    page = client.get(round_.get_absolute_url()).content.decode()
    assert f"<strong>{empty_new} / {empty_other}</strong>empty answers" in page and "(empty answer)" in page
