"""The Bradley-Terry reward model: the loss and its gradients, learning a rule, exact resume,
the offline MiniLM backbone, truncation of long pairs, and clear errors before any step.
Tiny BERT/GPT-2 models built from configs; CPU, a few seconds each; no network, no ../shared."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import EngineError, default_reward_backbone, load_reward_model
from training.engine.reward import (
    PairEncoder,
    RewardArgs,
    RewardScorer,
    batch_order,
    bradley_terry_loss,
    main,
    pair_weights,
    resume_dir,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while dogs ran in green fields under blue sky and birds sang over old "
         "red houses near quiet rivers where children play with small boats every summer day").split()
TIMING_KEYS = {"rm/pairs_per_second", "rm/train_seconds", "rm/loop_seconds", "rm/loop_cpu_seconds"}


def tiny_bert(path: Path, max_positions: int = 128) -> str:
    """A 2-layer, 32-wide BERT classifier with the MiniLM's own tokenizer, saved as a local checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(default_reward_backbone())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_positions, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def word_tokenizer(specials: dict[str, str]):
    """A word-level fast tokenizer over WORDS, with only the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials.values(), *WORDS, "marker"]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def tiny_gpt2(path: Path, specials: dict[str, str]) -> str:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = word_tokenizer(specials)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=1)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "tiny")


def rule_pairs(n_prompts: int, per_prompt: int, seed: int) -> list[dict]:
    """Chosen responses contain the word 'marker', rejected ones do not; otherwise random words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        prompt = f"question {i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        for _ in range(per_prompt):
            rejected = rng.choices(WORDS, k=rng.randint(4, 12))
            chosen = rng.choices(WORDS, k=rng.randint(4, 12))
            chosen.insert(rng.randrange(len(chosen) + 1), "marker")
            rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tiny_args(train: str, model: str, out: Path, **overrides) -> RewardArgs:
    settings = dict(train=train, model=model, out=str(out), epochs=1, lr=1e-3, batch_size=8, max_length=64,
                    eval_fraction=0.2, eval_every=0, log_every=2, save_every=0, device="cpu", seed=0)
    settings.update(overrides)
    return RewardArgs(**settings)


def test_a_pair_from_an_older_round_weighs_older_rounds_weight_to_the_k_times_its_truncation_weight(
        bert_path, tmp_path):
    pairs = [{"truncated": False, "round_weight": 1.0}, {"truncated": True, "round_weight": 0.25}]
    weight = pair_weights(RewardArgs(truncated_weight=0.5, older_rounds_weight=0.5), pairs, torch.device("cpu"))
    assert weight.tolist() == [1.0, 0.125]
    assert pair_weights(RewardArgs(), pairs, torch.device("cpu")) is None

    rows = [{**row, "round": 1 + i % 3} for i, row in enumerate(rule_pairs(6, 2, seed=5))]  # rounds 1, 2, 3
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    newest_only = main(tiny_args(train, bert_path, tmp_path / "newest", eval_fraction=0.0, older_rounds_weight=0.0))
    assert newest_only["rm/train_pairs"] == 4


def weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


# ---------------------------------------------------------------------------------------------


def test_it_computes_the_bradley_terry_loss_and_its_gradient_signs():
    r_chosen = torch.tensor([1.0, -0.5], requires_grad=True)
    r_rejected = torch.tensor([0.0, 0.5], requires_grad=True)
    loss, terms = bradley_terry_loss(r_chosen, r_rejected)
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (r_chosen.grad < 0).all(), "gradient descent must raise the chosen reward"
    assert (r_rejected.grad > 0).all(), "gradient descent must lower the rejected reward"

    # A margin makes the same rewards a worse fit, and pushes harder.
    gap_chosen = torch.tensor([1.0], requires_grad=True)
    plain, _ = bradley_terry_loss(gap_chosen, torch.tensor([0.0]))
    (plain_grad,) = torch.autograd.grad(plain, gap_chosen)
    strict, _ = bradley_terry_loss(gap_chosen, torch.tensor([0.0]), margin=torch.tensor([1.0]))
    (strict_grad,) = torch.autograd.grad(strict, gap_chosen)
    assert strict.item() == pytest.approx(math.log(2), rel=1e-6)  # -log sigmoid(1 - 0 - 1)
    assert strict.item() > plain.item()
    assert strict_grad.abs().item() > plain_grad.abs().item()

    # The centering term is coef * mean((r_c + r_r)^2), reported on its own.
    centered, parts = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.01)
    assert parts["center_loss"].item() == pytest.approx(0.09)
    assert centered.item() == pytest.approx(parts["bt_loss"].item() + 0.09)


def test_it_learns_a_rule_based_preference_to_95_percent_held_out(bert_path, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(n_prompts=120, per_prompt=3, seed=1))
    held_out = write_jsonl(tmp_path / "held.jsonl", rule_pairs(n_prompts=40, per_prompt=2, seed=2))
    events = []
    metrics = main(tiny_args(train, bert_path, tmp_path / "rm", eval=held_out, epochs=2, batch_size=16,
                             eval_every=20), events.append)
    assert metrics["rm/accuracy"] >= 0.95, metrics
    assert metrics["rm/chosen_reward"] > metrics["rm/rejected_reward"]
    first_logged = next(e["metrics"]["rm/loss"] for e in events if "rm/loss" in e["metrics"])
    assert metrics["rm/loss"] < first_logged
    assert {"rm/loss", "rm/accuracy", "rm/chosen_reward", "rm/rejected_reward", "rm/margin",
            "rm/pairs_per_second"} <= set(metrics)
    assert events[-1]["step"] == events[-1]["total"] == metrics["rm/steps"]
    # The saved model scores like the trained one: the chosen side wins on new text.
    scorer = RewardScorer(tmp_path / "rm", device="cpu")
    scores = scorer.score(["question 999 the cat"] * 2, ["the dog ran marker home", "the dog ran home"])
    assert scores.shape == (2,) and scores[0] > scores[1]
    meta = read_checkpoint_meta(tmp_path / "rm")
    assert meta["stage"] == "reward" and meta["data_version"] and meta["metrics"]["rm/accuracy"] >= 0.95
    assert not resume_dir(tmp_path / "rm").exists()


def test_it_warms_the_learning_rate_up_over_a_tenth_of_the_steps_then_decays_it_to_zero(bert_path, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(n_prompts=50, per_prompt=2, seed=4))
    events = []
    metrics = main(tiny_args(train, bert_path, tmp_path / "rm", log_every=1, eval_fraction=0.2), events.append)
    lrs = [e["metrics"]["rm/lr"] for e in events if "rm/lr" in e["metrics"]]
    assert len(lrs) == metrics["rm/steps"] == 10  # 80 training pairs, 8 a step: one of them warms up
    assert lrs[0] == pytest.approx(1e-3)  # the peak once its one warm-up step is done
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0
    cold = []
    main(tiny_args(train, bert_path, tmp_path / "cold", log_every=1, eval_fraction=0.2, warmup_ratio=0.5), cold.append)
    ramp = [e["metrics"]["rm/lr"] for e in cold if "rm/lr" in e["metrics"]]
    assert ramp[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3]) and ramp[-1] == 0.0


def test_it_resumes_to_the_same_weights_and_metrics_as_an_uninterrupted_run(bert_path, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(n_prompts=30, per_prompt=2, seed=3))
    whole = main(tiny_args(train, bert_path, tmp_path / "whole", epochs=2, eval_every=3))

    class Stop(Exception):
        pass

    def stop_at_5(event):
        if event.get("step") == 5:
            raise Stop

    args = tiny_args(train, bert_path, tmp_path / "cut", epochs=2, eval_every=3)
    with pytest.raises(Stop):
        main(args, stop_at_5)
    assert read_checkpoint_meta(resume_dir(tmp_path / "cut"))["step"] == 5
    assert not (tmp_path / "cut").exists()
    resumed_events = []
    resumed = main(args, resumed_events.append)
    assert resumed_events[0]["step"] == 5 and "resumed" in resumed_events[0]["log"]
    assert {k: v for k, v in resumed.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in whole.items() if k not in TIMING_KEYS}
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], weights(bert_path)["classifier.weight"])


def test_it_loads_the_minilm_backbone_offline_with_one_output(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tokenizer = load_reward_model(default_reward_backbone(), torch.device("cpu"))
    assert model.config.num_labels == 1 and model.config.model_type == "bert"
    assert tokenizer.eos_token is None and tokenizer.pad_token == "[PAD]"
    scorer = RewardScorer((model, tokenizer), max_length=64)
    encoded, _ = scorer.encoder.encode(["What is 2 + 2?"], ["Four."])
    ids, types = encoded[0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "what", "is", "2", "+", "2", "?", "[SEP]",
                                                    "four", ".", "[SEP]"]
    assert types == [0] * 8 + [1] * 3
    scores = scorer.score(["What is 2 + 2?", "Name a colour."], ["Four.", "Blue."])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_it_truncates_long_pairs_instead_of_dropping_them(bert_path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_path)
    encoder = PairEncoder(tokenizer, AutoConfig.from_pretrained(bert_path), max_length=24)
    prompt = "start " + " ".join(f"p{i}" for i in range(40)) + " the question"
    encoded, cut = encoder.encode([prompt, prompt, "short"], ["the answer is blue", " ".join(WORDS), "ok"])
    assert cut == [True, True, False]
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids, _ in encoded]
    assert all(len(t) <= 24 for t in tokens)
    # The response survives whole; the prompt keeps its end (the question), losing its start.
    assert tokens[0][-6:] == ["[SEP]", "the", "answer", "is", "blue", "[SEP]"]
    assert tokens[0][-8:-6] == ["the", "question"] and "start" not in tokens[0]
    # A response longer than the budget keeps its start and a tail of the prompt.
    assert tokens[1][-1] == "[SEP]" and "question" in tokens[1] and tokens[1].count("[SEP]") == 2

    long_rows = [{"prompt": prompt + f" {i}", "chosen": " ".join(WORDS) + " marker", "rejected": " ".join(WORDS)}
                 for i in range(12)]
    metrics = main(tiny_args(write_jsonl(tmp_path / "long.jsonl", long_rows), bert_path, tmp_path / "rm",
                             max_length=32, eval_fraction=0.25))
    assert metrics["rm/train_pairs"] + metrics["rm/eval_pairs"] == 12
    assert metrics["rm/truncated_pairs"] == 12


def test_it_weighs_truncated_pairs_down_and_reports_their_accuracy_apart(bert_path, tmp_path):
    # The loss is a weighted mean over pairs: a pair of weight 0 adds nothing and gets no gradient.
    r_chosen = torch.tensor([1.0, -2.0], requires_grad=True)
    r_rejected = torch.tensor([0.0, 0.0])
    weighted, _ = bradley_terry_loss(r_chosen, r_rejected, weight=torch.tensor([1.0, 0.0]))
    alone, _ = bradley_terry_loss(r_chosen[:1], r_rejected[:1])
    assert weighted.item() == pytest.approx(alone.item())
    weighted.backward()
    assert r_chosen.grad[1].item() == 0.0 and r_chosen.grad[0].item() < 0
    half, _ = bradley_terry_loss(r_chosen.detach(), r_rejected, weight=torch.tensor([1.0, 0.5]))
    nll = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))]
    assert half.item() == pytest.approx((nll[0] + 0.5 * nll[1]) / 1.5, rel=1e-6)

    # truncated_weight 0 trains only on the pairs that fit (as TRL does); evaluation reports both kinds apart.
    short = rule_pairs(n_prompts=30, per_prompt=2, seed=3)
    long_prompt = " ".join(random.Random(4).choice(WORDS) for _ in range(80))
    long = [{"prompt": f"{long_prompt} {i}", "chosen": "marker " + " ".join(WORDS[:5]), "rejected": " ".join(WORDS[:6])}
            for i in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", short[:48] + long[:14])
    held = write_jsonl(tmp_path / "held.jsonl", short[48:] + long[14:])
    dropped = main(tiny_args(train, bert_path, tmp_path / "dropped", eval=held, truncated_weight=0.0))
    assert dropped["rm/train_pairs"] == 48
    assert dropped["rm/truncated_pairs"] == 14 + 6
    assert 0 <= dropped["rm/accuracy_fit"] <= 1 and 0 <= dropped["rm/accuracy_truncated"] <= 1
    assert dropped["rm/accuracy"] == pytest.approx((12 * dropped["rm/accuracy_fit"]
                                                    + 6 * dropped["rm/accuracy_truncated"]) / 18)
    kept = main(tiny_args(train, bert_path, tmp_path / "kept", eval=held, truncated_weight=0.5))
    assert kept["rm/train_pairs"] == 62
    with pytest.raises(EngineError, match="truncated_weight 0 leaves them all out"):
        main(tiny_args(write_jsonl(tmp_path / "all_long.jsonl", long), bert_path, tmp_path / "none",
                       truncated_weight=0.0))
    with pytest.raises(EngineError, match="truncated_weight must be between 0 and 1"):
        main(tiny_args(train, bert_path, tmp_path / "bad", truncated_weight=2.0))


def test_it_reads_an_encoder_pair_as_one_text_without_token_types_and_scores_it_so(bert_path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_path)
    config = AutoConfig.from_pretrained(bert_path)
    typed, _ = PairEncoder(tokenizer, config, 64).encode(["the question"], ["the answer"])
    plain, _ = PairEncoder(tokenizer, config, 64, token_types=False).encode(["the question"], ["the answer"])
    assert typed[0][0] == plain[0][0]  # the same [CLS] prompt [SEP] response [SEP]
    assert typed[0][1] == [0, 0, 0, 0, 1, 1, 1] and plain[0][1] is None  # no token_type_ids: all type 0

    train = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(n_prompts=20, per_prompt=2, seed=5))
    main(tiny_args(train, bert_path, tmp_path / "rm", token_types=False))
    scorer = RewardScorer(str(tmp_path / "rm"), device="cpu")
    assert scorer.encoder.with_types is False  # scored in the format it was trained in
    prompts, responses = ["the question"] * 2, ["the answer marker", "the answer"]
    by_hand = scorer.model(**{k: v for k, v in scorer.tokenizer(prompts, responses, padding=True, return_tensors="pt").items()
                              if k != "token_type_ids"}).logits[:, 0]
    assert torch.allclose(scorer.score(prompts, responses), by_hand.detach(), atol=1e-5)


def test_it_appends_eos_for_decoder_models_and_scores_them(tmp_path):
    path = tiny_gpt2(tmp_path / "gpt2", {"eos_token": "<eos>", "unk_token": "<unk>"})
    scorer = RewardScorer(path, device="cpu")
    encoded, _ = scorer.encoder.encode(["the cat"], ["sat on a mat"])
    ids, types = encoded[0]
    assert types is None
    assert scorer.tokenizer.convert_ids_to_tokens(ids) == ["the", "cat", "sat", "on", "a", "mat", "<eos>"]
    scores = scorer.score(["the cat", "a dog"], ["sat on a mat", "ran"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_it_orders_batches_the_same_way_for_a_seed_and_epoch():
    lengths = [random.Random(0).randint(5, 100) for _ in range(37)]
    first = batch_order(lengths, 8, seed=1, epoch=0)
    assert first == batch_order(lengths, 8, seed=1, epoch=0)
    assert first != batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(37))
    assert [len(b) for b in first] == [8, 8, 8, 8, 5]  # the one short batch last


BAD_INPUTS = {
    "missing file": (lambda d: str(d / "nope.jsonl"), None, "does not exist"),
    "unknown format": (lambda d: _write(d / "pairs.csv", "prompt,chosen,rejected\n"), None, "unknown pairs format"),
    "empty file": (lambda d: _write(d / "pairs.jsonl", ""), None, "holds no pairs"),
    "malformed json": (lambda d: _write(d / "pairs.jsonl", '{"prompt": "a", "chosen"\n'), None, "line 1"),
    "missing column": (lambda d: write_jsonl(d / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}]), None,
                       "no 'rejected' column"),
    "non-string value": (lambda d: write_jsonl(d / "pairs.jsonl", rule_pairs(4, 1, 0) + [
        {"prompt": "q", "chosen": 5, "rejected": "b"}]), None, "row 5: field 'chosen' must be text"),
    "empty prompt": (lambda d: write_jsonl(d / "pairs.jsonl", rule_pairs(2, 1, 0) + [
        {"prompt": "  ", "chosen": "a", "rejected": "b"}]), None, "row 3: field 'prompt' is empty"),
    "missing model": (lambda d: write_jsonl(d / "pairs.jsonl", rule_pairs(6, 1, 0)), "/no/such/model",
                      "'/no/such/model' does not exist"),
    "too long for the model": (lambda d: write_jsonl(d / "pairs.jsonl", rule_pairs(6, 1, 0)), "bert:4096",
                               "longer than the model allows"),
    "no pad token": (lambda d: write_jsonl(d / "pairs.jsonl", rule_pairs(6, 1, 0)), "gpt2-no-specials",
                     "no pad token"),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_it_refuses_bad_input_with_a_clear_error_before_any_step(case, bert_path, tmp_path):
    make_train, model, message = BAD_INPUTS[case]
    train = make_train(tmp_path)
    overrides = {}
    if model == "bert:4096":
        model, overrides = bert_path, {"max_length": 4096}
    elif model == "gpt2-no-specials":
        model = tiny_gpt2(tmp_path / "nospecials", {})
    events = []
    with pytest.raises(EngineError, match=message.replace("+", r"\+")):
        main(tiny_args(train, model or bert_path, tmp_path / "rm", **overrides), events.append)
    assert events == [] and not (tmp_path / "rm").exists() and not resume_dir(tmp_path / "rm").exists()


@pytest.mark.parametrize("stage", ["reward", "ppo", "sft", "sample"])
def test_every_stage_prints_its_help_with_each_default(stage, capsys):
    import importlib

    module = importlib.import_module(f"training.engine.{stage}")
    with pytest.raises(SystemExit) as exited:
        module.cli(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "(default:" in out
    if stage == "reward":  # a docstring's "10%" is printed as written, not taken for a format
        assert "BERT's 10% (Devlin" in " ".join(out.split())


def test_it_runs_from_the_command_line_and_prints_final_metrics_last(bert_path, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(n_prompts=20, per_prompt=2, seed=4))
    held_out = write_jsonl(tmp_path / "held.jsonl", rule_pairs(n_prompts=5, per_prompt=2, seed=5))
    done = subprocess.run(
        [sys.executable, "-m", "training.engine.reward", "--train", train, "--eval", held_out, "--model", bert_path,
         "--out", str(tmp_path / "rm"), "--epochs", "1", "--lr", "1e-3", "--batch-size", "8", "--max-length", "64",
         "--seed", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.0 <= final["rm/accuracy"] <= 1.0 and final["rm/eval_pairs"] == 10 and final["rm/steps"] == 5
    assert (tmp_path / "rm" / "pairloop.json").exists()

    bad = subprocess.run([sys.executable, "-m", "training.engine.reward", "--train", str(tmp_path / "none.jsonl"),
                          "--model", bert_path, "--out", str(tmp_path / "rm2")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_it_trains_on_a_file_with_a_few_empty_responses_and_counts_them(bert_path, tmp_path):
    rows = rule_pairs(n_prompts=8, per_prompt=2, seed=5)
    rows[3]["chosen"], rows[9]["rejected"], rows[12]["chosen"] = "", "   ", ""
    events = []
    metrics = main(tiny_args(write_jsonl(tmp_path / "hh.jsonl", rows), bert_path, tmp_path / "rm"), events.append)
    assert metrics["rm/skipped_empty_pairs"] == 3
    assert metrics["rm/train_pairs"] + metrics["rm/eval_pairs"] == len(rows) - 3
    assert any("left out 3 pairs with an empty" in e.get("log", "") for e in events)
    assert read_checkpoint_meta(tmp_path / "rm")["metrics"]["rm/skipped_empty_pairs"] == 3
