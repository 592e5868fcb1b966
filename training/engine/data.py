"""Preference pairs from the labeling app's export, checked and ready for reward training; PPO's prompts.

The export uses TRL's columns (https://huggingface.co/docs/trl/dataset_formats, "preference"):
`prompt` (text, or chat turns [{"role", "content"}]), `chosen`, `rejected` (text, or TRL's
conversational form: a list of assistant turns), plus
`margin` (float, from the labelers' strength; may be absent), `pair_id`, `labeler`, `round` (the number of the
round that made the pair, null for an imported one; may be absent). It comes as
JSONL, Parquet, or a directory written by `datasets.Dataset.save_to_disk`; the same file feeds TRL.

Plain Python over `datasets` (imported when pairs are read, so PPO's import stays light); never imports
Django.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, load_from_disk

from .common import EngineError, Prompt, prompt_text, step_generator

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(path: str | Path) -> Dataset:
    """Read exported pairs into a Dataset with columns prompt, chosen, rejected (text), prompt_turns (the
    prompt as chat turns: a text prompt is one user turn), margin (float) and round (int or None).

    `prompt` holds chat turns flattened with `common.prompt_text` (for backbones without a chat template);
    responses given as assistant turns become their text; a missing `margin` column or value is 0.0, a missing
    `round` None.
    Other columns (pair_id, labeler, ...) are kept. Pairs with an empty response are left out (see
    `read_pairs`). Every problem is an EngineError that names the file, and for a bad value the row
    (1-based) and the field.
    """
    return read_pairs(path)[0]


def read_pairs(path: str | Path) -> tuple[Dataset, list[int]]:
    """`load_pairs`, and the rows (1-based) left out because their chosen or rejected response is empty:
    public sets have a few (Anthropic HH has pairs whose preferred reply is empty), and they must not
    cost the whole file; a pair can only be learned from when both of its responses say something."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EngineError(f"pairs file {str(path)!r} does not exist")
    rows = _read_rows(path)
    if not rows:
        raise EngineError(f"pairs file {str(path)!r} holds no pairs")
    columns = set(rows[0])
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise EngineError(
                f"pairs file {str(path)!r} has no {column!r} column "
                f"(found: {', '.join(sorted(columns)) or 'none'}); an export needs prompt, chosen and rejected"
            )
    clean, skipped = [], []
    for number, row in enumerate(rows, start=1):
        checked = _clean_row(row, number, path)
        if checked is None:
            skipped.append(number)
        else:
            clean.append(checked)
    if not clean:
        raise EngineError(f"pairs file {str(path)!r} holds no pairs with both responses non-empty "
                          f"({len(skipped)} with an empty chosen or rejected response)")
    return Dataset.from_list(clean), skipped


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows as plain dicts, whatever the file format."""
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise EngineError(f"{str(path)!r} is a directory but not one written by datasets' save_to_disk: {exc}")
        if isinstance(loaded, DatasetDict):
            if "train" not in loaded:
                raise EngineError(f"{str(path)!r} holds splits {sorted(loaded)}, but no 'train' split to read")
            loaded = loaded["train"]
        return loaded.to_list()
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".parquet", ".pq"):
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise EngineError(f"cannot read Parquet file {str(path)!r}: {exc}") from exc
    raise EngineError(
        f"unknown pairs format {path.suffix or '(no extension)'!r} for {str(path)!r}: "
        "use .jsonl, .parquet or a save_to_disk directory"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of rows is accepted too
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EngineError(f"{str(path)!r} line {line_number} is not valid JSON: {exc.msg}") from exc
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise EngineError(f"{str(path)!r} row {number} is a {type(row).__name__}, not a JSON object")
    return rows


def _clean_row(row: dict[str, Any], number: int, path: Path) -> dict[str, Any] | None:
    """The row checked and normalised; None for a pair with an empty response (left out)."""
    where = f"{str(path)!r} row {number}"
    clean = dict(row)
    empty_response = False
    for field in TEXT_COLUMNS:
        value = row.get(field)
        if isinstance(value, list):  # chat turns (a prompt, or TRL's conversational chosen/rejected)
            try:
                text = prompt_text(value)
            except EngineError as exc:
                raise EngineError(f"{where}: field {field!r}: {exc}") from exc
            if field == "prompt":
                clean["prompt_turns"] = [{"role": str(t.get("role", "user")), "content": str(t["content"])}
                                         for t in value]
            else:
                if any(t.get("role", "assistant") != "assistant" for t in value):
                    raise EngineError(f"{where}: field {field!r}: as chat turns a response holds only "
                                      "assistant turns")
                text = "\n\n".join(str(t["content"]) for t in value)
            value = text
        if not isinstance(value, str):
            raise EngineError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
        if not value.strip():
            if field == "prompt":
                raise EngineError(f"{where}: field {field!r} is empty")
            empty_response = True
        clean[field] = value
    if "prompt_turns" not in clean or not isinstance(row.get("prompt"), list):
        clean["prompt_turns"] = [{"role": "user", "content": clean["prompt"]}]
    margin = row.get("margin")
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise EngineError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    clean["margin"] = float(margin)
    made_by = row.get("round")
    if made_by is not None and (isinstance(made_by, bool) or not isinstance(made_by, int) or made_by < 0):
        raise EngineError(f"{where}: field 'round' must be a round number (0 or more) or null, got {made_by!r}")
    clean["round"] = made_by
    return None if empty_response else clean


def round_weights(rounds: Sequence[int | None], older_rounds_weight: float) -> list[float]:
    """Each pair's weight from the round that made it: w ** k for a pair made k rounds before the newest pair's
    round, w = older_rounds_weight (1: all alike, 0: the newest round's pairs only); a pair that no round made
    (imported, seed: round None) counts as round 0, older than every round's."""
    numbers = [made_by or 0 for made_by in rounds]
    newest = max(numbers, default=0)
    return [older_rounds_weight ** (newest - number) for number in numbers]


def weigh_by_round(ds: Dataset, older_rounds_weight: float, path: str | Path) -> Dataset:
    """The pairs with a round_weight column (round_weights), those that weigh 0 left out."""
    weights = round_weights(ds["round"], older_rounds_weight)
    kept = [i for i, weight in enumerate(weights) if weight > 0]
    if not kept:  # cannot happen (the newest round's pairs weigh 1), but an empty run must not start
        raise EngineError(f"older_rounds_weight {older_rounds_weight} leaves no pair of {str(path)!r}")
    return ds.add_column("round_weight", weights).select(kept)


def split_pairs(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split pairs into (train, eval) by prompt, so no prompt is in both; about eval_fraction of the pairs held out.

    Prompts are shuffled with `seed`, then moved to the eval side until it holds at least
    eval_fraction of the pairs. With eval_fraction 0 the eval side is empty.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise EngineError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return ds, ds.select([])
    by_prompt: dict[str, list[int]] = {}
    for index, prompt in enumerate(ds["prompt"]):
        by_prompt.setdefault(prompt, []).append(index)
    if len(by_prompt) < 2:
        raise EngineError(
            f"cannot hold out pairs by prompt: all {len(ds)} pairs share one prompt; give an eval file instead"
        )
    prompts = list(by_prompt)
    random.Random(seed).shuffle(prompts)
    wanted = eval_fraction * len(ds)
    eval_indices: list[int] = []
    for prompt in prompts[:-1]:  # the last prompt always stays in train
        if len(eval_indices) >= wanted:
            break
        eval_indices.extend(by_prompt[prompt])
    held = set(eval_indices)
    train_indices = [i for i in range(len(ds)) if i not in held]
    return ds.select(train_indices), ds.select(sorted(eval_indices))


def data_version(path: str | Path) -> str:
    """A short content hash of a pairs file or save_to_disk directory (file names and bytes), for checkpoints."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EngineError(f"pairs file {str(path)!r} does not exist")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def read_prompts(source: str | Sequence[Prompt]) -> list[tuple[Prompt, str]]:
    """PPO's (prompt, input) pairs from a list of prompts (text or chat turns), a JSONL file or a text file of lines."""
    if isinstance(source, (list, tuple)):
        items: list[Any] = list(source)
    else:
        path = Path(str(source))
        if not str(source):
            raise EngineError(
                "no prompts given: pass --prompts FILE (JSONL with a 'prompt' field, or text lines)"
            )
        if not path.exists():
            raise EngineError(f"prompts file {str(source)!r} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        items = []
        for number, line in enumerate(lines, 1):
            if path.suffix in (".jsonl", ".json") or line.lstrip().startswith("{"):
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise EngineError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            else:
                items.append(line)
    prompts = []
    for number, item in enumerate(items, 1):
        if isinstance(item, dict):
            if "prompt" in item:
                prompt = item["prompt"]
                prompt_text(prompt)  # refuses what is neither text nor chat turns
                prompts.append((prompt, str(item.get("input") or "")))
            elif "instruction" in item:
                prompts.append((str(item["instruction"]), str(item.get("input") or "")))
            else:
                raise EngineError(f"prompt {number} has neither a 'prompt' nor an 'instruction' field")
        else:
            prompt_text(item)
            prompts.append((item, ""))
    prompts = [(ins, inp) for ins, inp in prompts if prompt_text(ins).strip()]
    if not prompts:
        raise EngineError("no prompts: the prompt source is empty")
    return prompts


def prompt_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The prompts of PPO's `step`: consecutive slices of a fresh shuffle per pass over the n prompts."""
    indices = []
    for k in range(step * batch, (step + 1) * batch):
        epoch = k // n
        perm = torch.randperm(n, generator=step_generator(seed, epoch, 101, torch.device("cpu")))
        indices.append(int(perm[k % n]))
    return indices
