"""Read an evaluation set from a file: the rows of annotate/importing.py's formats, one prompt each.

Row shape (extra columns are ignored): `prompt` (text or chat turns, as an import's) and, optionally,
`reference` (the answer it should get, text). The file is checked whole before anything is stored: a bad
row, a prompt repeated, or a prompt the campaign already trains on (an evaluation prompt is never a training
prompt) refuses the file with the line and field of each problem, and nothing changes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from django.conf import settings
from django.db.models import Count

from annotate import actions
from annotate.actions import EvalInput, EvalSetRefused
from annotate.importing import (
    MAX_ERRORS,
    BadRow,
    ImportFailed,
    RowError,
    reader_for,
    row_prompt,
    row_response,
    upload_suffix,
)
from annotate.models import Campaign, EvalSet


def _row(row: dict, csv_text: bool) -> tuple[str | list[dict], str]:
    prompt = row_prompt(row, csv_text)
    missing = row.get("reference") is None or (csv_text and not str(row["reference"]).strip())
    return prompt, "" if missing else row_response(row, "reference", csv_text)


def read_eval_file(path: str | Path) -> list[EvalInput]:
    """Every row of the file as an EvalInput; raises ImportFailed naming the first problems (line and field)."""
    reader = reader_for(Path(path), settings.PAIRLOOP["MAX_IMPORT_BYTES"])
    items: list[EvalInput] = []
    errors: list[RowError] = []
    total = 0
    for line, row in reader.rows():
        if not isinstance(row, RowError):
            try:
                prompt, reference = _row(row, reader.csv_text)
                items.append(EvalInput(line, prompt, reference))
                continue
            except BadRow as bad:
                row = RowError(line, bad.field, bad.reason)
        total += 1
        if len(errors) < MAX_ERRORS:
            errors.append(row)
    if not errors and not items:
        errors, total = [RowError(0, "", "the file holds no rows")], 1
    if errors:
        raise ImportFailed(errors, unit=reader.unit, total=total)
    return items


def import_eval_set(campaign: Campaign, path: str | Path, name: str = "") -> tuple[EvalSet, bool]:
    """Read the file and store it as the campaign's evaluation set: (the set, whether it is a new version)."""
    try:
        return actions.add_eval_set(campaign, name or Path(path).name, read_eval_file(path))
    except EvalSetRefused as refused:
        raise ImportFailed([RowError(*problem) for problem in refused.problems]) from None


def import_eval_upload(campaign: Campaign, upload, name: str = "") -> tuple[EvalSet, bool]:
    """An uploaded file (Django UploadedFile) read as import_eval_set reads a path; the file is not kept."""
    with tempfile.TemporaryDirectory(prefix="pairloop-evalset-") as folder:
        path = Path(folder) / f"upload{upload_suffix(upload.name or '')}"
        with open(path, "wb") as handle:
            for chunk in upload.chunks():
                handle.write(chunk)
        return import_eval_set(campaign, path, name or Path(upload.name or "upload").name)


def eval_sets_of(campaign: Campaign):
    """The campaign's evaluation sets, newest first, each with `prompt_count`."""
    return EvalSet.objects.filter(campaign=campaign).annotate(prompt_count=Count("prompts")).order_by(
        "-created_at", "-id")
