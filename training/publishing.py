"""Publish a round's preferences as a Hugging Face dataset folder with its dataset card, and push it to the Hub.

The folder (`publish_round`):
  data/train-00000-of-00001.parquet   the rows the round trained on (its export, Round.dataset_path) plus each
                                      row's judgment source: what `load_dataset(folder)` and the Hub read
  dataset_dict.json, train/           the same DatasetDict by save_to_disk, for `load_from_disk` and the trainers
  README.md                           the dataset card: the Hub's YAML metadata (license, language, task and size
                                      categories, configs, dataset_info), then sizes, label sources, agreement,
                                      position bias, exclusions, models, the round's settings and its review
`push` uploads README.md and data/ to a dataset repository of the Hub (HfApi.create_repo, upload_folder).

Every text in the card that people or models wrote (responses, names, reasons, settings) is quoted: short ones
with every ASCII punctuation mark backslash-escaped, long ones in a code fence longer than any backtick run in
them; the YAML holds no such text but the campaign's name on one line, which the YAML writer quotes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from annotate import agreement, quality
from annotate.exporting import BT_CHAT_SCHEMA, BT_SCHEMA
from annotate.models import Exclusion, Judgment, Pair
from training import evaluation, review
from training.models import Job, Round

DEFAULT_LICENSE = "other"
"""The card's license when none is given: the Hub's id for a license it does not list (campaigns record none)."""
SPLIT = "train"
DATA_FILE = f"data/{SPLIT}-00000-of-00001.parquet"  # the name push_to_hub gives a one-shard split
HUB_FILES = ["README.md", "data/*"]  # what `push` uploads: the save_to_disk copy is for this machine only
TASK_CATEGORIES = ["text-generation", "text-classification"]  # a policy (DPO) or a reward model trains on it
TAGS = ["preference", "rlhf", "pairloop"]
# The Hub's size categories (huggingface_hub.DatasetCardData, size_categories), by their upper bounds.
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
COLUMNS = {
    "prompt": "the prompt: text, or in a chat campaign TRL's messages ({role, content})",
    "chosen": "the response the labeler preferred (text, or one assistant message)",
    "rejected": "the other response",
    "margin": "how much better, from the labeler's strength (Llama 2's 0, 1/3, 2/3, 1); 0 without one",
    "pair_id": "the pair's id in the campaign: rows with the same id are several labelers' judgments of it",
    "labeler": "the labeler's username; empty for an imported preference",
    "round": "the number of the round whose policy wrote the pair; null for an imported or seed pair",
    "source": "who judged: human (labeling page), api, simulated (a rule or model standing in), import",
}


class PublishError(ValueError):
    """A round that cannot be published as asked (not finished, no export, a target that is not ours, no token)."""


@dataclass
class Published:
    rows: int
    path: str
    card: str
    """The README.md text."""


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------

def publish_round(round_: Round, out_dir, *, license: str = DEFAULT_LICENSE, languages=(), repo: str = "",
                  force: bool = False) -> Published:
    """Write the round's preferences and their card to `out_dir` (whole or not at all); see the module. The card
    loads them from `repo` when it is to be pushed there, else from `out_dir`."""
    from datasets import Dataset, DatasetDict

    if round_.status() != Job.SUCCEEDED:
        raise PublishError(f"round {round_.number} of {round_.campaign.slug} is {round_.status()}: "
                           "only a round whose jobs all succeeded is published")
    if not round_.dataset_path or not Path(round_.dataset_path).is_file():
        raise PublishError(f"round {round_.number}'s export {round_.dataset_path or '(none)'} is not on this "
                           "machine: publish where the round's exports directory is")
    out = Path(out_dir)
    if out.exists() and not force and not _is_earlier_publish(out):
        raise PublishError(f"refusing to replace {out}: it is not an earlier published round (README.md, "
                           "dataset_dict.json and data/); choose another path, or pass --force to replace it")
    table = round_rows(round_)
    dataset = DatasetDict({SPLIT: Dataset(_in_memory(table))})
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        dataset.save_to_disk(str(temp))
        (temp / "data").mkdir()
        dataset[SPLIT].to_parquet(str(temp / DATA_FILE))
        card = dataset_card(round_, dataset[SPLIT], (temp / DATA_FILE).stat().st_size, license=license,
                            languages=list(languages), source=repo or str(out.resolve()))
        (temp / "README.md").write_text(card, encoding="utf-8")
        _replace(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return Published(rows=table.num_rows, path=str(out), card=card)


def round_rows(round_: Round) -> pa.Table:
    """The rows of the round's export (what it trained on), with each row's judgment source added."""
    import pyarrow.json as pj

    path = Path(round_.dataset_path)
    with path.open("rb") as handle:
        first = json.loads(handle.readline() or b"{}")
    schema = BT_CHAT_SCHEMA if isinstance(first.get("prompt"), list) else BT_SCHEMA
    table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=schema,
                                                             unexpected_field_behavior="error"))
    sources = dict(((pair_id, username or ""), source) for pair_id, username, source in (
        Judgment.objects.filter(pair__campaign=round_.campaign, choice__in=[Judgment.A, Judgment.B])
        .values_list("pair_id", "labeler__username", "source").iterator(chunk_size=5000)))
    keys = zip(table.column("pair_id").to_pylist(), table.column("labeler").to_pylist())
    return table.append_column("source", pa.array([sources.get(key, "") for key in keys], pa.string()))


def _in_memory(table: pa.Table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


def _is_earlier_publish(out: Path) -> bool:
    return out.is_dir() and all((out / name).exists() for name in ("README.md", "dataset_dict.json", DATA_FILE))


def _replace(temp: Path, out: Path) -> None:
    """Put the finished folder in place of `out` (moved aside, then removed)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, old)
    os.replace(temp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ---------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------

def dataset_card(round_: Round, dataset, parquet_bytes: int, *, license: str, languages: list[str],
                 source: str) -> str:
    """README.md: the Hub's YAML metadata, then the body (`card_body`), which loads the data from `source`."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    rows = dataset.num_rows
    data = DatasetCardData(license=license, language=languages or None, task_categories=TASK_CATEGORIES,
                           size_categories=size_category(rows), tags=TAGS,
                           pretty_name=_one_line(f"{round_.campaign.name}: round {round_.number} preferences"))
    # As Dataset.push_to_hub writes them: the split's sizes, then where its files are.
    info = DatasetInfo(config_name="default", features=dataset.features, splits=SplitDict(),
                       download_size=parquet_bytes, dataset_size=dataset.data.nbytes)
    info.splits.add(SplitInfo(name=SPLIT, num_bytes=dataset.data.nbytes, num_examples=rows))
    info.size_in_bytes = info.download_size + info.dataset_size
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [{"split": SPLIT, "path": "data/train-*"}]}}).to_dataset_card_data(data)
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(round_, dataset, source)}"))


def size_category(rows: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")


def card_body(round_: Round, dataset, source: str) -> str:
    """The card's Markdown: what the rows are and how to load them from `source`, then one section per figure."""
    campaign = round_.campaign
    sections = [
        f"# {md(campaign.name)}: round {round_.number} preferences",
        f"The preference pairs that round {round_.number} of the pairloop campaign {md(campaign.slug)} trained "
        "its reward model on: one row per labeler's judgment that preferred one response of a pair (ties and "
        "both-bad left out), in TRL's preference columns, so TRL's RewardTrainer and DPOTrainer read it as is.",
        fence(f"from datasets import load_dataset\n\npairs = load_dataset({json.dumps(source)})[\"train\"]", "python"),
        *_sizes(round_, dataset),
        *_columns(),
        *_sources(dataset),
        *_quality(round_),
        *_exclusions(round_),
        *_models(round_),
        *_settings(round_),
        *_evaluation(round_),
        *_example(dataset),
    ]
    return "\n\n".join(sections) + "\n"


def _sizes(round_: Round, dataset) -> list[str]:
    prompts = {json.dumps(prompt, sort_keys=True) for prompt in dataset["prompt"]}
    labelers = {name for name in dataset["labeler"] if name}
    return ["## Sizes", _table(["", "count"], [
        ["rows (judgments)", dataset.num_rows], ["pairs", len(set(dataset["pair_id"]))],
        ["prompts", len(prompts)], ["labelers", len(labelers)],
    ]), f"Data version (the export's content hash): {md(round_.data_version or 'not recorded')}."]


def _columns() -> list[str]:
    return ["## Columns", _table(["column", "what it holds"], [[f"`{name}`", about] for name, about in COLUMNS.items()])]


def _sources(dataset) -> list[str]:
    counts = Counter(source or "unknown" for source in dataset["source"])
    gold = _gold_rows(dataset["pair_id"])
    return ["## Label sources", _table(["source", "rows"], [[md(name), n] for name, n in sorted(counts.items())]),
            f"Rows on gold items (pairs with a known answer, mixed in to check labelers): {gold}."]


def _gold_rows(pair_ids: list[int]) -> int:
    """Rows on gold items: pairs with a known answer."""
    gold = set(Pair.objects.filter(pk__in=set(pair_ids)).exclude(gold_choice="").values_list("pk", flat=True))
    return sum(pair_id in gold for pair_id in pair_ids)


def round_votes(round_: Round) -> list[agreement.Vote]:
    """The labelers' judgments the round's export looked at (ties and both-bad too), as the quality page reads
    them: those made before the export finished, less those excluded now."""
    export = round_.jobs.get(kind=Job.EXPORT)
    excluded = set(Judgment.objects.filter(pair__campaign=round_.campaign)
                   .filter(Exclusion.excluded_judgments(round_.campaign)).values_list("pk", flat=True))
    votes, _, _ = quality.campaign_votes(round_.campaign)
    return [vote for vote in votes
            if vote.judgment_id not in excluded and vote.created_at <= export.finished_at]


def _quality(round_: Round) -> list[str]:
    votes = round_votes(round_)
    agreed = agreement.agreement(votes)
    bias = agreement.position_bias(votes)
    return [
        "## Agreement and position bias",
        f"From the {len(votes)} judgments of labelers made before the round's export (ties and both-bad "
        "included, excluded judgments left out), computed as the campaign's quality page computes them.",
        _table(["figure", "value"], [
            ["Krippendorff's alpha (nominal: A, B, tie, both bad)", _figure(agreed.krippendorff_alpha, ".3f")],
            ["percent agreement (pairs judged twice or more)", _figure(agreed.percent, ".1%")],
            ["pairs judged twice or more", agreed.items],
            ["left side won (A/B judgments with a shown order)", _figure(bias.left_rate, ".1%")],
            ["binomial p-value of that against 50%", _figure(bias.p_value, ".3g")],
            ["judgments with a shown order", bias.n],
        ]),
    ]


def _exclusions(round_: Round) -> list[str]:
    """What the round's export left out, as its job recorded it then."""
    result = round_.jobs.get(kind=Job.EXPORT).result or {}
    reasons = result.get("excluded_reasons") or []
    if not result.get("excluded"):
        return ["## Exclusions", "No judgment was excluded from the round's data."]
    return ["## Exclusions",
            f"{result['excluded']} judgments were excluded by an admin and are not in the data; each "
            "exclusion, its reason and the judgments it left out:",
            "\n".join(f"- {md(reason)}" for reason in reasons)]


def _models(round_: Round) -> list[str]:
    config = round_.config
    backbone = reward_backbone(round_.reward_checkpoint)
    return ["## Models", _table(["model", "name or path"], [
        ["SFT policy (the campaign's starting point and the KL reference)", md(config.get("base_policy") or "")],
        ["policy this round started from", md(round_.parent_policy)],
        ["reward model backbone", md(backbone or "not recorded (its checkpoint is not on this machine)")],
        ["reward model checkpoint", md(round_.reward_checkpoint)],
        ["the round's new policy checkpoint", md(round_.policy_checkpoint)],
    ])]


def reward_backbone(checkpoint: str) -> str:
    """The model a reward checkpoint was trained from, as its pairloop.json records it ("" if unreadable)."""
    if not checkpoint:
        return ""
    from training.engine.checkpoints import read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(checkpoint) or {}
    except (OSError, ValueError):
        return ""
    return str((meta.get("args") or {}).get("model") or "")


def _settings(round_: Round) -> list[str]:
    return ["## The round's settings",
            f"As the round was launched (round {round_.number}, {round_.created_at:%Y-%m-%d}):",
            fence(json.dumps(round_.config, indent=2, sort_keys=True, ensure_ascii=False), "json")]


def _evaluation_set(round_: Round) -> list[str]:
    """The round's evaluate job's table (evaluation.round_evaluation), as its page shows it; empty without one."""
    found = evaluation.round_evaluation(round_) or {}
    if not found.get("table"):
        return []
    names = found["eval_set"]
    return [f"On the evaluation set {md(names['name'])} (version {names['version']}, {names['prompts']} prompts, "
            "never trained on), each policy answered every prompt once with the same seed and each judge compared "
            "every two policies' answers per prompt in both orders. Win rate: (wins + half the ties) / prompts, "
            "its 95% interval from bootstrap resamples of the prompts; length-controlled: the win rate a logistic "
            "regression of the outcome on the length difference predicts at equal length.",
            _table(["judge", "policy", "against", "wins / ties / losses", "win rate", "95% interval",
                    "length-controlled", "mean length (chars)"], [
                [md(row["judge"]), md(row["a_label"]), md(row["b_label"]), f"{row['wins']} / {row['ties']} / "
                 f"{row['losses']}", _figure(row["win_rate"], ".3f"),
                 "n/a" if row.get("ci_low") is None else f"{row['ci_low']:.3f} to {row['ci_high']:.3f}",
                 _figure(row.get("lc_win_rate"), ".3f"),
                 f"{row['mean_length_a']:.0f} / {row['mean_length_b']:.0f}"] for row in found["table"]])]


def _evaluation(round_: Round) -> list[str]:
    """The round's evaluation on its campaign's evaluation set, when it has one, and its review."""
    found = review.round_review(round_) or {}
    on_set = _evaluation_set(round_)
    lines = ["## Evaluation", *on_set,
             ("Its review, as the round page shows it: " if on_set else
              "This round has no evaluation set: its evaluation is its review, as the round page shows it. ") +
             "The sample job scored the new policy's answers and its opponent's on held-out prompts with the "
             "round's reward model (and, on rule-checkable prompts, with the rule judge); labelers then judged "
             "pairs of the two."]
    summary = found.get("summary") or {}
    if summary:
        opponent = md(found.get("opponent") or "none")
        lines.append(_table(["figure (sample job)", "value"], [
            ["paired against", opponent],
            ["mean reward score, new policy", _figure(summary.get("reward_new"), ".3f")],
            ["mean reward score, opponent", _figure(summary.get("reward_opponent"), ".3f")],
            ["rule judge, new policy", _figure(summary.get("judge_new"), ".3f")],
            ["rule judge, opponent", _figure(summary.get("judge_other"), ".3f")],
            ["empty answers, new policy", _figure(summary.get("empty_new"), "")],
            ["empty answers, opponent", _figure(summary.get("empty_opponent"), "")],
        ]))
    rates = found.get("rates") or []
    if rates:
        lines.append(_table(["round", "against", "human win rate (judgments)", "simulated win rate (judgments)"], [
            [row["round"].number, row["against"], _rate(row["human"]), _rate(row["simulated"])] for row in rates]))
    ratings = found.get("ratings")
    if ratings:
        lines.append(f"Bradley-Terry ratings of the policies from {ratings['judgments']} {md(ratings['source'])} "
                     "judgments (Elo scale, the SFT policy at 1000, 95% bootstrap intervals):")
        lines.append(_table(["policy", "rating", "95% interval", "judgments"], [
            [md(str(r.player)), f"{r.rating:.0f}", f"{r.low:.0f} to {r.high:.0f}", r.games]
            for r in ratings["players"]]))
    if not (summary or rates or ratings):
        lines.append("No review figures were recorded for this round.")
    return lines


def _example(dataset) -> list[str]:
    if not dataset.num_rows:
        return []
    row = dataset[0]
    shown = [f"**{name}**\n\n" + fence(_text(row[name])) for name in ("prompt", "chosen", "rejected")]
    return ["## An example row", *shown]


# ---------------------------------------------------------------------------------------------
# Quoting text in the card
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")


def md(text) -> str:
    """Text on one line of Markdown as text: white space collapsed, every ASCII punctuation mark
    backslash-escaped (CommonMark's escapes), so no markup, HTML or table cell border comes through."""
    return _PUNCTUATION.sub(r"\\\1", _one_line(str(text)))


def fence(text: str, info: str = "") -> str:
    """Text of any length as a code block: its fence longer than any run of backticks in it (CommonMark)."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{text}\n{marks}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text(value) -> str:
    """A prompt or response as the card shows it: text, or chat messages one "role: content" each."""
    if isinstance(value, list):
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _figure(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _rate(rate) -> str:
    return "n/a" if rate is None or rate.rate is None else f"{rate.rate:.3f} ({rate.total})"


# ---------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------

def hub_token() -> str:
    """The Hugging Face token a push uses (HF_TOKEN, or the hub's login); PublishError naming what is missing."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("cannot push: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to 1, which keeps "
                           "huggingface_hub off the network; unset it for the push")
    token = get_token()
    if not token:
        raise PublishError("cannot push: no Hugging Face token; set HF_TOKEN to a token with write access, "
                           "or log in with `hf auth login`")
    return token


def push(folder, repo: str, *, token: str, private: bool | None = None) -> str:
    """Upload the published folder's README.md and data/ to the dataset repository `repo` (created if need be);
    returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", exist_ok=True, private=private)
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="dataset",
                               allow_patterns=HUB_FILES, commit_message="Publish a pairloop round's preferences")
    return commit.commit_url
