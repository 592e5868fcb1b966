"""Import preference pairs from a file: JSONL, CSV, Parquet or a `datasets` save_to_disk directory.

Row shapes (extra columns are ignored):
  prompt, response_a, response_b     one pair to label
  prompt, responses                  a list of responses: every pair of them, or `pairs_per_prompt`
                                     pairs sampled per row (seeded)
  prompt, chosen, rejected [, margin]  TRL's preference format: imported already judged (chosen is
                                     response A, recorded as an imported judgment, not a labeler's)
  chosen, rejected (chat turns only)  TRL's implicit-prompt conversational format: the turns both
                                     share are the prompt, the assistant turns after them the responses

A prompt is text or chat turns [{"role", "content"}] with role system, user or assistant (in CSV, chat
turns come as a JSON string; so does a `responses` list). TRL's conversational chosen/rejected (a list
of assistant turns) are flattened to their text.

A pair already in the campaign (in either order), repeated in the file, or whose two responses are the
same text is skipped and counted, not an error.

Sizes are capped so that a hostile file is refused by its size, not by running out of memory: one line
(or CSV record, or a whole JSON array file, or Parquet or datasets row) at most MAX_LINE_BYTES; a file at
most settings.PAIRLOOP["MAX_IMPORT_BYTES"] bytes once decompressed (a gzip bomb stops there; Parquet is
checked against its metadata before any row is read, then row by row as decoded); a `responses`
list at most MAX_PAIRS_PER_ROW pairs unless `pairs_per_prompt` samples fewer.

The whole file is read twice, streaming, so memory stays bounded however long it is: the first pass
validates every row and collects errors (line and field); only a clean file gets the second pass,
which feeds the rows to `actions.add_pairs` in transactions of COMMIT_PAIRS pairs, so that an import
never holds SQLite's write lock for long and labelers keep judging meanwhile. A fault mid-way keeps the
batches before it; importing the same file again adds the rest (duplicates are skipped and counted).
pyarrow and datasets are imported inside the readers of Parquet files and saved datasets: the web
process imports this module to queue imports and never reads one.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import math
import random
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from celery import current_app
from django.conf import settings
from django.db import connections, transaction
from django.db.models import DateTimeField, ExpressionWrapper, Q, Value
from django.db.models.functions import Now
from django.utils import timezone

from annotate.actions import PairInput, _prompt_text, add_pairs
from annotate.models import EvalPrompt, ImportJob, Pair, content_hash
from pairloop.heartbeat import Heartbeat

log = logging.getLogger(__name__)

MAX_ERRORS = 20
MAX_LINE_BYTES = 16 * 1024 * 1024  # one row's bytes: its parsed objects take a few times that in memory
COMMIT_PAIRS = 1000  # pairs written per transaction by the second pass
MAX_PAIRS_PER_ROW = 1000  # pairs one `responses` list may make (n responses: n(n-1)/2) without sampling
BATCH_ROWS = 1024  # rows per Parquet / Arrow batch read
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CHAT_ROLES = ("system", "user", "assistant")  # the roles chat templates (and TRL's formats) know
KNOWN_SUFFIXES = (*JSON_SUFFIXES, ".csv", ".parquet", ".pq")
NUL_REASON = "holds a NUL character (\\u0000), which PostgreSQL cannot store in text"


@dataclass(frozen=True)
class RowError:
    """One problem in the file.

    `line` is the 1-based line (JSONL, CSV) or row (Parquet, datasets); 0 means the file as a whole."""

    line: int
    field: str
    reason: str

    def describe(self, unit: str = "line") -> str:
        where = f"{unit} {self.line}" if self.line else "file"
        return f"{where}, field {self.field!r}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ImportFailed(Exception):
    """The file was refused and nothing was imported; `errors` names the first problems (line and field)."""

    def __init__(self, errors: list[RowError], *, unit: str = "line", total: int | None = None):
        self.errors = list(errors)
        self.unit = unit
        self.total = total if total is not None else len(self.errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = "; ".join(error.describe(self.unit) for error in self.errors[:5])
        more = self.total - min(5, len(self.errors))
        suffix = f" (and {more} more error{'s' if more != 1 else ''})" if more > 0 else ""
        return f"{shown}{suffix}"

    def lines(self) -> list[str]:
        """Every collected error, one per line (for the management command)."""
        out = [error.describe(self.unit) for error in self.errors]
        if self.total > len(self.errors):
            out.append(f"... {self.total - len(self.errors)} more errors not listed")
        return out


@dataclass
class ImportResult:
    created: int
    skipped: int
    rows: int


# progress(phase, rows done, rows in all): phase "checking" (rows in all not known yet: None) or "importing".
Progress = Callable[[str, int, "int | None"], None]


class BadRow(Exception):
    """A row that cannot be read, naming its field and why (the import's and the evaluation set's readers)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def import_file(campaign, path, *, pairs_per_prompt: int | None = None, seed: int = 0,
                priority: int = 0, progress: Progress | None = None) -> ImportResult:
    """Validate the whole file, then add its pairs to the campaign; raises ImportFailed and adds nothing
    when any row is bad. `progress` is told how far each pass got, every few thousand rows."""
    path = Path(path)
    if pairs_per_prompt is not None and pairs_per_prompt < 1:
        raise ImportFailed([RowError(0, "pairs_per_prompt", f"must be at least 1, got {pairs_per_prompt}")])
    low, high = Pair.PRIORITY_RANGE
    if not low <= priority <= high:
        raise ImportFailed([RowError(0, "priority", f"must be from {low} to {high}, got {priority}")])
    reader = reader_for(path, settings.PAIRLOOP["MAX_IMPORT_BYTES"])

    # Pass 1: validate every row, keep the first MAX_ERRORS problems and count the rest.
    errors: list[RowError] = []
    total_errors = rows = 0
    evaluated = set(EvalPrompt.objects.filter(eval_set__campaign=campaign).values_list("hash", flat=True))
    for line, row in reader.rows():
        if isinstance(row, RowError):
            problem = row
        else:
            rows += 1
            if progress is not None and rows % BATCH_ROWS == 0:
                progress("checking", rows, None)
            try:
                pairs = _pairs_from_row(row, csv_text=reader.csv_text)
                if isinstance(pairs, _ResponseList):
                    pairs.check_count(pairs_per_prompt)
                if content_hash(_prompt_text(pairs.prompt)[0]) in evaluated:
                    raise BadRow("prompt", "is in an evaluation set of this campaign: a training prompt never is")
                continue
            except BadRow as bad:
                problem = RowError(line, bad.field, bad.reason)
        total_errors += 1
        if len(errors) < MAX_ERRORS:
            errors.append(problem)
    if not errors and rows == 0:
        errors, total_errors = [RowError(0, "", "the file holds no rows")], 1
    if errors:
        raise ImportFailed(errors, unit=reader.unit, total=total_errors)

    # Pass 2: stream the (now known good) rows into add_pairs, one transaction per COMMIT_PAIRS pairs.
    rng = random.Random(seed)
    done = 0
    if progress is not None:
        progress("importing", 0, rows)

    def items() -> Iterator[PairInput]:
        nonlocal done
        for line, row in reader.rows():
            done += 1
            if isinstance(row, RowError):  # the file changed between the passes
                raise ImportFailed([row], unit=reader.unit)
            try:
                pairs = _pairs_from_row(row, csv_text=reader.csv_text)
            except BadRow as bad:
                raise ImportFailed([RowError(line, bad.field, bad.reason)], unit=reader.unit) from None
            if isinstance(pairs, _ResponseList):
                yield from pairs.sample(pairs_per_prompt, rng)
            else:
                yield pairs

    created = skipped = 0
    pending = items()
    try:
        while batch := list(itertools.islice(pending, COMMIT_PAIRS)):
            added = add_pairs(campaign, batch, priority=priority)
            created, skipped = created + added.created, skipped + added.skipped
            if progress is not None:
                progress("importing", done, rows)
    except ImportFailed as failed:
        if created or skipped:
            reason = (f"the file changed after it was checked; {created} pairs from the rows before were "
                      "added: import it again once it is settled (they are skipped then)")
            failed.errors.append(RowError(0, "", reason))
            failed.total += 1
        raise
    return ImportResult(created=created, skipped=skipped, rows=rows)


def import_rows(campaign, rows: list, *, pairs_per_prompt: int | None = None, seed: int = 0,
                priority: int = 0) -> ImportResult:
    """Import rows given in memory (each as a JSONL file's line) as import_file imports a file: row N is
    line N, any bad row and nothing is added."""
    with tempfile.TemporaryDirectory(prefix="pairloop-rows-") as folder:
        path = Path(folder) / "rows.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return import_file(campaign, path, pairs_per_prompt=pairs_per_prompt, seed=seed, priority=priority)


def pairs_asked(rows: list, pairs_per_prompt: int | None) -> int:
    """How many pairs `rows` would make, before any is checked (a `responses` list makes every pair, or
    pairs_per_prompt)."""
    return sum(_ResponseList("", row["responses"]).pair_count(pairs_per_prompt)
               if isinstance(row, dict) and isinstance(row.get("responses"), list) else 1 for row in rows)


def start_import_job(campaign, user, upload, *, pairs_per_prompt: int | None = None, seed: int = 0,
                     priority: int = 0) -> ImportJob:
    """Keep a Django UploadedFile in the data directory and queue its import (sent to a worker on commit).

    The file keeps its suffix (.jsonl, .csv.gz, ...); without a known one its format is told from its content.
    """
    folder = uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{upload_suffix(upload.name or '')}"
    try:
        with open(path, "wb") as handle:
            for chunk in upload.chunks():
                handle.write(chunk)
        with transaction.atomic():
            job = ImportJob.objects.create(
                campaign=campaign, uploaded_by=user, file_name=(upload.name or "")[:255], file_path=str(path),
                file_size=path.stat().st_size,
                options={"pairs_per_prompt": pairs_per_prompt, "seed": seed, "priority": priority})
            transaction.on_commit(lambda: _send(job))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return job


IMPORT_TASK = "annotate.import_job"  # annotate/tasks.py, on the default queue


def send_import(job_id: int) -> None:
    """Send an import job to the workers, by its task's name."""
    current_app.send_task(IMPORT_TASK, args=[job_id])


def _send(job: ImportJob) -> None:
    """Hand the job to a worker (on commit); when the queue cannot take it, fail the job with the reason and
    drop the upload, so it never sits queued for ever."""
    try:
        send_import(job.pk)
    except Exception as exc:  # noqa: BLE001 - kombu and redis-py raise several types for a lost broker
        log.exception("could not queue import job %s", job.pk)
        error = (f"Could not reach the job queue (Redis): {type(exc).__name__}: {exc}. Nothing was imported; "
                 "upload the file again once the queue is back.")
        if ImportJob.objects.filter(pk=job.pk, status=ImportJob.QUEUED).update(
                status=ImportJob.FAILED, errors=[error], finished_at=timezone.now()):
            Path(job.file_path).unlink(missing_ok=True)


class _JobTaken(Exception):
    """The job is no longer running on this worker: the stale-job sweep failed it meanwhile."""


def run_import_job(job_id: int) -> ImportJob | None:
    """The task's body: import a queued job's file, writing progress and the result or the errors to its row.

    Only a queued job is taken (a conditional update), so a message delivered twice imports once. A thread
    keeps its heartbeat fresh while it runs; a job the sweep failed meanwhile (recover_stale_jobs) stops at
    its next progress report and is never written again. The upload is deleted when the job ends."""
    if not ImportJob.objects.filter(pk=job_id, status=ImportJob.QUEUED).update(
            status=ImportJob.CHECKING, started_at=timezone.now(), heartbeat_at=Now()):
        return ImportJob.objects.filter(pk=job_id).first()  # gone, finished, or taken by another worker
    job = ImportJob.objects.select_related("campaign").get(pk=job_id)
    running = ImportJob.objects.filter(pk=job.pk, status__in=ImportJob.RUNNING)

    def progress(phase: str, done: int, total: int | None) -> None:
        job.status = ImportJob.CHECKING if phase == "checking" else ImportJob.IMPORTING
        job.rows_done, job.rows_total = done, total
        if not running.update(status=job.status, rows_done=done, rows_total=total, heartbeat_at=Now()):
            raise _JobTaken()

    options = job.options
    # The thread beats until the job runs no more (finished, or failed by the sweep), then closes its own
    # database connections.
    heartbeat = Heartbeat(f"heartbeat-import-{job.pk}", settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"] / 3,
                          lambda: bool(running.update(heartbeat_at=Now())), on_exit=connections.close_all)
    heartbeat.start()
    try:
        result = import_file(job.campaign, job.file_path, pairs_per_prompt=options.get("pairs_per_prompt"),
                             seed=options.get("seed") or 0, priority=options.get("priority") or 0,
                             progress=progress)
    except _JobTaken:
        log.warning("import job %s was failed by the stale-job sweep while it ran; stopped", job.pk)
        return ImportJob.objects.get(pk=job.pk)
    except ImportFailed as failed:
        job.status, job.errors = ImportJob.FAILED, failed.lines()
    except Exception as exc:  # noqa: BLE001 - the row is the record: the page shows why it stopped
        log.exception("import job %s stopped", job.pk)
        job.status, job.errors = ImportJob.FAILED, [f"the import stopped: {type(exc).__name__}: {exc}"]
    else:
        job.status, job.rows_done, job.rows_total = ImportJob.SUCCEEDED, result.rows, result.rows
        job.pairs_created, job.pairs_skipped = result.created, result.skipped
    finally:
        heartbeat.stop()
    Path(job.file_path).unlink(missing_ok=True)
    job.finished_at = timezone.now()
    fields = ["status", "rows_done", "rows_total", "pairs_created", "pairs_skipped", "errors", "finished_at"]
    running.update(**{name: getattr(job, name) for name in fields})
    job.refresh_from_db()
    return job


def recover_stale_jobs() -> list[ImportJob]:
    """Import jobs left behind, found by Celery beat every minute: a checking or importing job whose heartbeat
    is older than PAIRLOOP_HEARTBEAT_STALE_SECONDS (its worker died) fails; a job queued longer than
    PAIRLOOP_IMPORT_QUEUED_SECONDS is sent to the workers once more (a lost message), and fails when still
    queued that long after. A failed job's upload is deleted, and so is an upload no unfinished job holds.
    Returns the jobs failed."""
    stale_after = settings.PAIRLOOP["HEARTBEAT_STALE_SECONDS"]
    queued_after = settings.PAIRLOOP["IMPORT_QUEUED_SECONDS"]
    db_cutoff = ExpressionWrapper(Now() - Value(timedelta(seconds=stale_after)), output_field=DateTimeField())
    cutoff = timezone.now() - timedelta(seconds=queued_after)
    failed = []
    silent = Q(heartbeat_at__lt=db_cutoff) | Q(
        heartbeat_at__isnull=True, started_at__lt=timezone.now() - timedelta(seconds=stale_after))
    for job in ImportJob.objects.filter(silent, status__in=ImportJob.RUNNING):
        after = ("Nothing was imported; upload the file again." if job.status == ImportJob.CHECKING else
                 "The pairs it had added stay; upload the file again to add the rest (those are skipped).")
        reason = (f"The worker stopped while {job.get_status_display()}: no heartbeat for over "
                  f"{stale_after} s (PAIRLOOP_HEARTBEAT_STALE_SECONDS); it was probably killed. {after}")
        if _fail_job(job, reason, silent, status__in=ImportJob.RUNNING):  # still silent as it is failed
            failed.append(job)
    waiting = ImportJob.objects.filter(status=ImportJob.QUEUED, resent_at__isnull=True, created_at__lt=cutoff)
    for job in waiting:
        if ImportJob.objects.filter(pk=job.pk, status=ImportJob.QUEUED, resent_at__isnull=True).update(
                resent_at=timezone.now()):
            log.warning("import job %s was queued for over %s s: sending it again", job.pk, queued_after)
            try:
                send_import(job.pk)  # a copy still in the queue finds the job taken and does nothing
            except Exception:  # noqa: BLE001 - the job then fails on a later sweep
                log.exception("could not queue import job %s again", job.pk)
    for job in ImportJob.objects.filter(status=ImportJob.QUEUED, resent_at__lt=cutoff):
        minutes = int((timezone.now() - job.created_at).total_seconds() // 60)
        reason = (f"No worker took this import in {minutes} min, though it was sent twice "
                  "(PAIRLOOP_IMPORT_QUEUED_SECONDS): is a worker consuming the default queue (celery -A "
                  "pairloop worker -Q default) and is Redis reachable from it? Nothing was imported; upload "
                  "the file again.")
        if _fail_job(job, reason, Q(resent_at__lt=cutoff), status=ImportJob.QUEUED):
            failed.append(job)
    _delete_orphan_uploads(time.time() - queued_after)
    return failed


def _fail_job(job: ImportJob, reason: str, still: Q, **unchanged) -> bool:
    """Fail the job with the reason and delete its upload, if it is still as it was found (`still` and
    `unchanged`: a condition, not an equality, since SQLite spells the times it writes unlike Python's)."""
    if not ImportJob.objects.filter(still, pk=job.pk, **unchanged).update(
            status=ImportJob.FAILED, errors=[reason], finished_at=timezone.now()):
        return False
    Path(job.file_path).unlink(missing_ok=True)
    log.warning("%s failed: %s", job, reason)
    return True


def _delete_orphan_uploads(older_than: float) -> None:
    """Uploads no unfinished job holds (the web process died before committing the job), by file name."""
    folder = uploads_dir()
    if not folder.is_dir():
        return
    held = {Path(path).name for path in
            ImportJob.objects.exclude(status__in=ImportJob.FINISHED).values_list("file_path", flat=True)}
    for path in folder.iterdir():
        try:
            if path.is_file() and path.name not in held and path.stat().st_mtime < older_than:
                path.unlink(missing_ok=True)
                log.warning("deleted the upload %s, which no import job holds", path.name)
        except OSError:
            log.warning("could not check the upload %s", path, exc_info=True)


def uploads_dir() -> Path:
    """Where web uploads wait for their import job: in the data directory, which default workers share."""
    return Path(settings.DATA_DIR) / "uploads"


def upload_suffix(name: str) -> str:
    """The suffix an upload is stored under so its reader is chosen by it (".jsonl.gz"); "": told from the content."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in (*JSON_SUFFIXES, ".csv"):
        return "".join(suffixes[-2:])
    if suffixes and suffixes[-1] in KNOWN_SUFFIXES:
        return suffixes[-1]
    return ""  # unknown: the format is told from the content


# ---------------------------------------------------------------------------------------------
# Readers: each yields (line or row number, dict | RowError), streaming
# ---------------------------------------------------------------------------------------------

class Reader:
    """A file's rows: `rows()` yields (line or row number, dict | RowError), streaming."""

    unit = "line"
    csv_text = False  # CSV cells are all text: JSON lists and numbers come as strings

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> Iterator[tuple[int, dict | RowError]]:
        raise NotImplementedError


class _TooBig(Exception):
    """The file inflated past the import's byte cap."""


class _TooLong(Exception):
    """One line ran past MAX_LINE_BYTES."""


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _CappedRaw(io.RawIOBase):
    """A byte stream (a plain or a gzip file) that raises _TooBig once more than `cap` bytes came out."""

    def __init__(self, inner, cap: int):
        self.inner, self.cap, self.count = inner, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.inner.readinto(buffer)
        self.count += n
        if self.count > self.cap:
            raise _TooBig()
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


class _TextFile(Reader):
    """JSONL or CSV, plain or gzip: read through the byte cap, line by line through the line cap."""

    def __init__(self, path: Path, compressed: bool, max_bytes: int):
        super().__init__(path)
        self.compressed, self.max_bytes = compressed, max_bytes

    def _open(self) -> io.BufferedReader:
        inner = gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")
        return io.BufferedReader(_CappedRaw(inner, self.max_bytes))

    def _problem(self, exc: Exception) -> str:
        """The reason for a read that stopped: too big, a broken gzip stream, or not text."""
        if isinstance(exc, _TooBig):
            gunzipped = " once decompressed" if self.compressed else ""
            return (f"the file holds more than {_size(self.max_bytes)}{gunzipped} "
                    "(PAIRLOOP_MAX_IMPORT_BYTES): nothing past here was read")
        if isinstance(exc, _TooLong):
            return f"longer than {_size(MAX_LINE_BYTES)}, the most one row may hold"
        if isinstance(exc, UnicodeDecodeError):
            return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        return f"cannot decompress the gzip file ({exc})"


READ_ERRORS = (_TooBig, _TooLong, OSError, EOFError, zlib.error, UnicodeDecodeError)


def reader_for(path: Path, max_bytes: int) -> Reader:
    """The reader of the file or datasets directory at `path`, by its suffix, else by its content."""
    if not path.exists():
        raise ImportFailed([RowError(0, "", f"{str(path)!r} does not exist")])
    if path.is_dir():
        return _DatasetDirReader(path, max_bytes)
    name = path.name.lower()
    compressed = name.endswith(".gz")
    suffix = Path(name[:-3]).suffix if compressed else path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _JsonlReader(path, compressed, max_bytes)
    if suffix == ".csv":
        return _CsvReader(path, compressed, max_bytes)
    if suffix in (".parquet", ".pq"):
        return _ParquetReader(path, max_bytes)
    return _sniff(path, compressed, max_bytes)


def _sniff(path: Path, compressed: bool, max_bytes: int) -> Reader:
    """An unknown extension: tell the format from the first bytes."""
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4096)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImportFailed([RowError(0, "", f"cannot read the file: {exc}")]) from None
    if head.startswith(b"PAR1"):
        return _ParquetReader(path, max_bytes)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"{", b"[")):
        return _JsonlReader(path, compressed, max_bytes)
    first_line = text.split(b"\n", 1)[0]
    if b"," in first_line and (b"prompt" in first_line or b"chosen" in first_line):
        return _CsvReader(path, compressed, max_bytes)
    reason = (f"unknown format {path.suffix or '(no extension)'!r}: use JSONL (.jsonl), CSV (.csv), "
              "Parquet (.parquet) or a datasets save_to_disk directory")
    raise ImportFailed([RowError(0, "", reason)])


BOM = b"\xef\xbb\xbf"


class _JsonlReader(_TextFile):
    """JSON lines, one object per line (blank lines skipped). A file that is one JSON array is read whole."""

    def rows(self):
        try:
            with self._open() as handle:
                start = handle.read(4096).lstrip(BOM + b" \t\r\n")
        except READ_ERRORS as exc:
            yield 0, RowError(0, "", self._problem(exc))
            return
        if start.startswith(b"["):
            yield from self._array_rows()
            return
        number = 0
        with self._open() as handle:
            try:
                while raw := handle.readline(MAX_LINE_BYTES + 1):
                    number += 1
                    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                        yield number, RowError(number, "", self._problem(_TooLong()))
                        while raw and not raw.endswith(b"\n"):  # skip the rest of it, a block at a time
                            raw = handle.readline(1 << 20)
                        continue
                    if number == 1 and raw.startswith(BOM):
                        raw = raw[3:]
                    if raw.strip():
                        yield number, _json_object(number, raw)
            except READ_ERRORS as exc:
                yield number + 1, RowError(number + 1, "", self._problem(exc))

    def _array_rows(self):
        """A JSON array of objects (datasets' to_json(lines=False)); not streamed, so at most MAX_LINE_BYTES;
        rows are numbered 1.."""
        self.unit = "row"
        try:
            with self._open() as handle:
                data = handle.read(MAX_LINE_BYTES + 1)
        except READ_ERRORS as exc:
            yield 0, RowError(0, "", self._problem(exc))
            return
        if len(data) > MAX_LINE_BYTES:
            reason = (f"a JSON array is read whole, so it may hold at most {_size(MAX_LINE_BYTES)}: "
                      "write JSON lines (one object per line) instead")
            yield 0, RowError(0, "", reason)
            return
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            yield 0, RowError(0, "", f"invalid JSON: {exc}")
            return
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                yield number, RowError(number, "", f"not a JSON object (got {_kind(row)})")
            else:
                yield number, row


def _json_object(number: int, raw: bytes) -> dict | RowError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError(number, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(number, "", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return RowError(number, "", "invalid JSON: nested too deeply")
    if not isinstance(row, dict):
        return RowError(number, "", f"not a JSON object (got {_kind(row)})")
    return row


def _capped_lines(handle: io.TextIOBase) -> Iterator[str]:
    """The handle's lines, raising _TooLong at one longer than MAX_LINE_BYTES (before reading all of it)."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(("\n", "\r")):
            raise _TooLong()
        yield line


class _CsvReader(_TextFile):
    """CSV with a header line (line 1); records are numbered by the file line they start on."""

    csv_text = True

    def rows(self):
        csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # long responses: one row's worth
        with io.TextIOWrapper(self._open(), encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(_capped_lines(handle))
            try:
                header = next(reader, None)
            except (csv.Error, *READ_ERRORS) as exc:
                yield 1, RowError(1, "", f"cannot read the header: {self._csv_problem(exc)}")
                return
            if not header:
                return
            header = [name.strip() for name in header]
            problem = _header_problem(header)
            if problem:
                yield 1, RowError(1, "", problem)
                return
            while True:
                start = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except (csv.Error, *READ_ERRORS) as exc:
                    yield start, RowError(start, "", self._csv_problem(exc))
                    return  # the reader cannot resynchronise after a broken record
                if not cells or all(not cell.strip() for cell in cells):
                    continue
                if len(cells) > len(header):
                    reason = f"{len(cells)} fields, but the header names {len(header)}"
                    yield start, RowError(start, "", reason)
                    continue
                yield start, dict(zip(header, cells))  # fewer cells: the missing fields are missing

    def _csv_problem(self, exc: Exception) -> str:
        return f"unreadable CSV: {exc}" if isinstance(exc, csv.Error) else self._problem(exc)


def _header_problem(columns: list[str]) -> str:
    names = set(columns)
    if {"chosen", "rejected"} <= names or "prompt" in names:
        return ""
    return (f"unknown shape: columns {', '.join(columns) or '(none)'}; expected prompt with response_a and "
            "response_b, prompt with responses, or prompt with chosen and rejected")


class _ParquetReader(Reader):
    """Parquet, read a batch of rows at a time (pyarrow's iter_batches); rows numbered from 1.

    Its columns' decompressed size (from the file's metadata) is checked against the byte cap before any
    row is read; text is read as dictionary arrays, so a value repeated a million times is held once while
    _arrow_rows counts what it decodes to."""

    unit = "row"

    def __init__(self, path: Path, max_bytes: int):
        super().__init__(path)
        self.max_bytes = max_bytes

    def rows(self):
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(self.path).schema
            texts = [column.path for column in schema if column.physical_type == "BYTE_ARRAY"]
            parquet = pq.ParquetFile(self.path, read_dictionary=texts)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            yield 0, RowError(0, "", f"cannot read the Parquet file: {exc}")
            return
        problem = _header_problem(parquet.schema_arrow.names)
        if problem:
            yield 0, RowError(0, "", problem)
            return
        meta = parquet.metadata
        stored = sum(meta.row_group(g).column(c).total_uncompressed_size
                     for g in range(meta.num_row_groups) for c in range(meta.num_columns))
        if stored > self.max_bytes:
            yield 0, RowError(0, "", f"its columns hold {_size(stored)} once decompressed, more than "
                                     f"{_size(self.max_bytes)} (PAIRLOOP_MAX_IMPORT_BYTES): no row was read")
            return
        with parquet:
            yield from _arrow_rows(parquet.iter_batches(batch_size=BATCH_ROWS), self.max_bytes)


class _DatasetDirReader(Reader):
    """A directory written by datasets' save_to_disk (a Dataset, or a DatasetDict's 'train' split).

    The Arrow files are memory-mapped and read a batch at a time, through the same caps as Parquet."""

    unit = "row"

    def __init__(self, path: Path, max_bytes: int):
        super().__init__(path)
        self.max_bytes = max_bytes

    def rows(self):
        from datasets import DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(self.path))
        except (FileNotFoundError, ValueError) as exc:
            yield 0, RowError(0, "", f"a directory, but not one written by datasets' save_to_disk ({exc})")
            return
        if isinstance(loaded, DatasetDict):
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                yield 0, RowError(0, "", f"holds splits {sorted(loaded)} but no 'train' split to import")
                return
        problem = _header_problem(list(loaded.column_names))
        if problem:
            yield 0, RowError(0, "", problem)
            return
        if loaded.data.nbytes > self.max_bytes:  # memory-mapped: the size on disk, nothing read yet
            yield 0, RowError(0, "", f"it holds {_size(loaded.data.nbytes)}, more than "
                                     f"{_size(self.max_bytes)} (PAIRLOOP_MAX_IMPORT_BYTES): no row was read")
            return
        tables = loaded.with_format("arrow").iter(batch_size=BATCH_ROWS)
        yield from _arrow_rows((batch for table in tables for batch in table.to_batches()), self.max_bytes)


def _arrow_rows(batches, max_bytes: int) -> Iterator[tuple[int, dict | RowError]]:
    """Rows of Arrow record batches, numbered from 1, counted before they become Python objects: a row over
    MAX_LINE_BYTES is refused naming its largest field, and reading stops once the rows so far decode to more
    than max_bytes. Python objects are made at most MAX_LINE_BYTES' worth at a time."""
    import pyarrow as pa

    number = total = 0
    plain = None
    for batch in batches:
        plain = plain or pa.schema([field.with_type(_plain_type(field.type)) for field in batch.schema])
        cells = np.stack([_cell_sizes(column) for column in batch.columns]) if batch.num_columns else None
        if cells is None or not batch.num_rows:
            continue
        row_sizes = cells.sum(axis=0)
        before = np.concatenate(([0], np.cumsum(row_sizes)))  # before[i]: the batch's bytes ahead of row i
        crossed = int(np.searchsorted(total + before[1:], max_bytes, side="right"))
        sizes, ahead = row_sizes.tolist(), before.tolist()  # Python ints: the walk below is per row
        start = 0
        while start < crossed:
            if sizes[start] > MAX_LINE_BYTES:
                field = batch.column_names[int(cells[:, start].argmax())]
                reason = (f"{_size(int(cells[:, start].max()))} (the row {_size(sizes[start])}), "
                          f"more than the {_size(MAX_LINE_BYTES)} one row may hold")
                yield number + start + 1, RowError(number + start + 1, field, reason)
                start += 1
                continue
            end = start + 1  # a run of rows that are each within the row cap, MAX_LINE_BYTES in all at most
            while (end < crossed and sizes[end] <= MAX_LINE_BYTES
                   and ahead[end + 1] - ahead[start] <= MAX_LINE_BYTES):
                end += 1
            rows = batch.slice(start, end - start).cast(plain)  # decoded in Arrow: to_pylist is faster then
            for offset, row in enumerate(rows.to_pylist(), start=start + 1):
                yield number + offset, row
            start = end
        if crossed < batch.num_rows:
            reason = (f"the file holds more than {_size(max_bytes)} once decoded "
                      "(PAIRLOOP_MAX_IMPORT_BYTES): nothing past here was read")
            yield number + crossed + 1, RowError(number + crossed + 1, "", reason)
            return
        number += batch.num_rows
        total += int(before[-1])


def _plain_type(kind):
    """The Arrow type with every dictionary (at any depth) replaced by its values' type."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _plain_type(kind.value_type)
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_plain_type(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_plain_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_plain_type(field.type)) for field in kind])
    return kind


def _cell_sizes(array):
    """Bytes each value of an Arrow array decodes to (text's UTF-8 length, 8 for a number, a list's items
    plus one each), worked out on the array itself: a dictionary's values are measured once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        lengths = np.append(_cell_sizes(array.dictionary), 0)  # the extra 0: a null's size
        return lengths[array.indices.fill_null(len(array.dictionary)).to_numpy(zero_copy_only=False)]
    if pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind) \
            or pa.types.is_large_binary(kind):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        items = pc.list_flatten(array)
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=_cell_sizes(items) + 1, minlength=len(array)).astype(np.int64)
    if pa.types.is_struct(kind):
        return sum((_cell_sizes(field) for field in array.flatten()), np.zeros(len(array), dtype=np.int64))
    width = kind.bit_width // 8 if hasattr(kind, "bit_width") and kind.bit_width >= 8 else 8
    return np.full(len(array), width, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Rows to pairs
# ---------------------------------------------------------------------------------------------

@dataclass
class _ResponseList:
    prompt: str | list[dict]
    responses: list[str]

    def pair_count(self, pairs_per_prompt: int | None) -> int:
        n = len(self.responses)
        every = n * (n - 1) // 2
        return every if pairs_per_prompt is None else min(every, pairs_per_prompt)

    def check_count(self, pairs_per_prompt: int | None) -> None:
        count = self.pair_count(pairs_per_prompt)
        if count <= MAX_PAIRS_PER_ROW:
            return
        made = (f"{len(self.responses)} responses make {count} pairs" if pairs_per_prompt is None
                else f"{pairs_per_prompt} pairs per prompt asked")
        raise BadRow("responses", f"{made}, more than the {MAX_PAIRS_PER_ROW} one row may add: sample at "
                                   "most that many with pairs per prompt (--pairs-per-prompt)")

    def sample(self, pairs_per_prompt: int | None, rng: random.Random) -> list[PairInput]:
        """Every pair, or `pairs_per_prompt` of them drawn by rng (picked by index: no list of every pair)."""
        every = len(self.responses) * (len(self.responses) - 1) // 2
        chosen = range(every)
        if pairs_per_prompt is not None and pairs_per_prompt < every:
            chosen = sorted(rng.sample(chosen, pairs_per_prompt))
        return [PairInput(self.prompt, self.responses[i], self.responses[j])
                for i, j in _combinations_at(len(self.responses), chosen)]


def _combinations_at(n: int, indices) -> Iterator[tuple[int, int]]:
    """The pairs at the given sorted positions of itertools.combinations(range(n), 2), in one walk."""
    i = first = 0  # first: the position of (i, i + 1)
    for k in indices:
        while k >= first + (n - 1 - i):
            first += n - 1 - i
            i += 1
        yield i, i + 1 + (k - first)


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def _pairs_from_row(row: dict[str, Any], *, csv_text: bool) -> PairInput | _ResponseList:
    """The pair (or the list of responses to pair) a row holds; raises BadRow naming the field."""
    trl = _present(row, "chosen") or _present(row, "rejected")
    listed = _present(row, "responses")
    ab = _present(row, "response_a") or _present(row, "response_b")
    if trl + listed + ab > 1:
        shape_fields = ("chosen", "rejected", "responses", "response_a", "response_b")
        found = [k for k in shape_fields if _present(row, k)]
        raise BadRow("", f"unknown shape: mixes {', '.join(found)}; use one of response_a/response_b, "
                          "responses, or chosen/rejected")
    if trl:
        return _trl_pair(row, csv_text)
    prompt = row_prompt(row, csv_text)
    if listed:
        responses = _responses(row["responses"], csv_text)
        return _ResponseList(prompt, responses)
    if ab:
        return PairInput(prompt, row_response(row, "response_a", csv_text),
                         row_response(row, "response_b", csv_text))
    fields = ", ".join(k for k in row if _present(row, k)) or "none"
    raise BadRow("", f"unknown shape (fields: {fields}): expected prompt with response_a and response_b, "
                      "prompt with responses, or prompt with chosen and rejected")


def _trl_pair(row: dict, csv_text: bool) -> PairInput:
    margin = _margin(row.get("margin"), csv_text)
    no_prompt = not _present(row, "prompt") or (csv_text and not str(row["prompt"]).strip())
    if no_prompt:
        chosen, rejected = (_maybe_json_list(row.get(k), csv_text, field=k) for k in ("chosen", "rejected"))
        if isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen_text, rejected_text = _split_implicit_prompt(chosen, rejected)
            return PairInput(prompt, chosen_text, rejected_text, preferred="a", margin=margin)
        raise BadRow("prompt", "missing" if not _present(row, "prompt") else "empty text")
    prompt = row_prompt(row, csv_text)
    return PairInput(prompt, row_response(row, "chosen", csv_text), row_response(row, "rejected", csv_text),
                     preferred="a", margin=margin)


def row_prompt(row: dict, csv_text: bool) -> str | list[dict]:
    """A row's `prompt`: text or chat turns; raises BadRow naming the field."""
    if "prompt" not in row or row["prompt"] is None:
        raise BadRow("prompt", "missing")
    value = _maybe_json_list(row["prompt"], csv_text, field="prompt")
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("prompt", "empty text")
        if "\x00" in value:
            raise BadRow("prompt", NUL_REASON)
        return value
    if isinstance(value, list):
        return _turns(value, "prompt")
    raise BadRow("prompt", f"must be text or chat turns [{{role, content}}], got {_kind(value)}")


def _turns(value: list, field: str) -> list[dict]:
    if not value:
        raise BadRow(field, "empty list of chat turns")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise BadRow(field, f"turn {number} is {_kind(turn)}, not an object with role and content")
        for key in ("role", "content"):
            if key not in turn or turn[key] is None:
                raise BadRow(field, f"turn {number} has no {key!r}")
            if not isinstance(turn[key], str):
                raise BadRow(field, f"turn {number}: {key!r} is {_kind(turn[key])}, not a string")
        if turn["role"] not in CHAT_ROLES:
            raise BadRow(field, f"turn {number} has role {turn['role']!r}: use {', '.join(CHAT_ROLES)}")
        if "\x00" in turn["content"]:
            raise BadRow(field, f"turn {number}: {NUL_REASON}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["content"].strip() for t in turns):
        raise BadRow(field, "every chat turn is empty")
    return turns


def row_response(row: dict, field: str, csv_text: bool) -> str:
    """A row's response in `field` as text (an assistant's chat turns joined); raises BadRow naming the field."""
    if field not in row or row[field] is None:
        raise BadRow(field, "missing")
    return _response_text(_maybe_json_list(row[field], csv_text, field=field), field)


def _response_text(value: Any, field: str) -> str:
    if isinstance(value, list):  # TRL's conversational format: the assistant's turns
        turns = _turns(value, field)
        if any(t["role"] != "assistant" for t in turns):
            raise BadRow(field, "as chat turns a response may hold only assistant turns")
        value = "\n\n".join(t["content"] for t in turns)
    if not isinstance(value, str):
        raise BadRow(field, f"not a string (got {_kind(value)})")
    if not value.strip():
        raise BadRow(field, "empty text")
    if "\x00" in value:
        raise BadRow(field, NUL_REASON)
    return value


def _responses(value: Any, csv_text: bool) -> list[str]:
    if csv_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow("responses", f"not a JSON list ({exc.msg})") from None
    if not isinstance(value, list):
        raise BadRow("responses", f"must be a list of responses, got {_kind(value)}")
    texts = []
    for number, item in enumerate(value, start=1):
        try:
            texts.append(_response_text(item, "responses"))
        except BadRow as bad:
            raise BadRow("responses", f"item {number}: {bad.reason}") from None
    distinct = list(dict.fromkeys(texts))  # the same text twice makes no pair
    if len(distinct) < 2:
        raise BadRow("responses", f"needs at least 2 different responses, got {len(distinct)}")
    return distinct


def _split_implicit_prompt(chosen: list, rejected: list) -> tuple[list[dict], str, str]:
    """TRL's implicit-prompt conversation: the shared leading turns are the prompt."""
    chosen_turns, rejected_turns = _turns(chosen, "chosen"), _turns(rejected, "rejected")
    shared = 0
    while (shared < min(len(chosen_turns), len(rejected_turns))
           and chosen_turns[shared] == rejected_turns[shared]):
        shared += 1
    while shared and chosen_turns[shared - 1]["role"] == "assistant":
        shared -= 1  # a shared assistant answer belongs to the responses, not the prompt
    if shared == 0:
        raise BadRow("prompt", "missing (and chosen and rejected share no leading turns to take it from)")
    for field, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if len(turns) == shared:
            raise BadRow(field, "no assistant turn after the prompt the two conversations share")
    return (chosen_turns[:shared], _response_text(chosen_turns[shared:], "chosen"),
            _response_text(rejected_turns[shared:], "rejected"))


def _maybe_json_list(value: Any, csv_text: bool, field: str = "") -> Any:
    """In CSV, a cell holding a JSON list (chat turns) becomes the list; other text stays text."""
    if not (csv_text and isinstance(value, str)):
        return value
    stripped = value.strip()
    if not (stripped.startswith("[{") and stripped.endswith("}]")):
        return value
    try:
        parsed = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise BadRow(field, f"looks like chat turns but is not valid JSON ({exc.msg})") from None
    return parsed if isinstance(parsed, list) else value


def _margin(value: Any, csv_text: bool) -> float | None:
    if value is None or (csv_text and isinstance(value, str) and not value.strip()):
        return None
    if csv_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadRow("margin", f"not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow("margin", f"not a number (got {_kind(value)})")
    if not math.isfinite(value):
        raise BadRow("margin", f"not a finite number: {value!r}")
    return float(value)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


__all__ = ["ImportFailed", "ImportResult", "RowError", "import_file", "start_import_job", "run_import_job",
           "recover_stale_jobs", "MAX_ERRORS"]
