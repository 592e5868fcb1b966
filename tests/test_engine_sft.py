"""SFT: the loss falls on response tokens while prompt tokens are masked, bad input is refused
before any step, a cancelled run resumes exactly; the tiny demo policy builds once, is cached,
and answers better than before its SFT. CPU, tiny models built from a config; no network."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from demo import demo_tasks
from demo.policy import (
    PRESETS,
    build_demo_policy,
    build_model,
    ensure_demo_policy,
    evaluate_policy,
    train_tokenizer,
)
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.common import (
    EngineError,
    can_share_prefix,
    format_prompt,
    load_causal_lm,
    shared_prefix_length,
)
from training.engine.sft import (
    IGNORE_INDEX,
    SFTArgs,
    collate,
    encode_examples,
    main,
    response_loss,
    train_sft,
)

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return demo_tasks.make_sft_examples(400, seed=11)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, examples) -> Path:
    """A random 2-layer, 32-wide GPT-2 with a BPE tokenizer trained on the examples (192 positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_tokenizer([t for e in examples for t in (format_prompt(e["instruction"]), e["output"])], 400)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=192, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, examples) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sft-data")
    rows = [{k: e[k] for k in ("instruction", "input", "output")} for e in examples]
    return write_jsonl(folder / "train.jsonl", rows[:320]), write_jsonl(folder / "eval.jsonl", rows[320:])


def args_for(model_dir, train, out, **overrides) -> SFTArgs:
    settings = dict(model=str(model_dir), train=str(train), out=str(out), epochs=2, lr=3e-3, batch_size=16,
                    max_length=192, seed=0, device="cpu", log_every=5)
    settings.update(overrides)
    return SFTArgs(**settings)


def test_it_masks_prompt_tokens_and_appends_eos_to_the_response(tiny_model_dir, examples):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = examples[0]
    (ids, labels), = encode_examples(tokenizer, [example], max_length=192, model_positions=192, truncate=False)
    n_prompt = len(tokenizer(format_prompt(example["instruction"]))["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]).strip() == example["output"]


def test_it_computes_the_loss_over_response_tokens_only(tiny_model_dir, examples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    encoded = encode_examples(tokenizer, examples[:4], max_length=192, model_positions=192, truncate=False)
    input_ids, mask, labels = collate(encoded, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        loss, n_tokens = response_loss(model, input_ids, mask, labels)
        logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
    by_hand = [-logp[b, t - 1, labels[b, t]] for b in range(4) for t in range(1, labels.size(1))
               if labels[b, t] != IGNORE_INDEX]
    # Every response token and its EOS counts, nothing else.
    assert n_tokens == len(by_hand) == sum(len(tokenizer(e["output"])["input_ids"]) + 1 for e in examples[:4])
    assert float(loss) == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)


def test_it_shares_the_prompt_preamble_without_changing_loss_or_gradients(tiny_model_dir, examples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert can_share_prefix(model)
    encoded = encode_examples(tokenizer, examples[:6], max_length=192, model_positions=192, truncate=False)
    batch = collate(encoded, tokenizer.pad_token_id, "cpu")
    assert shared_prefix_length(*batch[:2]) > 15  # the Alpaca preamble
    results = []
    for share in (False, True):
        model.zero_grad()
        loss, n = response_loss(model, *batch, share_prefix=share)
        loss.backward()
        results.append((float(loss.detach()), n, [p.grad.clone() for p in model.parameters()]))
    (loss_full, n_full, grads_full), (loss_shared, n_shared, grads_shared) = results
    assert n_full == n_shared and loss_shared == pytest.approx(loss_full, rel=1e-5)
    for full, shared in zip(grads_full, grads_shared):
        torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-6)
    # With dropout on, the shortcut would share dropout masks across rows: it stays off.
    assert not can_share_prefix(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_it_lowers_the_response_loss_and_leaves_the_prompt_unlearned(tiny_model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, evaluation = data
    events = []
    metrics = main(args_for(tiny_model_dir, train, tmp_path / "out", eval=str(evaluation), epochs=5, lr=1e-2),
                   events.append)
    assert metrics["sft/eval_loss"] < 0.8 * metrics["sft/eval_loss_start"]
    assert metrics["sft/loss"] < metrics["sft/first_loss"]
    assert events[-1]["step"] == events[-1]["total"] == metrics["sft/steps"] == 100
    assert read_checkpoint_meta(tmp_path / "out")["stage"] == "sft"

    # Prompt tokens carry no gradient: the model gets no better at predicting the template.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in evaluation.read_text().splitlines()][:16]
    prompt_ids = tokenizer([format_prompt(r["instruction"]) for r in rows], return_tensors="pt", padding=True)

    def prompt_loss(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path)
        labels = prompt_ids["input_ids"].masked_fill(prompt_ids["attention_mask"] == 0, IGNORE_INDEX)
        with torch.no_grad():
            return float(model(**prompt_ids, labels=labels).loss)

    assert prompt_loss(tmp_path / "out") > 0.9 * prompt_loss(tiny_model_dir)


def test_it_holds_no_gradients_from_one_step_into_the_next(tiny_model_dir, examples, tmp_path):
    """The gradients are freed as soon as the optimizer has stepped, not kept through the next forward, where
    the activations are at their peak (benchmarks/README.md#memory-sharded)."""
    model, tokenizer = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    held = []
    train_sft(model, tokenizer, examples[:32], args_for(tiny_model_dir, "", tmp_path, max_steps=3, batch_size=8),
              lambda event: held.append(any(p.grad is not None for p in model.parameters())))
    assert held and not any(held), held


@pytest.mark.parametrize("content, message", [
    ("", "has no examples"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "train.jsonl:2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "train.jsonl:3: missing 'output'"),
    ('{"instruction": "a", "output": "  "}\n', "train.jsonl:1: 'output' is empty"),
    ('["a", "b"]\n', "train.jsonl:1: expected a JSON object"),
])
def test_it_refuses_bad_data_naming_the_line_before_any_step(tiny_model_dir, tmp_path, content, message):
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    events = []
    with pytest.raises(EngineError, match=message.replace("[", r"\[")):
        main(args_for(tiny_model_dir, train, tmp_path / "out"), events.append)
    assert events == []


def test_it_refuses_a_missing_model_or_data_file(tiny_model_dir, data, tmp_path):
    train, _ = data
    with pytest.raises(EngineError, match="does not exist"):
        main(args_for(tmp_path / "no-such-model", train, tmp_path / "out"))
    with pytest.raises(EngineError, match="does not exist"):
        main(args_for(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "out"))


def test_it_refuses_sequences_longer_than_the_model_allows_unless_truncating(tiny_model_dir, tmp_path):
    long_row = {"instruction": "Reverse the order of these words: " + " ".join(["apple"] * 300), "output": "apple"}
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "What is 2 + 2?", "output": "4"}, long_row])
    events = []
    with pytest.raises(EngineError, match=r"line 2 is \d+ tokens long, but the model allows 192 positions"):
        main(args_for(tiny_model_dir, train, tmp_path / "out", max_length=512), events.append)
    assert events == []
    metrics = main(args_for(tiny_model_dir, train, tmp_path / "out", max_length=512, truncate=True, max_steps=2))
    assert metrics["sft/steps"] == 2


def test_it_gives_a_tokenizer_without_a_pad_token_one(tiny_model_dir, data, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "model")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert AutoTokenizer.from_pretrained(tmp_path / "model").pad_token is None
    metrics = main(args_for(tmp_path / "model", data[0], tmp_path / "out", max_steps=2))
    assert metrics["sft/steps"] == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_it_resumes_a_cancelled_run_to_the_same_weights(family, tiny_model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from demo.tiny_models import build_policy

    if family == "llama":  # no pad token of its own: the engine lends it eos (<|eot_id|>), which ends every turn
        tiny_model_dir = build_policy("llama", tmp_path / "llama")

    train, _ = data
    main(args_for(tiny_model_dir, train, tmp_path / "whole", max_steps=8))

    class Cancelled(Exception):
        pass

    def cancel_at_3(event):
        if event["step"] == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        main(args_for(tiny_model_dir, train, tmp_path / "cut", max_steps=8), cancel_at_3)
    assert read_checkpoint_meta(tmp_path / "cut")["step"] == 3
    steps = []
    main(args_for(tiny_model_dir, train, tmp_path / "cut", max_steps=8, resume=True), lambda e: steps.append(e["step"]))
    assert steps == [4, 5, 6, 7, 8]
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name, tensor in whole.items():
        torch.testing.assert_close(cut[name], tensor, rtol=1e-5, atol=1e-6)


def test_it_runs_from_the_command_line_and_ends_with_json(tiny_model_dir, data, tmp_path):
    train, evaluation = data
    done = subprocess.run(
        [sys.executable, "-m", "training.engine.sft", "--model", str(tiny_model_dir), "--train", str(train),
         "--eval", str(evaluation), "--out", str(tmp_path / "out"), "--max-steps", "3", "--lr", "1e-3",
         "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["sft/steps"] == 3 and "sft/eval_loss" in metrics
    bad = subprocess.run([sys.executable, "-m", "training.engine.sft", "--model", str(tmp_path / "nope"),
                          "--train", str(train)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "does not exist" in bad.stderr


# ----------------------------------------------------------------------------------------------
# The demo policy


def test_it_builds_the_tiny_demo_policy_once_even_when_two_processes_ask(tmp_path):
    out = tmp_path / "demo-policy-tiny"
    script = (
        "import sys; from demo.policy import ensure_demo_policy\n"
        "events = []\n"
        f"ensure_demo_policy({str(out)!r}, preset='tiny', on_progress=events.append)\n"
        "print(events[0]['log'] if events else 'cached')\n"
    )
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1200) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    last_lines = [o[0].strip().splitlines()[-1] for o in outputs]
    built, cached = sorted(last_lines, key=lambda line: line == "cached")
    assert cached == "cached"  # the builder says first what it does, how long it takes and where it keeps it
    assert built.startswith("building the demo policy once (preset tiny, about 15 seconds)")
    assert str(out) in built
    meta = read_checkpoint_meta(out)
    assert meta["stage"] == "demo_policy" and meta["args"]["preset"] == "tiny"
    assert meta["metrics"]["sft/loss"] < 0.5 * meta["metrics"]["sft/first_loss"]
    print(f"tiny demo policy built in {meta['metrics']['demo/build_seconds']:.1f}s "
          f"(two processes, {time.perf_counter() - started:.1f}s wall)")

    # Cached: a third call returns at once without rebuilding.
    started = time.perf_counter()
    assert ensure_demo_policy(out, preset="tiny") == out
    assert time.perf_counter() - started < 1.0
    assert read_checkpoint_meta(out)["saved_at"] == meta["saved_at"]

    # Reproducible: the same preset and seed rebuild the same weights, byte for byte.
    again = build_demo_policy(tmp_path / "again", preset="tiny")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # Better than before its SFT: the same architecture untrained scores lower under the judge.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(0)
    untrained = build_model(tokenizer, PRESETS["tiny"])
    after = evaluate_policy(trained, tokenizer, 48, seed=1, max_new_tokens=48)
    before = evaluate_policy(untrained, tokenizer, 48, seed=1, max_new_tokens=48)
    assert after["demo/judge_mean"] > before["demo/judge_mean"] + 0.03
    assert after["demo/ended_fraction"] > 0.9 > before["demo/ended_fraction"]
