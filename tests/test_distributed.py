"""Every training stage under `accelerate launch` with two processes (gloo on CPU): the same result as one
process with the same global batch, and a killed run that resumes under two processes and under one.

Tolerance: 1e-4 relative (and 1e-6 absolute) on the final metrics. The two runs see the same rows in the
same order and seeds; what differs is the order of floating-point sums (gradients averaged across
processes, padding widths of each process's share), about 1e-7 relative per step in fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.tiny_models import build_policy, build_reward
from training.engine.checkpoints import read_checkpoint_meta
from training.engine.launch import kill_tree, process_tree

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RELATIVE, ABSOLUTE = 1e-4, 1e-6


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def launch(stage: str, flags: list[str], processes: int, module: str = "", **popen) -> subprocess.Popen:
    """`python -m training.engine.<stage>` (or `module`) alone, or under `accelerate launch` with `processes`
    processes."""
    module = ["-m", module or f"training.engine.{stage}", *flags]
    if processes == 1:
        command = [PYTHON, *module]
    else:  # --multi_gpu picks torchrun's launcher, which runs gloo on a machine without GPUs
        command = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", *module]
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def run(stage: str, flags: list[str], processes: int = 1, module: str = "") -> dict:
    """The final metrics line of a finished run."""
    process = launch(stage, flags, processes, module)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"rank 0 alone prints the final metrics, got {len(lines)} lines"
    return json.loads(lines[0])


def assert_close(one: dict, two: dict, names: list[str]) -> None:
    for name in names:
        assert two[name] == pytest.approx(one[name], rel=RELATIVE, abs=ABSOLUTE), name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distributed")
    sums = [(a, b) for a in range(8) for b in range(8)]
    (root / "sft.jsonl").write_text("\n".join(
        json.dumps({"instruction": f"Add {a} and {b}.", "output": f"The answer is {a + b}."}) for a, b in sums))
    (root / "pairs.jsonl").write_text("\n".join(
        json.dumps({"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.",
                    "rejected": "I do not know, sorry." if (a + b) % 2 else "No."}) for a, b in sums))
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"Add {a} and {b}."}) for a, b in sums[:16]))
    return {"root": str(root), "policy": str(build_policy("llama", root / "llama")),
            "reward": str(build_reward("bert", root / "bert")), **{n: str(root / f"{n}.jsonl")
                                                                  for n in ("sft", "pairs", "prompts")}}


def test_sft_on_two_processes_matches_one(data):
    flags = ["--model", data["policy"], "--train", data["sft"], "--eval", data["sft"], "--batch-size", "8",
             "--max-steps", "10", "--lr", "1e-3", "--device", "cpu"]
    one = run("sft", [*flags, "--out", f"{data['root']}/sft-1"])
    shares = Path(data["root"]) / "sft-2-shares"
    two = run("sft", [str(shares), *flags, "--out", f"{data['root']}/sft-2"], processes=2,
              module="tests.record_sft_shares")
    assert one["sft/loss"] < one["sft/first_loss"] - 0.5  # it learned something to compare
    assert_close(one, two, ["sft/loss", "sft/first_loss", "sft/eval_loss", "sft/grad_norm"])
    assert two["sft/steps"] == 10 and read_checkpoint_meta(f"{data['root']}/sft-2")["step"] == 10
    # Each process trained on its own half of every global batch, and the two halves make the batch
    # (the same results would come from both processes training on the whole batch: DDP averages them).
    first, second = (json.loads((shares / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert first["batches"] == second["batches"] and len(first["steps"]) == len(second["steps"]) == 10
    for batch, mine, theirs in zip(first["batches"], first["steps"], second["steps"]):
        assert len(batch) == 8 and len(mine) == len(theirs) == 4, (batch, mine, theirs)
        assert set(mine).isdisjoint(theirs) and sorted(mine + theirs) == sorted(batch), (batch, mine, theirs)


def test_sft_sharded_with_fsdp_matches_one_process_and_saves_weights_the_auto_classes_load(data):
    """FSDP2 over two processes: the same losses as one process, and a final save gathered from both shards that
    AutoModelForCausalLM loads and that samples the one-process model's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = ["--model", data["policy"], "--train", data["sft"], "--eval", data["sft"], "--batch-size", "8",
             "--max-steps", "10", "--lr", "1e-3", "--device", "cpu"]
    one = run("sft", [*flags, "--out", f"{data['root']}/sft-fsdp-1"])
    two = run("sft", [*flags, "--fsdp", "--out", f"{data['root']}/sft-fsdp-2"], processes=2)
    assert one["sft/loss"] < one["sft/first_loss"] - 0.5  # it learned something to compare
    assert_close(one, two, ["sft/loss", "sft/first_loss", "sft/eval_loss", "sft/grad_norm"])
    tokenizer = AutoTokenizer.from_pretrained(f"{data['root']}/sft-fsdp-1")
    prompt = tokenizer(["Add 3 and 4."], return_tensors="pt")
    samples = [AutoModelForCausalLM.from_pretrained(f"{data['root']}/sft-fsdp-{n}").generate(
        **prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id) for n in (1, 2)]
    assert samples[0].shape[1] > prompt["input_ids"].shape[1] and samples[0].tolist() == samples[1].tolist()


def test_reward_model_on_two_processes_matches_one(data):
    flags = ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "3",
             "--lr", "1e-3", "--device", "cpu", "--no-resume", "--eval-every", "5"]
    one = run("reward", [*flags, "--out", f"{data['root']}/rm-1"])
    two = run("reward", [*flags, "--out", f"{data['root']}/rm-2"], processes=2)
    sharded = run("reward", [*flags, "--fsdp", "--out", f"{data['root']}/rm-fsdp"], processes=2)
    assert one["rm/loss"] < 0.6  # it learned something to compare
    for result in (two, sharded):
        assert_close(one, result, ["rm/loss", "rm/eval_loss", "rm/accuracy", "rm/margin", "rm/train_accuracy"])
        assert (result["rm/train_tokens"], result["rm/steps"]) == (one["rm/train_tokens"], one["rm/steps"])


def test_dpo_on_two_processes_matches_one(data):
    """The chat-template Llama; pairs weighed by strength, so the two shares of a batch weigh differently; a short
    last batch (57 training pairs in batches of 6) split 2 and 1."""
    rows = [json.loads(line) for line in Path(data["pairs"]).read_text().splitlines()]
    pairs = Path(data["root"]) / "dpo-pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({**row, "margin": i % 4 / 3}) for i, row in enumerate(rows)))
    flags = ["--policy", data["policy"], "--train", str(pairs), "--batch-size", "6", "--epochs", "2",
             "--lr", "1e-3", "--device", "cpu", "--no-resume", "--eval-every", "4", "--strength-weight", "1"]
    one = run("dpo", [*flags, "--out", f"{data['root']}/dpo-1"])
    two = run("dpo", [*flags, "--out", f"{data['root']}/dpo-2"], processes=2)
    assert one["dpo/eval_accuracy"] > 0.5 and one["dpo/margin"] > 0  # it learned something to compare
    assert_close(one, two, ["dpo/loss", "dpo/eval_loss", "dpo/eval_accuracy", "dpo/eval_margin", "dpo/margin",
                            "dpo/rewards_chosen", "dpo/accuracy"])
    assert (two["dpo/train_tokens"], two["dpo/steps"]) == (one["dpo/train_tokens"], one["dpo/steps"])


def test_lora_ppo_on_two_processes_matches_one(data):
    """Rollouts sharded across the processes, two minibatches of rows from both, two epochs."""
    run("reward", ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "2",
                   "--lr", "1e-3", "--device", "cpu", "--no-resume", "--out", f"{data['root']}/ppo-rm"])
    flags = ["--policy", data["policy"], "--prompts", data["prompts"], "--reward-model", f"{data['root']}/ppo-rm",
             "--steps", "3", "--batch-size", "8", "--samples-per-prompt", "2", "--generation-batch-size", "4",
             "--mini-batch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8", "--lr", "1e-3",
             "--lora-r", "4", "--device", "cpu", "--no-resume"]
    one = run("ppo", [*flags, "--out", f"{data['root']}/ppo-1"])
    two = run("ppo", [*flags, "--out", f"{data['root']}/ppo-2"], processes=2)
    assert one["ppo/kl"] > 0  # the policy moved away from its reference
    assert_close(one, two, ["ppo/reward", "ppo/kl", "ppo/entropy", "ppo/policy_loss", "ppo/value_loss",
                            "ppo/approx_kl", "ppo/rlhf_reward"])
    assert (Path(data["root"]) / "ppo-2" / "adapter").is_dir()


def test_lora_ppo_sharded_with_fsdp_matches_one_process_and_saves_the_whole_adapter(data):
    """FSDP2 over two processes, LoRA: one process's metrics; the saved adapter, merged weights and value head are
    the one-process run's (every process's slice of them, gathered); rollouts gather the weights once per batch."""
    from safetensors.torch import load_file

    run("reward", ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "2",
                   "--lr", "1e-3", "--device", "cpu", "--no-resume", "--out", f"{data['root']}/ppo-fsdp-rm"])
    flags = ["--policy", data["policy"], "--prompts", data["prompts"], "--reward-model", f"{data['root']}/ppo-fsdp-rm",
             "--steps", "2", "--batch-size", "8", "--samples-per-prompt", "2", "--generation-batch-size", "4",
             "--mini-batch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8", "--lr", "1e-3",
             "--lora-r", "4", "--device", "cpu", "--no-resume"]
    root, gathers = Path(data["root"]), Path(data["root"]) / "ppo-fsdp-gathers"
    one = run("ppo", [*flags, "--out", str(root / "ppo-fsdp-1")])
    two = run("ppo", [str(gathers), *flags, "--fsdp", "--out", str(root / "ppo-fsdp-2")], processes=2,
              module="tests.record_rollout_gathers")
    assert one["ppo/kl"] > 0  # the policy moved away from its reference
    assert_close(one, two, ["ppo/reward", "ppo/kl", "ppo/entropy", "ppo/policy_loss", "ppo/value_loss",
                            "ppo/approx_kl", "ppo/rlhf_reward"])
    for weights in ("adapter/adapter_model.safetensors", "model.safetensors", "value_head/value_head.safetensors"):
        whole, sharded = load_file(root / "ppo-fsdp-1" / weights), load_file(root / "ppo-fsdp-2" / weights)
        assert sorted(whole) == sorted(sharded) and whole, weights
        for name, value in whole.items():
            assert sharded[name].shape == value.shape and sharded[name].allclose(value, atol=1e-6), (weights, name)
    # Each step generates its 4 rows per process in one call, which gathers no weights: they were gathered before it.
    for rank in (0, 1):
        calls = json.loads((gathers / f"rank-{rank}.json").read_text())["generate"]
        assert len(calls) == 2 and all(c["tokens"] > 1 and c["gathers"] == 0 for c in calls), calls


def test_lora_grpo_on_two_processes_matches_one(data):
    """Groups sharded across the processes whole, two minibatches of rows from both, two passes, the KL in the loss."""
    run("reward", ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "2",
                   "--lr", "1e-3", "--device", "cpu", "--no-resume", "--out", f"{data['root']}/grpo-rm"])
    flags = ["--policy", data["policy"], "--prompts", data["prompts"], "--reward-model", f"{data['root']}/grpo-rm",
             "--steps", "3", "--batch-size", "8", "--samples-per-prompt", "2", "--generation-batch-size", "4",
             "--mini-batch-size", "4", "--num-iterations", "2", "--max-new-tokens", "8", "--lr", "1e-3",
             "--lora-r", "4", "--device", "cpu", "--no-resume"]
    one = run("grpo", [*flags, "--out", f"{data['root']}/grpo-1"])
    two = run("grpo", [*flags, "--out", f"{data['root']}/grpo-2"], processes=2)
    assert one["grpo/token_kl"] > 0  # the policy moved away from its reference (k3: positive once it differs)
    assert_close(one, two, ["grpo/reward", "grpo/kl", "grpo/token_kl", "grpo/entropy", "grpo/loss",
                            "grpo/policy_loss", "grpo/clipfrac"])
    assert (Path(data["root"]) / "grpo-2" / "adapter").is_dir()


def _kill_at_checkpoint(process: subprocess.Popen, checkpoint: Path) -> int:
    """SIGKILL the whole run (launcher and every rank) once it wrote a resumable checkpoint; its step."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        meta = read_checkpoint_meta(checkpoint)
        if meta is not None:
            ranks = process_tree(process.pid)
            kill_tree(process)  # torchrun starts each rank in a session of its own: a killpg would miss them
            process.communicate()
            assert not _survivors(ranks), "a process of the killed run still runs"
            return int(meta["step"])
        assert process.poll() is None, process.stderr.read()[-4000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 240 s")


def assert_shards(checkpoint: Path, processes: int) -> None:
    """A sharded run's resumable checkpoint: Distributed Checkpoint files, one per process, and their index; no
    gathered weights beside them."""
    shards = checkpoint / "shards"
    assert (shards / ".metadata").is_file(), sorted(p.name for p in checkpoint.iterdir())
    assert sorted(p.name for p in shards.glob("*.distcp")) == [f"__{rank}_0.distcp" for rank in range(processes)]
    assert not list(checkpoint.glob("*.safetensors")) and not (checkpoint / "adapter").exists()


@pytest.mark.parametrize("before, after, sharding", [(2, 2, []), (2, 1, []), (2, 2, ["--fsdp"]), (2, 1, ["--fsdp"]),
                                                      (1, 2, ["--fsdp"])],
                         ids=["resumed-on-2", "resumed-on-1", "fsdp-resumed-on-2-fsdp", "fsdp-resumed-on-1",
                              "one-resumed-on-2-fsdp"])
def test_reward_run_killed_resumes_under_another_number_of_processes(data, before, after, sharding):
    """Killed on two processes (DDP, or FSDP2 whose checkpoint is each process's shards) or on one, resumed on two
    or on one."""
    flags = ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "30",
             "--lr", "1e-3", "--device", "cpu", "--save-every", "20", "--eval-every", "0", *sharding]
    out = Path(data["root"]) / f"rm-killed-{before}-{after}{''.join(sharding)}"
    uninterrupted = run("reward", [*flags, "--no-resume", "--out", str(out.with_name(out.name + "-whole"))])
    checkpoint = out.with_name(out.name + ".resume")
    step = _kill_at_checkpoint(launch("reward", [*flags, "--out", str(out)], before), checkpoint)
    assert 0 < step < uninterrupted["rm/steps"] and not out.exists()  # killed before it finished
    if sharding and before == 2:
        assert_shards(checkpoint, 2)
    resumed = run("reward", [*flags, "--resume", "--out", str(out)], processes=after)
    assert resumed["rm/steps"] == uninterrupted["rm/steps"]
    assert_close(uninterrupted, resumed, ["rm/loss", "rm/accuracy", "rm/margin", "rm/eval_loss"])


def _resume_dir(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def _killed_sharded_then_resumed(stage: str, flags: list[str], out: Path,
                                 resumable=_resume_dir) -> tuple[int, dict, dict]:
    """Run `stage` on two FSDP2 processes, SIGKILL it at its first resumable checkpoint (`resumable(out)`), check
    that checkpoint's shards, and resume a copy of it on one process and another on two (FSDP2); the step and both
    final metrics."""
    checkpoint = resumable(out)
    step = _kill_at_checkpoint(launch(stage, [*flags, "--fsdp", "--out", str(out)], 2), checkpoint)
    assert step > 0 and (checkpoint == out or not out.exists())  # killed before it finished
    assert_shards(checkpoint, 2)
    resumed = {}
    for processes in (1, 2):
        copy = out.with_name(f"{out.name}-on-{processes}")
        shutil.copytree(checkpoint, resumable(copy))
        resumed[processes] = run(stage, [*flags, "--fsdp", "--resume", "--out", str(copy)], processes=processes)
    return step, resumed[1], resumed[2]


def assert_samples_alike(one: Path, other: Path) -> None:
    """Both final checkpoints load with AutoModelForCausalLM and sample the same tokens, greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(one)
    prompt = tokenizer(["Add 3 and 4."], return_tensors="pt")
    samples = [AutoModelForCausalLM.from_pretrained(path).generate(
        **prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id) for path in (one, other)]
    assert samples[0].shape[1] > prompt["input_ids"].shape[1] and samples[0].tolist() == samples[1].tolist()


def test_sft_run_killed_sharded_resumes_on_one_process_and_on_two(data):
    """SFT under FSDP2 killed after its sharded checkpoint (at --out itself, until the final save replaces it):
    resumed on one process and on two to the uninterrupted run's losses and weights."""
    flags = ["--model", data["policy"], "--train", data["sft"], "--eval", data["sft"], "--batch-size", "8",
             "--max-steps", "12", "--save-every", "4", "--lr", "1e-3", "--device", "cpu"]
    out = Path(data["root"]) / "sft-fsdp-killed"
    uninterrupted = run("sft", [*flags, "--out", str(out.with_name(out.name + "-whole"))])
    step, on_one, on_two = _killed_sharded_then_resumed("sft", flags, out, resumable=lambda path: path)
    assert step < 12 and uninterrupted["sft/loss"] < uninterrupted["sft/first_loss"] - 0.5  # it learned
    for resumed, processes in ((on_one, 1), (on_two, 2)):
        assert resumed["sft/steps"] == 12
        assert_close(uninterrupted, resumed, ["sft/loss", "sft/first_loss", "sft/eval_loss", "sft/grad_norm"])
        assert_samples_alike(out.with_name(out.name + "-whole"), out.with_name(f"{out.name}-on-{processes}"))


def test_dpo_run_killed_sharded_resumes_on_one_process_and_on_two(data):
    """DPO under FSDP2 killed after its sharded checkpoint: resumed on one process and on two to the uninterrupted
    run's metrics and weights (the reference log-probs come back from trainer_state.pt, the policy from shards)."""
    flags = ["--policy", data["policy"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "2",
             "--lr", "1e-3", "--device", "cpu", "--save-every", "6", "--eval-every", "0"]
    out = Path(data["root"]) / "dpo-fsdp-killed"
    uninterrupted = run("dpo", [*flags, "--no-resume", "--out", str(out.with_name(out.name + "-whole"))])
    step, on_one, on_two = _killed_sharded_then_resumed("dpo", flags, out)
    assert step < uninterrupted["dpo/steps"] and uninterrupted["dpo/margin"] > 0  # it moved: equal results say something
    for resumed, processes in ((on_one, 1), (on_two, 2)):
        assert resumed["dpo/steps"] == uninterrupted["dpo/steps"]
        assert_close(uninterrupted, resumed, ["dpo/loss", "dpo/eval_accuracy", "dpo/eval_margin", "dpo/eval_loss",
                                              "dpo/rewards_chosen", "dpo/rewards_rejected"])
        assert_samples_alike(out.with_name(out.name + "-whole"), out.with_name(f"{out.name}-on-{processes}"))


ROLLOUT_STAGES = {  # the stage's own flags and the metrics a resumed run must share with the uninterrupted one
    "grpo": (["--num-iterations", "2"], ["grpo/reward", "grpo/kl", "grpo/token_kl", "grpo/loss", "grpo/entropy"]),
    "ppo": (["--ppo-epochs", "2"], ["ppo/reward", "ppo/kl", "ppo/entropy", "ppo/policy_loss", "ppo/value_loss"]),
}


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_lora_rollout_run_killed_sharded_resumes_on_one_process_and_on_two(data, stage):
    """LoRA GRPO and PPO under FSDP2 killed after a sharded checkpoint (the adapters' shards, PPO's value head's, and
    their optimizer state; not the frozen base): resumed on one process and on two to the uninterrupted run's metrics
    and merged weights."""
    own, names = ROLLOUT_STAGES[stage]
    scorer = Path(data["root"]) / f"{stage}-fsdp-rm"
    run("reward", ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "2",
                   "--lr", "1e-3", "--device", "cpu", "--no-resume", "--out", str(scorer)])
    flags = ["--policy", data["policy"], "--prompts", data["prompts"], "--reward-model", str(scorer), "--steps", "4",
             "--batch-size", "8", "--samples-per-prompt", "2", "--generation-batch-size", "4", "--mini-batch-size", "4",
             "--max-new-tokens", "8", "--lr", "1e-3", "--lora-r", "4", "--device", "cpu", "--save-every", "2", *own]
    out = Path(data["root"]) / f"{stage}-fsdp-killed"
    uninterrupted = run(stage, [*flags, "--no-resume", "--out", str(out.with_name(out.name + "-whole"))])
    step, on_one, on_two = _killed_sharded_then_resumed(stage, flags, out)
    assert step < 4 and uninterrupted[f"{stage}/kl"] != 0  # the policy moved: equal results say something
    for resumed, processes in ((on_one, 1), (on_two, 2)):
        assert_close(uninterrupted, resumed, names)
        assert_samples_alike(out.with_name(out.name + "-whole"), out.with_name(f"{out.name}-on-{processes}"))


def test_grpo_run_killed_resumes_where_the_uninterrupted_run_ends(tmp_path):
    """SIGKILL mid-GRPO right after its resumable checkpoint; the resumed run ends where the uninterrupted run
    ends (the tiny demo policy with a rule judge, one process each)."""
    from demo.demo_tasks import make_prompts
    from demo.policy import DEFAULT_TINY_DIR, ensure_demo_policy

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in make_prompts(16, seed=0, split="train")))
    flags = ["--policy", str(ensure_demo_policy(REPO / DEFAULT_TINY_DIR, preset="tiny")), "--prompts", str(prompts),
             "--reward-model", "rule:correct_sentence", "--steps", "6", "--batch-size", "8", "--samples-per-prompt",
             "4", "--generation-batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--device", "cpu",
             "--save-every", "2"]
    out = tmp_path / "grpo-killed"
    uninterrupted = run("grpo", [*flags, "--no-resume", "--out", str(out.with_name(out.name + "-whole"))])
    step = _kill_at_checkpoint(launch("grpo", [*flags, "--out", str(out)], 1), out.with_name(out.name + ".resume"))
    assert 0 < step < 6 and not out.exists()  # killed before the end: the final policy was never written
    resumed = run("grpo", [*flags, "--resume", "--out", str(out)])
    assert uninterrupted["grpo/token_kl"] > 0  # the policy moved, so equal results say something
    assert_close(uninterrupted, resumed, ["grpo/reward", "grpo/kl", "grpo/token_kl", "grpo/loss", "grpo/entropy"])


def test_dpo_run_killed_resumes_to_the_uninterrupted_result(data):
    """SIGKILL after a resumable checkpoint: the reference log-probs come back from it, not from the moved policy.
    One process, as the GRPO test; the reward test kills two."""
    flags = ["--policy", data["policy"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "6",
             "--lr", "1e-4", "--device", "cpu", "--save-every", "16", "--eval-every", "0"]
    out = Path(data["root"]) / "dpo-killed"
    uninterrupted = run("dpo", [*flags, "--no-resume", "--out", str(out.with_name(out.name + "-whole"))])
    step = _kill_at_checkpoint(launch("dpo", [*flags, "--out", str(out)], 1), out.with_name(out.name + ".resume"))
    assert 0 < step < uninterrupted["dpo/steps"] and not out.exists()  # killed before it finished
    resumed = run("dpo", [*flags, "--resume", "--out", str(out)])
    assert resumed["dpo/steps"] == uninterrupted["dpo/steps"]
    assert_close(uninterrupted, resumed, ["dpo/loss", "dpo/eval_accuracy", "dpo/eval_margin", "dpo/eval_loss",
                                          "dpo/rewards_chosen", "dpo/rewards_rejected"])


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie no longer does)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _survivors(pids: list[int], seconds: float = 10.0) -> list[int]:
    """Those of `pids` still running after up to `seconds`: a SIGKILL lands when the process next leaves the
    kernel, so a rank in the middle of writing its checkpoint shard dies a moment later."""
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _rank_pid(rank: int) -> int | None:
    """The process of `rank` among this test's descendants (its environment names its rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"training.engine.launch" not in (entry / "cmdline").read_bytes():
                continue
            if f"RANK={rank}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != os.getpid():
                pid = _parent(pid)
        except (OSError, ValueError):
            continue
        if pid == os.getpid():
            return int(entry.name)
    return None


def test_worker_launch_relays_progress_stops_every_rank_and_resumes(data, monkeypatch):
    """engine.launch (PAIRLOOP_TRAINING_PROCESSES): events reach the caller, a cancel stops both ranks with
    a checkpoint, and the next attempt resumes from it to the uninterrupted run's result."""
    from training.engine import launch, reward

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    args = reward.RewardArgs(model=data["reward"], train=data["pairs"], batch_size=8, epochs=6, lr=1e-3,
                             device="cpu", save_every=5, eval_every=0, out=f"{data['root']}/rm-launched")
    whole = run("reward", ["--model", data["reward"], "--train", data["pairs"], "--batch-size", "8", "--epochs", "6",
                           "--lr", "1e-3", "--device", "cpu", "--eval-every", "0", "--no-resume",
                           "--out", f"{data['root']}/rm-launched-whole"])
    seen = []

    def cancel_at_7(event):
        seen.append(event)
        if event.get("step") == 7:
            raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        launch.run("reward", args, cancel_at_7, processes=2)
    assert [e["step"] for e in seen if "step" in e][:7] == list(range(1, 8))
    stopped_at = read_checkpoint_meta(reward.resume_dir(args.out))["step"]  # both ranks at this step
    assert 7 <= stopped_at < whole["rm/steps"]  # the child runs ahead of the parent by a step or so

    resumed = []
    final = launch.run("reward", args, resumed.append, processes=2)
    assert "resumed from" in resumed[0]["log"] and resumed[0]["step"] == stopped_at
    assert final["rm/steps"] == whole["rm/steps"]
    assert_close(whole, final, ["rm/loss", "rm/accuracy", "rm/eval_loss"])


def test_worker_launch_fails_within_a_minute_when_a_rank_dies(data, monkeypatch):
    from training.engine import launch, reward
    from training.engine.common import EngineError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    args = reward.RewardArgs(model=data["reward"], train=data["pairs"], batch_size=8, epochs=500, lr=1e-3,
                             device="cpu", eval_every=0, resume=False, out=f"{data['root']}/rm-rank-dies")
    killed = {}

    def kill_rank_1(event):
        if event.get("step") == 3 and not killed:
            pid = _rank_pid(1)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    with pytest.raises(EngineError, match="training processes failed"):
        launch.run("reward", args, kill_rank_1, processes=2)
    assert killed and time.monotonic() - killed["at"] < 60



def test_worker_launch_taken_away_leaves_no_rank_running(data, monkeypatch):
    """A job taken away (StopWithoutSaving) kills the launcher, torchrun and both ranks, before any checkpoint."""
    from training.engine import launch, reward
    from training.engine.stop import StopWithoutSaving

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    args = reward.RewardArgs(model=data["reward"], train=data["pairs"], batch_size=8, epochs=500, lr=1e-3,
                             device="cpu", save_every=20, eval_every=0, resume=False,
                             out=f"{data['root']}/rm-taken-away")
    ranks = []

    def taken_away_at_3(event):
        if event.get("step") == 3:
            ranks.extend(pid for pid in (_rank_pid(0), _rank_pid(1)) if pid is not None)
            raise StopWithoutSaving

    with pytest.raises(StopWithoutSaving):
        launch.run("reward", args, taken_away_at_3, processes=2)
    assert len(ranks) == 2
    assert not _survivors(ranks), "a rank outlived the launcher"
    assert not reward.resume_dir(args.out).exists() and not Path(args.out).exists()


WORKER_KILLED_AT_3 = """
import json, os, sys
from training.engine import launch, reward

def killed_at_3(event):
    if event.get("step") == 3:
        print(json.dumps(launch.process_tree(os.getpid())), flush=True)
        os.kill(os.getpid(), 9)

launch.run("reward", reward.RewardArgs(**json.loads(sys.argv[1])), killed_at_3, processes=2)
"""


def test_a_killed_worker_leaves_no_rank_running_and_a_resumable_checkpoint(data):
    """The worker running launch.run dies by SIGKILL: rank 0's next event finds no reader, and the ranks stop
    there with a resumable checkpoint, as on a cancel."""
    from training.engine import reward

    out = Path(data["root"]) / "rm-worker-killed"
    settings = dict(model=data["reward"], train=data["pairs"], batch_size=8, epochs=500, lr=1e-3, device="cpu",
                    save_every=0, eval_every=0, resume=False, out=str(out))
    worker = subprocess.run([PYTHON, "-c", WORKER_KILLED_AT_3, json.dumps(settings)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-4000:]
    tree = json.loads(worker.stdout.splitlines()[-1])
    assert len(tree) >= 3  # the launcher and two ranks
    survivors = _survivors(tree, seconds=60)
    for pid in survivors:  # not left training for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "a process of the run outlived its worker"
    assert read_checkpoint_meta(reward.resume_dir(out))["step"] >= 3 and not out.exists()
