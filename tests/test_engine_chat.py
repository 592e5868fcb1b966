"""A team's own chat model through every stage: prompts in its chat template, replies alone trained,
generation stopping at its end-of-turn tokens, and each family trained one step, saved and reloaded.

The models are tiny and random-initialised from each family's config, with a locally trained
tokenizer and the family's real chat template (demo/tiny_models.py): nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demo.tiny_models import POLICY_FAMILIES, REWARD_FAMILIES, build_policy, build_reward
from training.engine import ppo, reward, sft
from training.engine.common import (
    EngineError,
    has_chat_template,
    load_causal_lm,
    render_prompt,
    stop_token_ids,
)
from training.engine.sample import generate, sample_with_stats

CHAT_FAMILIES = ("llama", "qwen2", "mistral", "gemma")
BASE_FAMILIES = ("gpt2", "gpt_neox")
CONVERSATION = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Green, like grass."},
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("policies")
    return {family: build_policy(family, folder / family) for family in POLICY_FAMILIES}


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reward-models")
    return {family: build_reward(family, folder / family) for family in REWARD_FAMILIES}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_a_prompt_is_rendered_exactly_as_the_family_s_chat_template_renders_it(policies, family):
    _, tokenizer = load_causal_lm(str(policies[family]), CPU)
    conversation = CONVERSATION[:3]
    assert render_prompt(tokenizer, conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    # A text prompt is one user turn; the campaign's system prompt goes first.
    with_system = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi?"}]
    if family == "gemma":  # Gemma 2's template has no system role: it opens the first user turn instead
        with_system = [{"role": "user", "content": "Answer in one word.\n\nHi?"}]
    assert render_prompt(tokenizer, "Hi?", system_prompt="Answer in one word.") == tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_a_base_model_without_a_template_gets_the_instruction_template(policies, family):
    _, tokenizer = load_causal_lm(str(policies[family]), CPU)
    assert not has_chat_template(tokenizer)
    assert render_prompt(tokenizer, "Name a colour.").endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert render_prompt(tokenizer, CONVERSATION[:1]) == render_prompt(tokenizer, "Name a colour.")


@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma"))
def test_sft_labels_only_the_assistant_replies_of_a_multi_turn_conversation(policies, family):
    _, tokenizer = load_causal_lm(str(policies[family]), CPU)
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    ids, labels = sft.encode_chat(tokenizer, conversation)
    if family == "gemma":
        conversation = [{"role": "user", "content": "Be brief.\n\nName a colour."}, *CONVERSATION[1:]]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert tokenizer.decode(ids) == rendered  # the whole conversation, as the template writes it
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != sft.IGNORE_INDEX])
    end = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>\n", "gemma": "<end_of_turn>\n"}[family]
    assert trained == f"Blue.{end}Green, like grass.{end}"
    masked = tokenizer.decode([i for i, label in zip(ids, labels) if label == sft.IGNORE_INDEX])
    for text in ("Be brief.", "Name a colour.", "And another?"):
        assert text in masked


def test_sft_refuses_a_conversation_for_a_model_without_a_template(policies, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(EngineError, match="need a model with a chat template"):
        sft.main(sft.SFTArgs(model=str(policies["gpt2"]), train=data, out=str(tmp_path / "out"), max_steps=1,
                             device="cpu"))


def _forcing(model, token_id: int):
    """Make `token_id` the most likely next token at every position (a hook on the LM head)."""
    def hook(_module, _inputs, logits):
        logits[..., token_id] += 1000.0
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def test_generation_stops_at_im_end_when_the_generation_config_lists_it(policies):
    model, tokenizer = load_causal_lm(str(policies["qwen2"]), CPU)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer, model)
    prompt = render_prompt(tokenizer, "Name a colour.")
    with _forcing(model, im_end):
        rollout = generate(model, tokenizer, [prompt], max_new_tokens=8, temperature=0)
        assert rollout.ended.tolist() == [True]
        assert rollout.response_ids[0, : int(rollout.response_mask.sum())].tolist() == [im_end]
        assert rollout.texts == [""]
        # Without <|im_end|> among the stop ids (a tokenizer whose eos is another token, and a generation
        # config that does not list it), the same model runs on to the length limit, and says so.
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        tokenizer.eos_token = "<|endoftext|>"
        rollout = generate(model, tokenizer, [prompt], max_new_tokens=8, temperature=0)
    assert rollout.ended.tolist() == [False]
    assert int(rollout.response_mask.sum()) == 8


def test_a_stop_string_ends_a_response_and_is_cut_from_its_text(policies):
    model, tokenizer = load_causal_lm(str(policies["qwen2"]), CPU)
    prompt = render_prompt(tokenizer, "Name a colour.")
    def run(seed, **kwargs):
        return generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    seed = next(seed for seed in range(50) if len(run(seed).texts[0].strip()) > 8)  # a long enough response
    free = run(seed)
    text = free.texts[0]
    stop = text.strip()[4:7]
    stopped = run(seed, stop_strings=[stop])
    assert stopped.ended.tolist() == [True]
    assert stop not in stopped.texts[0]
    assert text.startswith(stopped.texts[0])
    assert int(stopped.response_mask.sum()) < int(free.response_mask.sum())


def test_sampling_records_the_rendered_prompt_and_which_responses_the_length_limit_cut(policies):
    conversation = [{"role": "user", "content": "Name a colour."}]
    responses, stats, truncated = sample_with_stats(str(policies["qwen2"]), [conversation, "Hi?"], num_per_prompt=2,
                                                    max_new_tokens=4, seed=0, device="cpu",
                                                    system_prompt="Be brief.")
    assert len(responses) == 2 and all(len(r) == 2 for r in responses)
    assert stats["sample/rendered_prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # A random model rarely ends within 4 tokens: every response it did not end is marked as cut.
    assert sum(cut for row in truncated for cut in row) == round((1 - stats["sample/ended_fraction"]) * 4)


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_every_stage_trains_each_policy_family_one_step_and_the_saves_reload(policies, reward_models, family,
                                                                             tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(policies[family])
    chat = family in CHAT_FAMILIES
    rows = ([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}] * 2 if chat else
            [{"instruction": "Name a colour.", "output": "Blue."}] * 4)
    sft_out = tmp_path / "sft"
    metrics = sft.main(sft.SFTArgs(model=base, train=write_jsonl(tmp_path / "sft.jsonl", rows), out=str(sft_out),
                                   max_steps=1, batch_size=4, lr=1e-3, device="cpu"))
    assert metrics["sft/steps"] == 1 and metrics["sft/loss"] > 0
    AutoModelForCausalLM.from_pretrained(sft_out)

    prompts = [CONVERSATION[:1], CONVERSATION[:3], "Name a fruit.", "Name a tree."]
    ppo_out = tmp_path / "ppo"
    metrics = ppo.main(ppo.PPOArgs(policy=str(sft_out), reward_models=[str(reward_models["qwen2"])], prompts=prompts,
                                   out=str(ppo_out), steps=1, batch_size=4, samples_per_prompt=2,
                                   max_new_tokens=6, save_every=0, device="cpu", system_prompt="Be brief."))
    assert metrics["ppo/rendered_prompt"] == render_prompt(AutoTokenizer.from_pretrained(sft_out), prompts[0],
                                                           system_prompt="Be brief.")
    model = AutoModelForCausalLM.from_pretrained(ppo_out)
    assert model.config.model_type == AutoModelForCausalLM.from_pretrained(base).config.model_type
    responses, _, _ = sample_with_stats(str(ppo_out), prompts[:2], num_per_prompt=1, max_new_tokens=4, device="cpu")
    assert len(responses) == 2


@pytest.mark.parametrize("family", REWARD_FAMILIES)
def test_each_reward_family_trains_on_conversations_and_reloads(reward_models, family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = []
    for n in range(16):
        prompt = [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": "Which part?"},
                  {"role": "user", "content": "The first."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Answer {n}, in full."}],
                     "rejected": [{"role": "assistant", "content": "No."}], "margin": 0.5})
    out = tmp_path / "rm"
    metrics = reward.main(reward.RewardArgs(train=write_jsonl(tmp_path / "pairs.jsonl", rows),
                                            model=str(reward_models[family]), out=str(out), batch_size=4,
                                            max_length=96, eval_fraction=0.25, eval_every=0, save_every=0,
                                            device="cpu"))
    assert metrics["rm/train_pairs"] == 12
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 1
    scorer = reward.RewardScorer(str(out), device="cpu")
    scores = scorer.score([rows[0]["prompt"], rows[1]["prompt"]], ["Answer 0, in full.", "No."])
    alone = scorer.score([rows[1]["prompt"]], ["No."])
    assert torch.allclose(scores[1:], alone, atol=1e-5)  # padding beside a longer row changes nothing


def test_a_chat_reward_model_sees_the_conversation_in_its_template(reward_models):
    scorer = reward.RewardScorer(str(reward_models["qwen2"]), device="cpu")
    prompt = [{"role": "user", "content": "Name a colour."}]
    (ids, _), = scorer.encoder.encode([prompt], ["Blue."])[0]
    assert scorer.tokenizer.decode(ids) == scorer.tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "Blue."}], tokenize=False)
