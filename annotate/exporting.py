"""Export a campaign's judgments: Bradley-Terry pairs in TRL's columns, or every judgment raw.

Pairs (`bt_rows`): one row per judgment that prefers A or B (ties and both-bad are left out; every
labeler's judgment on a pair is its own row, imported preferences included with labeler ""), in
TRL's preference columns (https://huggingface.co/docs/trl/dataset_formats, "preference"):
  prompt, chosen, rejected   in one of TRL's two formats (`trl_format`, below)
  margin   from the labeler's strength (Judgment.margin(): Llama 2's 0, 1/3, 2/3, 1), 0.0 without one
  pair_id, labeler
  round    the number of the round whose policy wrote the pair's responses (its sample job); null for a pair
           that no round made (imported, or the demo's seed), which a DPO round's older_rounds_weight counts
           as round 0
TRL's formats:
  standard        prompt as plain text (chat turns flattened as labelers saw them); chosen, rejected
                  the responses' text
  conversational  prompt as messages [{"role", "content"}] (a text prompt is one user message);
                  chosen, rejected each one assistant message [{"role": "assistant", "content"}]
  auto (default)  conversational when the campaign holds any chat prompt, else standard: chat stays
                  chat, and a text campaign's files stay what they were. One file has one format,
                  since Arrow and Parquet need one type per column.
The raw export's `prompt` follows the same choice (responses stay text there: it is a record of
judgments, not TRL input).

Axes: a campaign may ask several questions per pair (annotate.models.Axis). Pairs are exported one axis at
a time (`axis`, a key; by default the first axis, which is all a campaign of one axis has), in the same
columns. The raw export of a campaign with several axes adds an `axes` column: every axis's choice,
strength, margin and gold answer, the first included (`gold_choice` keeps the first axis's alone).

Judgments an admin excluded (annotate.models.Exclusion) are left out of both; `left_out` says how many
and why, and the export command, the campaign page and a round's export job say it too. The files
themselves carry no trace of it, so including them again gives the earlier file back byte for byte.

Files: JSONL, Parquet, or a `datasets.Dataset.save_to_disk` directory ("hf"), written to a temporary
name beside the target and renamed, streaming rows from the database in chunks (bounded memory).
Rows come in judgment order, so the same judgments give byte-identical files.

An existing target is replaced only when it is an earlier export of ours (a JSONL or Parquet file, or a
datasets directory, with the columns of one of the schemas below, either format) of the same kind, file
or directory; anything else (a backups folder given as OUT) is refused unless `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset
from django.db.models import Count, Exists, OuterRef, Q

from annotate.models import Axis, Exclusion, Judgment, Pair, Prompt, on_axis
from annotate.sources import AI_SELECTIONS, AI_WHERE_NO_HUMAN, HUMANS, HUMANS_AND_AI

FORMATS = ("jsonl", "parquet", "hf")

TRL_FORMATS = ("auto", "conversational", "standard")
CHUNK = 2000  # rows fetched from the database and written at a time

BT_SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("margin", pa.float64()),
    ("pair_id", pa.int64()),
    ("labeler", pa.string()),
    ("round", pa.int64()),             # the round that made the pair; null: imported or seed
])

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

BT_CHAT_SCHEMA = pa.schema([
    ("prompt", MESSAGES),
    ("chosen", MESSAGES),              # one assistant message
    ("rejected", MESSAGES),
    ("margin", pa.float64()),
    ("pair_id", pa.int64()),
    ("labeler", pa.string()),
    ("round", pa.int64()),             # the round that made the pair; null: imported or seed
])

RAW_SCHEMA = pa.schema([
    ("judgment_id", pa.int64()),
    ("pair_id", pa.int64()),
    ("prompt", pa.string()),
    ("response_a", pa.string()),
    ("response_b", pa.string()),
    ("choice", pa.string()),           # a, b, tie, both_bad (in response_a / response_b terms)
    ("strength", pa.int64()),          # 1..4, null when not asked or not A/B
    ("margin", pa.float64()),
    ("a_on_left", pa.bool_()),         # shown order; null for imported judgments
    ("left_response", pa.string()),    # "a" or "b": which response was shown on the left
    ("milliseconds", pa.int64()),
    ("rationale", pa.string()),
    ("labeler", pa.string()),
    ("source", pa.string()),           # human, simulated, import
    ("gold_choice", pa.string()),      # the known answer on the first axis when the pair is a gold item, else ""
    ("created_at", pa.string()),       # ISO 8601
    ("purpose", pa.string()),          # training, or evaluation: a round's blind human evaluation (never trains)
])

RAW_CHAT_SCHEMA = RAW_SCHEMA.set(RAW_SCHEMA.get_field_index("prompt"), pa.field("prompt", MESSAGES))

# A campaign of several axes: every axis's choice on each judgment, and the pair's gold answer on it ("" none), in the
# campaign's order, the first included.
AXES = pa.list_(pa.struct([("axis", pa.string()), ("choice", pa.string()), ("strength", pa.int64()),
                           ("margin", pa.float64()), ("gold", pa.string())]))
RAW_AXES_SCHEMA = RAW_SCHEMA.append(pa.field("axes", AXES))
RAW_AXES_CHAT_SCHEMA = RAW_CHAT_SCHEMA.append(pa.field("axes", AXES))

# Pairs exported before the round column was added are earlier exports of ours too (replaceable).
OUR_COLUMNS = [BT_SCHEMA.names, BT_CHAT_SCHEMA.names, BT_SCHEMA.names[:-1], RAW_SCHEMA.names, RAW_CHAT_SCHEMA.names,
               RAW_AXES_SCHEMA.names]
OUR_COLUMNS += [[name for name in names if name != "purpose"] for names in OUR_COLUMNS[3:]]  # before purpose


class ExportError(ValueError):
    """An export that cannot be written as asked (unknown format, a target that is not an earlier export)."""


@dataclass
class LeftOut:
    """Judgments an export leaves out because an admin excluded them."""

    count: int
    reasons: list[str]
    """One line per active exclusion that leaves something out: what and why."""

    def sentence(self) -> str:
        if not self.count:
            return ""
        return (f"{self.count} judgment{'s' if self.count != 1 else ''} excluded by an admin: "
                + "; ".join(self.reasons))


@dataclass
class ExportResult:
    rows: int
    path: str
    left_out: LeftOut | None = None
    conversational: bool = False


def with_ai(judgments, ai: str):
    """`judgments` narrowed to those the AI selection (a key of AI_SELECTIONS) takes."""
    if ai not in AI_SELECTIONS:
        raise ExportError(f"unknown AI selection {ai!r}: use one of {', '.join(AI_SELECTIONS)}")
    if ai == HUMANS:
        return judgments.exclude(source=Judgment.AI)
    if ai == AI_WHERE_NO_HUMAN:
        others = Judgment.objects.filter(pair=OuterRef("pair")).exclude(source=Judgment.AI)
        return judgments.exclude(Q(source=Judgment.AI) & Q(Exists(others)))
    return judgments


def provenance(campaign, *, ai: str = HUMANS_AND_AI) -> dict:
    """Who made the Bradley-Terry pairs an export with this AI selection holds: {source: count}, and the AI
    labelers' share of them."""
    judgments = with_ai(_judgments(campaign).filter(choice__in=[Judgment.A, Judgment.B], pair__purpose=Pair.TRAINING),
                        ai)
    counts = dict(judgments.order_by().values_list("source").annotate(n=Count("id")))
    total = sum(counts.values())
    return {"ai_selection": ai, "by_source": counts,
            "ai_share": counts.get(Judgment.AI, 0) / total if total else 0.0}


def _exportable(campaign, *, raw: bool, include_simulated: bool, axis: Axis | None = None,
                ai: str = HUMANS_AND_AI):
    """The judgments this kind of export would hold if nothing were excluded."""
    judgments = with_ai(Judgment.objects.filter(pair__campaign=campaign), ai)
    if not raw:
        judgments = on_axis(judgments, axis or campaign.first_axis()).filter(
            axis_choice__in=[Judgment.A, Judgment.B], pair__purpose=Pair.TRAINING)
    if not include_simulated:
        judgments = judgments.exclude(source=Judgment.SIMULATED)
    return judgments


def left_out(campaign, *, raw: bool = False, include_simulated: bool = True, axis: Axis | None = None,
             ai: str = HUMANS_AND_AI) -> LeftOut:
    """How many judgments this export leaves out because they are excluded, and each exclusion's reason."""
    excluded = _exportable(campaign, raw=raw, include_simulated=include_simulated, axis=axis, ai=ai).filter(
        Exclusion.excluded_judgments(campaign))
    count = excluded.count()
    reasons = []
    if count:
        active = Exclusion.objects.filter(campaign=campaign, lifted_at__isnull=True).select_related("labeler")
        for exclusion in active.order_by("created_at", "pk"):
            if exclusion.judgment_id is not None:
                hits = excluded.filter(pk=exclusion.judgment_id)
            else:
                hits = excluded.filter(labeler_id=exclusion.labeler_id)
                if exclusion.since is not None:
                    hits = hits.filter(created_at__gte=exclusion.since)
            n = hits.count()
            if n:
                reasons.append(f"{exclusion.describe()} ({n})")
    return LeftOut(count, reasons)


def has_chat_prompts(campaign) -> bool:
    """Whether any of the campaign's prompts came as chat turns."""
    return Prompt.objects.filter(campaign=campaign, turns__isnull=False).exists()


def is_conversational(campaign, trl_format: str = "auto") -> bool:
    """Whether an export in `trl_format` (auto, conversational or standard) is TRL's conversational format."""
    if trl_format not in TRL_FORMATS:
        raise ExportError(f"unknown TRL format {trl_format!r}: use one of {', '.join(TRL_FORMATS)}")
    if trl_format == "auto":
        return has_chat_prompts(campaign)
    return trl_format == "conversational"


def messages(prompt) -> list[dict]:
    """The prompt as TRL's messages: its chat turns, or a text prompt as one user message."""
    if prompt.turns:
        return [{"role": turn["role"], "content": turn["content"]} for turn in prompt.turns]
    return [{"role": "user", "content": prompt.text}]


def _judgments(campaign):
    return (
        Judgment.objects.filter(pair__campaign=campaign)
        .exclude(Exclusion.excluded_judgments(campaign))
        .select_related("pair__prompt", "pair__response_a", "pair__response_b", "pair__round", "labeler")
        .order_by("pk")
    )


def bt_rows(campaign, *, include_simulated: bool = True, conversational: bool = False,
            axis: Axis | None = None, ai: str = HUMANS_AND_AI) -> Iterator[dict]:
    """Bradley-Terry pairs {prompt, chosen, rejected, margin, pair_id, labeler, round}, one per judgment that
    prefers A or B on `axis` (default: the campaign's first), of those the AI selection `ai` takes."""
    judgments = with_ai(on_axis(_judgments(campaign), axis or campaign.first_axis()).filter(
        axis_choice__in=[Judgment.A, Judgment.B], pair__purpose=Pair.TRAINING), ai)  # blind evaluations never train
    if not include_simulated:
        judgments = judgments.exclude(source=Judgment.SIMULATED)
    for judgment in judgments.iterator(chunk_size=CHUNK):
        chosen, rejected = judgment.chosen_rejected(judgment.axis_choice)
        if conversational:
            prompt = messages(judgment.pair.prompt)
            chosen = [{"role": "assistant", "content": chosen.text}]
            rejected = [{"role": "assistant", "content": rejected.text}]
        else:
            prompt, chosen, rejected = judgment.pair.prompt.text, chosen.text, rejected.text
        yield {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "margin": Judgment.margin_of(judgment.axis_strength),
            "pair_id": judgment.pair_id,
            "labeler": judgment.labeler.username if judgment.labeler else "",
            "round": judgment.pair.round.number if judgment.pair.round_id else None,
        }


def raw_rows(campaign, *, include_simulated: bool = True, conversational: bool = False,
             ai: str = HUMANS_AND_AI) -> Iterator[dict]:
    """Every judgment of the campaign (ties, both-bad and imported included; simulated unless told not to)."""
    judgments = with_ai(_judgments(campaign), ai)
    if not include_simulated:
        judgments = judgments.exclude(source=Judgment.SIMULATED)
    axes = campaign.axes()
    if len(axes) > 1:
        judgments = judgments.prefetch_related("axis_choices")
    for judgment in judgments.iterator(chunk_size=CHUNK):
        pair = judgment.pair
        row = {
            "judgment_id": judgment.pk,
            "pair_id": pair.pk,
            "prompt": messages(pair.prompt) if conversational else pair.prompt.text,
            "response_a": pair.response_a.text,
            "response_b": pair.response_b.text,
            "choice": judgment.choice,
            "strength": judgment.strength,
            "margin": judgment.margin(),
            "a_on_left": judgment.a_on_left,
            "left_response": None if judgment.a_on_left is None else ("a" if judgment.a_on_left else "b"),
            "milliseconds": judgment.milliseconds,
            "rationale": judgment.rationale,
            "labeler": judgment.labeler.username if judgment.labeler else "",
            "source": judgment.source,
            "gold_choice": pair.gold_choice,
            "created_at": judgment.created_at.isoformat(),
            "purpose": pair.purpose,
        }
        if len(axes) > 1:
            row["axes"] = _every_axis(judgment, axes)
        yield row


def _every_axis(judgment, axes) -> list[dict]:
    """Each axis's choice on this judgment (null on an axis added after it) and the pair's gold answer on it ("" none),
    in the campaign's order."""
    further = {choice.axis_id: choice for choice in judgment.axis_choices.all()}
    rows = [{"axis": axes[0].key, "choice": judgment.choice, "strength": judgment.strength}]
    for axis in axes[1:]:
        choice = further.get(axis.pk)
        rows.append({"axis": axis.key, "choice": choice and choice.choice, "strength": choice and choice.strength})
    return [{**row, "margin": Judgment.margin_of(row["strength"]), "gold": judgment.pair.gold_on(axis)}
            for row, axis in zip(rows, axes, strict=True)]


def export_axis(campaign, axis: str | None, raw: bool = False) -> Axis:
    """The axis an export asks for by key (None: the first); raises ExportError naming the campaign's axes."""
    if raw and axis is not None:
        raise ExportError("a raw export holds every axis (its axes column): leave the axis out")
    try:
        return campaign.axis(axis)
    except Axis.DoesNotExist as exc:
        raise ExportError(str(exc)) from None


def export_pairs(campaign, out_path, *, format: str = "jsonl", raw: bool = False,
                 include_simulated: bool = True, force: bool = False,
                 trl_format: str = "auto", axis: str | None = None, ai: str = HUMANS_AND_AI) -> ExportResult:
    """Write the campaign's pairs on one axis (its key; None: the first) or, with raw, every judgment, to
    out_path, of the judgments the AI selection `ai` takes; returns rows written.

    jsonl and parquet write one file, hf a save_to_disk directory; the target appears whole or not at all.
    An empty export still carries its schema in Parquet and hf; an empty JSONL file is empty.
    Raises ExportError, writing nothing, when out_path holds something that is not an earlier export of
    the same kind, unless `force`.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    conversational = is_conversational(campaign, trl_format)
    chosen_axis = export_axis(campaign, axis, raw)
    out = Path(out_path)
    refusal = "" if force else _refusal(out, format)
    if refusal:
        raise ExportError(refusal)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, schema = _rows_and_schema(campaign, raw, include_simulated, conversational, chosen_axis, ai)
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        if format == "jsonl":
            count = _write_jsonl(rows, temp)
        elif format == "parquet":
            count = _write_parquet(rows, schema, temp)
        else:
            count = _write_hf(rows, schema, temp)
        _replace(temp, out)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()
    return ExportResult(rows=count, path=str(out),
                        left_out=left_out(campaign, raw=raw, include_simulated=include_simulated,
                                          axis=chosen_axis, ai=ai),
                        conversational=conversational)


def _rows_and_schema(campaign, raw: bool, include_simulated: bool, conversational: bool, axis: Axis,
                     ai: str = HUMANS_AND_AI):
    if raw:
        if campaign.has_further_axes():
            schema = RAW_AXES_CHAT_SCHEMA if conversational else RAW_AXES_SCHEMA
        else:
            schema = RAW_CHAT_SCHEMA if conversational else RAW_SCHEMA
        return raw_rows(campaign, include_simulated=include_simulated, conversational=conversational, ai=ai), schema
    return (bt_rows(campaign, include_simulated=include_simulated, conversational=conversational, axis=axis, ai=ai),
            BT_CHAT_SCHEMA if conversational else BT_SCHEMA)


def _refusal(out: Path, format: str) -> str:
    """Why replacing `out` could destroy something that is not an earlier export ("" when it cannot)."""
    if not out.exists():
        return ""
    if format == "hf" and not out.is_dir():
        return (f"refusing to replace the file {out} with an hf export directory: choose another path, "
                "or pass --force to replace the file")
    if format != "hf" and out.is_dir():
        return (f"refusing to replace the directory {out} with a {format} file: choose a file path, "
                "or pass --force to delete the directory and everything in it")
    if _columns(out) in (*OUR_COLUMNS, []):
        return ""
    kind = "directory" if out.is_dir() else "file"
    ours = "datasets directory" if out.is_dir() else "JSONL or Parquet file"
    return (f"refusing to replace the {kind} {out}: it is not an earlier pairloop export (a {ours} of "
            "pairs or judgments); choose another path, or pass --force to replace it")


def _columns(path: Path) -> list[str] | None:
    """The column names of an export-like file or datasets directory: [] for an empty file, None unknown."""
    try:
        if path.is_dir():
            info = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))
            return list(info["features"]) if (path / "state.json").is_file() else None
        with open(path, "rb") as handle:
            head = handle.read(4)
            if not head:
                return []  # an empty JSONL export: nothing to lose
            if head == b"PAR1":
                return pq.read_schema(path).names
            handle.seek(0)
            first = json.loads(handle.readline(16 * 1024 * 1024))
            return list(first) if isinstance(first, dict) else None
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def export_to_file(campaign, handle: BinaryIO, *, format: str = "jsonl", raw: bool = False,
                   include_simulated: bool = True, trl_format: str = "auto", axis: str | None = None) -> int:
    """Write the export as one JSONL or Parquet stream into an open binary file (a download); returns rows."""
    if format not in ("jsonl", "parquet"):
        raise ExportError(f"a {format!r} export is not one file: use jsonl or parquet")
    rows, schema = _rows_and_schema(campaign, raw, include_simulated, is_conversational(campaign, trl_format),
                                    export_axis(campaign, axis, raw))
    if format == "jsonl":
        return _jsonl_into(rows, handle)
    return _parquet_into(rows, schema, handle)


def _jsonl_into(rows: Iterator[dict], handle: BinaryIO) -> int:
    count = 0
    for row in rows:
        handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        count += 1
    return count


def _write_jsonl(rows: Iterator[dict], path: Path) -> int:
    with open(path, "wb") as handle:
        count = _jsonl_into(rows, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return count


def _batches(rows: Iterator[dict], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            yield pa.RecordBatch.from_pylist(chunk, schema=schema)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk, schema=schema)


def _write_parquet(rows: Iterator[dict], schema: pa.Schema, path: Path) -> int:
    with open(path, "wb") as handle:
        return _parquet_into(rows, schema, handle)


def _parquet_into(rows: Iterator[dict], schema: pa.Schema, handle: BinaryIO) -> int:
    count = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for batch in _batches(rows, schema):
            writer.write_batch(batch)
            count += batch.num_rows
    return count


def _write_hf(rows: Iterator[dict], schema: pa.Schema, path: Path) -> int:
    """Stream the rows into an Arrow file, memory-map it as a Dataset and save_to_disk it."""
    count = 0
    with tempfile.TemporaryDirectory(prefix="pairloop-export-", dir=path.parent) as scratch:
        arrow_path = Path(scratch) / "rows.arrow"
        with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in _batches(rows, schema):
                writer.write_batch(batch)
                count += batch.num_rows
        dataset = Dataset.from_file(str(arrow_path))
        # One shard at least: datasets writes no shard for an empty dataset, and then cannot load it.
        dataset.save_to_disk(str(path), num_shards=1 if count == 0 else None)
        del dataset
    return count


def _replace(temp: Path, out: Path) -> None:
    """Move the finished export into place; a directory replaces an old one (moved aside, then removed)."""
    if temp.is_dir():
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(out, old)
        os.replace(temp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(temp, out)
