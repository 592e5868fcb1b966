"""Tiny models of every common family: built offline, reloaded with the Auto classes, rendering chats
with the family's real template, stopping at its end-of-turn ids; decoder reward models that score a
padded batch like each row alone. The expected prompts are written out by hand from the families'
documented formats, so a reader can check them against the model cards."""

from __future__ import annotations

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from demo.tiny_models import (
    FAMILIES,
    POLICY_FAMILIES,
    REWARD_FAMILIES,
    TEMPLATE_DIR,
    build_policy,
    build_reward,
    build_tokenizer,
)
from training.engine.common import EngineError

CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And 4 + 4?"},
]
SYSTEM = {"role": "system", "content": "Answer with a number."}

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LLAMA_SYSTEM_HEADER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
EXPECTED_PROMPTS = {
    ("qwen2", False): (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5.<|im_end|>\n"
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    ("qwen2", True): (
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5.<|im_end|>\n"
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    ("llama", False): (
        LLAMA_SYSTEM_HEADER + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("llama", True): (
        LLAMA_SYSTEM_HEADER + "Answer with a number.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("gemma", False): (
        "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n"
        "<start_of_turn>model\n5.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 + 4?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    # Mistral's V3-Tekken format: no spaces around [INST], the system text before the last user turn.
    ("mistral", False): "<s>[INST]What is 2 + 3?[/INST]5.</s>[INST]And 4 + 4?[/INST]",
    ("mistral", True): "<s>[INST]What is 2 + 3?[/INST]5.</s>[INST]Answer with a number.\n\nAnd 4 + 4?[/INST]",
}

# generation_config.json's eos_token_id of each family's release (Instruct/IT for chat families).
EXPECTED_STOPS = {
    "gpt2": ["<|endoftext|>"],
    "gpt_neox": ["<|endoftext|>"],
    "llama": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "qwen2": ["<|im_end|>", "<|endoftext|>"],
    "mistral": ["</s>"],
    "gemma": ["<eos>", "<end_of_turn>"],
}
MODEL_TYPES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "qwen2": "qwen2",
               "mistral": "mistral", "gemma": "gemma2", "bert": "bert"}
CHAT_FAMILIES = ("llama", "qwen2", "mistral", "gemma")


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """Every policy family built once and reloaded with the Auto classes: {family: (model, tokenizer)}."""
    root = tmp_path_factory.mktemp("policies")
    loaded = {}
    for family in POLICY_FAMILIES:
        out = build_policy(family, root / family)
        loaded[family] = (AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out))
    return loaded


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    loaded = {}
    for family in REWARD_FAMILIES:
        out = build_reward(family, root / family)
        model = AutoModelForSequenceClassification.from_pretrained(out)
        loaded[family] = (model, AutoTokenizer.from_pretrained(out))
    return loaded


def render(tokenizer, messages):
    # date_string pins the date Llama 3's template would otherwise take from today's clock.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         date_string="26 Jul 2024")


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_it_reloads_every_policy_family_with_the_auto_classes(policies, family):
    model, tokenizer = policies[family]
    assert model.config.model_type == MODEL_TYPES[family]
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids.input_ids.shape[1], len(tokenizer))
    out = model.generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    assert out.shape == (1, ids.input_ids.shape[1] + 3)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1]:]).strip()


@pytest.mark.parametrize("family, reward",
                         [(f, False) for f in POLICY_FAMILIES] + [(f, True) for f in REWARD_FAMILIES])
def test_it_reloads_the_tokenizer_it_built(policies, rewards, family, reward):
    # transformers may rebuild a family's tokenizer from its own class on load (Qwen2's does):
    # the ids a model was built with must be the ids its saved tokenizer gives.
    _, reloaded = (rewards if reward else policies)[family]
    built = build_tokenizer(family, reward=reward)
    texts = ["Sort these words: pear, apple, fig.", "What is 1234 + 56?\n\n  Ünïcode 9.",
             "<|im_end|> [INST] <eos>"]
    assert [reloaded(t).input_ids for t in texts] == [built(t).input_ids for t in texts]
    assert (reloaded.eos_token, reloaded.pad_token) == (built.eos_token, built.pad_token)
    assert len(reloaded) == len(built)


@pytest.mark.parametrize("family, with_system", sorted(EXPECTED_PROMPTS))
def test_it_renders_each_familys_real_chat_template(policies, family, with_system):
    _, tokenizer = policies[family]
    messages = [SYSTEM, *CHAT] if with_system else CHAT
    assert render(tokenizer, messages) == EXPECTED_PROMPTS[family, with_system]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_it_saves_the_template_byte_for_byte(policies, family):
    _, tokenizer = policies[family]
    assert tokenizer.chat_template.encode() == (TEMPLATE_DIR / FAMILIES[family].template).read_bytes()


def test_it_refuses_a_system_turn_as_gemma_2_does(policies):
    _, tokenizer = policies["gemma"]
    with pytest.raises(TemplateError, match="System role not supported"):
        render(tokenizer, [SYSTEM, *CHAT])


@pytest.mark.parametrize("family", ("gpt2", "gpt_neox"))
def test_it_leaves_base_models_without_a_chat_template(policies, family):
    _, tokenizer = policies[family]
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_it_keeps_each_special_token_one_id(policies, family):
    _, tokenizer = policies[family]
    spec = FAMILIES[family]
    specials = {t for t in (spec.bos, spec.eos, spec.pad, spec.unk, *spec.extra) if t}
    for token in specials:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    if spec.template:
        # In a rendered chat too: every turn marker the text holds is one id, none split by BPE.
        text = render(tokenizer, CHAT)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for token in specials:
            assert ids.count(tokenizer.convert_tokens_to_ids(token)) == text.count(token)
        assert sum(text.count(token) for token in specials) >= 4


@pytest.mark.parametrize("family", ("llama", "mistral", "gemma"))
def test_it_puts_bos_first_when_the_family_does(policies, family):
    _, tokenizer = policies[family]
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    # The chat template writes bos itself; apply_chat_template tokenizes without adding another.
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, date_string="26 Jul 2024",
                                        return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_it_lists_the_end_of_turn_ids_in_the_generation_config(policies, family):
    model, tokenizer = policies[family]
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    assert tokenizer.convert_ids_to_tokens(stop) == EXPECTED_STOPS[family]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_it_stops_generating_at_each_end_of_turn_id(policies, family):
    model, tokenizer = policies[family]
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                        date_string="26 Jul 2024", return_dict=True)
    prompt_len = ids["input_ids"].shape[1]
    for token in EXPECTED_STOPS[family]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        # Push the untrained model towards the stop token; generation must end right after it.
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, sequence_bias={(token_id,): 100.0})
        assert out[0, prompt_len:].tolist() == [token_id]
    # With another stop id than the generation config's, the same push runs to max_new_tokens.
    first_stop = tokenizer.convert_tokens_to_ids(EXPECTED_STOPS[family][0])
    plain_id = tokenizer.convert_tokens_to_ids("a")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, eos_token_id=plain_id,
                         sequence_bias={(first_stop,): 100.0})
    assert out[0, prompt_len:].tolist() == [first_stop] * 5


# BERT pads on the right only: its absolute positions would shift under left padding.
@pytest.mark.parametrize("family, side", [("bert", "right"), ("llama", "right"), ("llama", "left"),
                                          ("qwen2", "right"), ("qwen2", "left")])
def test_it_scores_a_padded_batch_like_each_row_alone(rewards, family, side):
    model, tokenizer = rewards[family]
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    if family == "bert":
        texts = ["What is 2 + 3? 5.", "Sort these words: pear, apple, fig. apple, fig, pear, in order."]
    else:
        # Scored texts end with the end-of-turn token, which must not be mistaken for padding.
        answer = {"role": "assistant", "content": "8, as four and four make eight."}
        texts = [tokenizer.apply_chat_template(chat, tokenize=False, date_string="26 Jul 2024")
                 for chat in (CHAT[:2], [*CHAT, answer])]
        assert tokenizer.pad_token != tokenizer.eos_token
    tokenizer.padding_side = side
    add_special = family == "bert"  # [CLS] ... [SEP]; the chat templates already wrote bos
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        together = model(**batch).logits[:, 0]
        rows = [tokenizer(t, return_tensors="pt", add_special_tokens=add_special) for t in texts]
        alone = torch.stack([model(**row).logits[0, 0] for row in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert together[0] != together[1]


def test_it_builds_bigger_models_from_size_overrides(tmp_path):
    wide = {"hidden": 96, "layers": 3, "heads": 6, "kv_heads": 3}
    out = build_policy("llama", tmp_path / "wide", size=wide)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (96, 3, 3)
    with pytest.raises(EngineError, match="unknown size keys"):
        build_policy("llama", tmp_path / "bad", size={"width": 96})
    with pytest.raises(EngineError, match="unknown policy family"):
        build_policy("bert", tmp_path / "bert")


def test_it_reproduces_weights_from_the_seed(tmp_path):
    def weights(seed, name):
        out = build_reward("qwen2", tmp_path / name, seed=seed)
        return AutoModelForSequenceClassification.from_pretrained(out).score.weight

    assert torch.equal(weights(0, "a"), weights(0, "b"))
    assert not torch.equal(weights(0, "a"), weights(1, "c"))
