"""Importing pairs: every format and row shape, whole-file validation, duplicates, TRL preferences."""

from __future__ import annotations

import csv
import gzip
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections

from annotate.importing import (
    MAX_ERRORS,
    MAX_LINE_BYTES,
    MAX_PAIRS_PER_ROW,
    ImportFailed,
    RowError,
    import_file,
)
from annotate.models import Judgment, Pair, Prompt
from tests.conftest import make_campaign

pytestmark = pytest.mark.django_db

AB_ROWS = [{"prompt": f"What is {i} + {i}?", "response_a": f"It is {2 * i}.", "response_b": f"Maybe {i}."}
           for i in range(5)]


# --- writers, one per format ------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_hf(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_json_array(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


WRITERS = {
    "pairs.jsonl": write_jsonl,
    "pairs.csv": write_csv,
    "pairs.parquet": write_parquet,
    "pairs_dataset": write_hf,
    "pairs.jsonl.gz": write_jsonl_gz,
    "pairs.json": write_json_array,
}


def pair_texts(campaign) -> set[tuple[str, str, str]]:
    pairs = Pair.objects.filter(campaign=campaign).select_related("prompt", "response_a", "response_b")
    return {(p.prompt.text, p.response_a.text, p.response_b.text) for p in pairs}


# --- formats and shapes -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WRITERS))
def test_it_imports_every_format(tmp_path, name):
    campaign = make_campaign("fmt")
    path = WRITERS[name](tmp_path / name, AB_ROWS)

    result = import_file(campaign, path)

    assert (result.created, result.skipped, result.rows) == (5, 0, 5)
    assert pair_texts(campaign) == {(r["prompt"], r["response_a"], r["response_b"]) for r in AB_ROWS}
    assert all(p.is_open and p.judgments_count == 0 for p in Pair.objects.filter(campaign=campaign))


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.parquet", "pairs_dataset"])
def test_it_imports_chat_turn_prompts(tmp_path, name):
    campaign = make_campaign("chat")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    rows = [{"prompt": turns, "response_a": "7", "response_b": "8"},
            {"prompt": [{"role": "user", "content": "Capital of France?"}], "response_a": "Paris",
             "response_b": "Lyon"}]
    import_file(campaign, WRITERS[name](tmp_path / name, rows))

    multi = Prompt.objects.get(campaign=campaign, turns=turns)
    assert "Be brief." in multi.text and "Name a prime." in multi.text
    single = Prompt.objects.get(campaign=campaign, text="Capital of France?")
    assert single.turns == [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "pairs.parquet"])
def test_it_makes_every_pair_from_a_responses_list(tmp_path, name):
    campaign = make_campaign("all")
    rows = [{"prompt": "Say hi.", "responses": ["hi", "hello", "hey", "yo"]},
            {"prompt": "Say bye.", "responses": ["bye", "ciao"]}]
    result = import_file(campaign, WRITERS[name](tmp_path / name, rows))

    assert (result.created, result.skipped, result.rows) == (6 + 1, 0, 2)
    hi_pairs = {frozenset((a, b)) for prompt, a, b in pair_texts(campaign) if prompt == "Say hi."}
    assert len(hi_pairs) == 6 and all(len(pair) == 2 for pair in hi_pairs)


def test_it_samples_pairs_per_prompt_with_a_seed(tmp_path):
    rows = [{"prompt": f"Prompt {i}", "responses": [f"r{i}-{j}" for j in range(6)]} for i in range(8)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)

    first = make_campaign("s1")
    result = import_file(first, path, pairs_per_prompt=3, seed=7)
    assert result.created == 8 * 3
    per_prompt = {}
    for prompt, a, b in pair_texts(first):
        per_prompt.setdefault(prompt, set()).add(frozenset((a, b)))
    assert all(len(pairs) == 3 for pairs in per_prompt.values()) and len(per_prompt) == 8

    again = make_campaign("s2")
    import_file(again, path, pairs_per_prompt=3, seed=7)
    assert pair_texts(again) == pair_texts(first)

    other = make_campaign("s3")
    import_file(other, path, pairs_per_prompt=3, seed=8)
    assert pair_texts(other) != pair_texts(first)  # 8 prompts x C(15, 3) choices: a clash is negligible


def test_it_records_trl_chosen_rejected_as_an_imported_judgment(tmp_path):
    campaign = make_campaign("trl")
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.0},
            {"prompt": "3+3?", "chosen": "6", "rejected": "7"}]
    result = import_file(campaign, write_jsonl(tmp_path / "trl.jsonl", rows))

    assert result.created == 2
    judgments = {j.pair.prompt.text: j for j in Judgment.objects.filter(pair__campaign=campaign)
                 .select_related("pair__prompt", "pair__response_a", "pair__response_b")}
    assert set(judgments) == {"2+2?", "3+3?"}
    for prompt, chosen, rejected in (("2+2?", "4", "5"), ("3+3?", "6", "7")):
        judgment = judgments[prompt]
        assert judgment.source == Judgment.IMPORTED and judgment.labeler is None
        assert [r.text for r in judgment.chosen_rejected()] == [chosen, rejected]
        assert not judgment.pair.is_open  # already judged: not served to labelers
    assert judgments["2+2?"].margin() == 1.0 and judgments["2+2?"].strength == 4
    assert judgments["3+3?"].strength is None and judgments["3+3?"].margin() == 0.0


def test_it_reads_trl_conversational_pairs_with_and_without_an_explicit_prompt(tmp_path):
    campaign = make_campaign("conv")
    user = {"role": "user", "content": "Best color?"}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Dunno."}]},
        {"chosen": [{"role": "user", "content": "Best fruit?"}, {"role": "assistant", "content": "Mango."}],
         "rejected": [{"role": "user", "content": "Best fruit?"}, {"role": "assistant", "content": "Rock."}]},
    ]
    import_file(campaign, write_jsonl(tmp_path / "conv.jsonl", rows))

    assert pair_texts(campaign) == {("Best color?", "Blue.", "Dunno."), ("Best fruit?", "Mango.", "Rock.")}
    assert Judgment.objects.filter(pair__campaign=campaign, source=Judgment.IMPORTED, choice="a").count() == 2


def test_it_imports_a_datasets_dict_directory_by_its_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(AB_ROWS[:3]), "test": Dataset.from_list(AB_ROWS[3:])})
    splits.save_to_disk(str(tmp_path / "dd"))
    campaign = make_campaign("dd")
    assert import_file(campaign, tmp_path / "dd").created == 3


def test_it_gives_imported_pairs_the_priority_asked_for(tmp_path):
    campaign = make_campaign("prio")
    import_file(campaign, write_jsonl(tmp_path / "p.jsonl", AB_ROWS), priority=5)
    assert set(Pair.objects.filter(campaign=campaign).values_list("priority", flat=True)) == {5}


# --- duplicates ---------------------------------------------------------------------------------

def test_it_skips_duplicates_within_a_file_and_across_imports_in_either_order(tmp_path):
    campaign = make_campaign("dup")
    rows = [{"prompt": "Q", "response_a": "x", "response_b": "y"},
            {"prompt": "Q", "response_a": "y", "response_b": "x"},  # the same pair, sides swapped
            {"prompt": "Q", "response_a": "x", "response_b": "y"},  # repeated
            {"prompt": "Q", "response_a": "x", "response_b": "z"}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)

    first = import_file(campaign, path)
    assert (first.created, first.skipped) == (2, 2)
    second = import_file(campaign, path)
    assert (second.created, second.skipped) == (0, 4)
    swapped = import_file(campaign, write_csv(tmp_path / "swapped.csv", [{"prompt": "Q", "response_a": "z",
                                                                          "response_b": "x"}]))
    assert (swapped.created, swapped.skipped) == (0, 1)
    assert Pair.objects.filter(campaign=campaign).count() == 2


# --- whole-file validation ----------------------------------------------------------------------

def test_it_imports_nothing_when_one_row_is_bad_and_names_its_line_and_field(tmp_path):
    campaign = make_campaign("bad")
    rows = [dict(r) for r in AB_ROWS + AB_ROWS[:2]]  # lines 1..7
    rows = [{**r, "prompt": r["prompt"] + f" #{i}"} for i, r in enumerate(rows)]
    del rows[6]["response_b"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    assert failed.value.errors == [RowError(7, "response_b", "missing")]
    assert "line 7, field 'response_b': missing" in str(failed.value)
    assert Pair.objects.filter(campaign=campaign).count() == 0
    assert Prompt.objects.filter(campaign=campaign).count() == 0


@pytest.mark.parametrize("line, field, needle", [
    ('{"prompt": "Q", "response_a": "x", "response_b": ', "", "invalid JSON"),
    ('["Q", "x", "y"]', "", "not a JSON object"),
    ('{"prompt": "Q", "response_a": 3, "response_b": "y"}', "response_a", "not a string"),
    ('{"prompt": "   ", "response_a": "x", "response_b": "y"}', "prompt", "empty text"),
    ('{"prompt": "Q", "response_a": "x", "response_b": ""}', "response_b", "empty text"),
    ('{"prompt": "Q", "responses": ["only one"]}', "responses", "at least 2"),
    ('{"prompt": "Q", "responses": "x, y"}', "responses", "must be a list"),
    ('{"prompt": "Q", "answer": "x"}', "", "unknown shape"),
    ('{"prompt": "Q", "chosen": "x", "rejected": "y", "margin": "big"}', "margin", "not a number"),
    ('{"prompt": "Q", "chosen": "x"}', "rejected", "missing"),
    ('{"prompt": [{"role": "user"}], "response_a": "x", "response_b": "y"}', "prompt", "no 'content'"),
    ('{"prompt": 12, "response_a": "x", "response_b": "y"}', "prompt", "text or chat turns"),
    ('{"prompt": [{"role": "wizard", "content": "Hi"}], "response_a": "x", "response_b": "y"}', "prompt",
     "turn 1 has role 'wizard': use system, user, assistant"),
    ('{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "", "content": "x"}], '
     '"rejected": "y"}', "chosen", "turn 1 has role ''"),
    # NUL characters, which PostgreSQL's text columns refuse: named here instead of failing mid-import.
    ('{"prompt": "Q\\u0000", "response_a": "x", "response_b": "y"}', "prompt", "NUL character"),
    ('{"prompt": "Q", "response_a": "x", "response_b": "y\\u0000"}', "response_b", "NUL character"),
    ('{"prompt": "Q", "responses": ["x", "y\\u0000"]}', "responses", "item 2: holds a NUL"),
    ('{"prompt": [{"role": "user", "content": "\\u0000"}], "response_a": "x", "response_b": "y"}', "prompt",
     "turn 1: holds a NUL"),
])
def test_it_names_the_line_and_field_of_each_kind_of_bad_row(tmp_path, line, field, needle):
    campaign = make_campaign("kinds")
    good = json.dumps(AB_ROWS[0])
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{good}\n\n{line}\n{json.dumps(AB_ROWS[1])}\n")  # the bad row is on line 3

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    [error] = failed.value.errors
    assert (error.line, error.field) == (3, field)
    assert needle in error.reason
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_counts_csv_lines_from_the_header_and_across_quoted_newlines(tmp_path):
    campaign = make_campaign("csvlines")
    path = tmp_path / "rows.csv"
    path.write_text('prompt,response_a,response_b\n'
                    '"A prompt\nover two lines",x,y\n'      # lines 2-3
                    'Q2,x,\n'                              # line 4: response_b empty
                    'Q3,"[{""role"": ""user""}]",y\n',     # line 5: chat turns without content
                    encoding="utf-8")

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    assert [(e.line, e.field) for e in failed.value.errors] == [(4, "response_b"), (5, "response_a")]
    assert "line 4, field 'response_b': empty text" in str(failed.value)


def test_it_names_the_row_of_a_bad_parquet_row(tmp_path):
    campaign = make_campaign("pqbad")
    rows = [dict(r) for r in AB_ROWS]
    rows[3]["response_a"] = None
    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, write_parquet(tmp_path / "bad.parquet", rows))
    assert failed.value.errors == [RowError(4, "response_a", "missing")]
    assert str(failed.value) == "row 4, field 'response_a': missing"


def test_it_refuses_a_file_without_a_known_shape_in_one_error(tmp_path):
    campaign = make_campaign("shape")
    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, write_csv(tmp_path / "x.csv", [{"question": "Q", "answer": "A"}] * 3))
    [error] = failed.value.errors
    assert error.line == 1 and "unknown shape" in error.reason and "question, answer" in error.reason


def test_it_caps_the_error_list_and_counts_the_rest(tmp_path):
    campaign = make_campaign("cap")
    rows = [{"prompt": f"Q{i}", "response_a": "x"} for i in range(50)]
    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, write_jsonl(tmp_path / "bad.jsonl", rows))
    assert len(failed.value.errors) == MAX_ERRORS and failed.value.total == 50
    assert [e.line for e in failed.value.errors] == list(range(1, MAX_ERRORS + 1))
    assert "and 45 more errors" in str(failed.value)


def test_it_refuses_an_empty_file_a_missing_path_and_an_unknown_format(tmp_path):
    campaign = make_campaign("odd")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "notes.txt").write_text("just some notes\n")
    for path, needle in ((tmp_path / "empty.jsonl", "no rows"), (tmp_path / "nope.jsonl", "does not exist"),
                         (tmp_path / "notes.txt", "unknown format")):
        with pytest.raises(ImportFailed, match=needle):
            import_file(campaign, path)


# --- batches: labelers are not locked out while a long import writes -----------------------------

@pytest.mark.django_db(transaction=True)
def test_it_commits_in_batches_that_other_connections_see_while_it_runs(tmp_path):
    campaign = make_campaign("batches")
    rows = [{"prompt": f"Q{i}", "response_a": f"a{i}", "response_b": f"b{i}"} for i in range(2500)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    reports, seen_elsewhere = [], []

    def count_in_another_connection():
        try:
            seen_elsewhere.append(Pair.objects.filter(campaign=campaign).count())
        finally:
            connections.close_all()

    def progress(phase, done, total):
        reports.append((phase, done, total))
        if phase == "importing":
            other = threading.Thread(target=count_in_another_connection)
            other.start()
            other.join()

    result = import_file(campaign, path, progress=progress)

    assert result.created == 2500
    assert seen_elsewhere == [0, 1000, 2000, 2500]  # each batch was committed before the next was read
    assert reports == [("checking", 1024, None), ("checking", 2048, None), ("importing", 0, 2500),
                       ("importing", 1000, 2500), ("importing", 2000, 2500), ("importing", 2500, 2500)]


def test_sqlite_connections_use_write_ahead_logging_so_reads_do_not_wait_for_an_import():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only: PostgreSQL readers never wait for writers")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"


# --- size caps: refused by size, not by running out of memory ---------------------------------

def giant_line(size: int) -> str:
    return json.dumps({"prompt": "Q", "response_a": "x" * size, "response_b": "y"})


def test_it_refuses_a_line_longer_than_the_cap_by_its_line_and_checks_the_rest(tmp_path):
    campaign = make_campaign("long")
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:  # 16 MiB of one line in a file of a few KiB
        handle.write(f"{json.dumps(AB_ROWS[0])}\n{giant_line(MAX_LINE_BYTES)}\n")
        handle.write('{"prompt": "Q", "response_a": "x"}\n')

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    assert [(e.line, e.field) for e in failed.value.errors] == [(2, ""), (3, "response_b")]
    assert "line 2: longer than 16 MiB, the most one row may hold" in str(failed.value)
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_refuses_a_csv_record_and_a_json_array_longer_than_the_cap(tmp_path):
    campaign = make_campaign("longcsv")
    path = tmp_path / "long.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("prompt,response_a,response_b\nQ,x,y\nQ2," + "x" * (MAX_LINE_BYTES + 1) + ",y\n")
    with pytest.raises(ImportFailed, match="line 3: longer than 16 MiB"):
        import_file(campaign, path)

    array = tmp_path / "array.json.gz"
    with gzip.open(array, "wt", encoding="utf-8") as handle:
        handle.write(f"[{giant_line(MAX_LINE_BYTES)}]")
    with pytest.raises(ImportFailed, match="a JSON array is read whole, so it may hold at most 16 MiB"):
        import_file(campaign, array)
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_stops_a_gzip_bomb_at_the_byte_cap(tmp_path, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_IMPORT_BYTES": 1024 * 1024}
    campaign = make_campaign("bomb")
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb") as handle:  # valid rows, then 64 MiB of blank lines in 64 KiB of gzip
        handle.write(b"".join(json.dumps(row).encode() + b"\n" for row in AB_ROWS))
        handle.write(b"\n" * (64 * 1024 * 1024))

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    [error] = failed.value.errors
    assert 1024 * 1024 - 8192 < error.line <= 1024 * 1024  # where the cap was reached
    assert "holds more than 1 MiB once decompressed (PAIRLOOP_MAX_IMPORT_BYTES)" in error.reason
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_names_a_broken_gzip_stream_instead_of_crashing(tmp_path):
    campaign = make_campaign("broken")
    whole = gzip.compress("".join(json.dumps(row) + "\n" for row in AB_ROWS * 50).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImportFailed, match="cannot decompress the gzip file"):
        import_file(campaign, path)
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_caps_the_pairs_a_responses_list_makes_unless_sampled(tmp_path):
    campaign = make_campaign("many")
    n = 46  # 46 * 45 / 2 = 1035 pairs
    assert n * (n - 1) // 2 > MAX_PAIRS_PER_ROW
    rows = [AB_ROWS[0], {"prompt": "Say hi.", "responses": [f"hi {i}" for i in range(n)]}]
    path = write_jsonl(tmp_path / "many.jsonl", rows)

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)
    assert str(failed.value) == ("line 2, field 'responses': 46 responses make 1035 pairs, more than "
                                 "the 1000 one row may add: sample at most that many with pairs per "
                                 "prompt (--pairs-per-prompt)")
    assert not Pair.objects.filter(campaign=campaign).exists()
    with pytest.raises(ImportFailed, match="line 2, field 'responses': 1001 pairs per prompt asked"):
        import_file(campaign, path, pairs_per_prompt=MAX_PAIRS_PER_ROW + 1)

    assert import_file(campaign, path, pairs_per_prompt=10).created == 1 + 10


def test_it_samples_from_a_long_responses_list_without_listing_every_pair(tmp_path):
    campaign = make_campaign("huge")
    responses = [f"answer {i}" for i in range(100_000)]  # 5 billion pairs: sampled by position
    path = write_jsonl(tmp_path / "huge.jsonl", [{"prompt": "Count.", "responses": responses}])

    assert import_file(campaign, path, pairs_per_prompt=5, seed=1).created == 5
    assert all(a != b and a in responses and b in responses for _, a, b in pair_texts(campaign))


# --- the management command ----------------------------------------

def test_the_command_prints_imported_and_skipped(tmp_path, capsys):
    campaign = make_campaign("cmd")
    path = write_jsonl(tmp_path / "p.jsonl", AB_ROWS + AB_ROWS[:1])
    call_command("import_pairs", campaign.slug, str(path), "--priority", "2")
    out = capsys.readouterr().out
    assert "Imported 5 pairs" in out and "skipped 1 duplicates" in out
    assert set(Pair.objects.filter(campaign=campaign).values_list("priority", flat=True)) == {2}


def test_the_command_fails_with_line_and_field_and_for_an_unknown_campaign(tmp_path):
    campaign = make_campaign("cmdbad")
    rows = [dict(r) for r in AB_ROWS]
    rows[1]["response_b"] = ["not", "text"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(CommandError, match=r"line 2, field 'response_b'"):
        call_command("import_pairs", campaign.slug, str(path))
    assert not Pair.objects.filter(campaign=campaign).exists()
    with pytest.raises(CommandError, match="no campaign with slug 'nope'"):
        call_command("import_pairs", "nope", str(path))
    with pytest.raises(CommandError, match="pairs_per_prompt"):
        call_command("import_pairs", campaign.slug, str(path), "--pairs-per-prompt", "0")
    # A priority the database cannot store is refused before anything is written, naming the field.
    good = write_jsonl(tmp_path / "good.jsonl", AB_ROWS)
    with pytest.raises(CommandError, match=r"field 'priority': must be from -2147483648 to 2147483647"):
        call_command("import_pairs", campaign.slug, str(good), "--priority", str(2**31))
    assert not Pair.objects.filter(campaign=campaign).exists()


# --- Parquet and datasets: the same caps, checked before rows become Python objects ---------------------

def repeated(text: str, n: int) -> pa.DictionaryArray:
    """n copies of text, stored once: how a Parquet file holds 400 MiB of text in a few KiB."""
    return pa.DictionaryArray.from_arrays(pa.array([0] * n, type=pa.int32()), pa.array([text]))


def test_it_stops_a_parquet_bomb_at_the_byte_cap_without_holding_it(tmp_path, settings):
    import tracemalloc

    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_IMPORT_BYTES": 10 * 1024 * 1024}
    campaign = make_campaign("pqbomb")
    rows = 140_000  # 3 columns x 1000 bytes x 140,000 rows: 400 MiB of text
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"prompt": repeated("p" * 1000, rows), "response_a": repeated("a" * 1000, rows),
                             "response_b": repeated("b" * 1000, rows)}), path, compression="zstd")
    assert path.stat().st_size < 64 * 1024

    arrow_pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(arrow_pool)
    tracemalloc.start()
    try:
        with pytest.raises(ImportFailed) as failed:
            import_file(campaign, path)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)

    [error] = failed.value.errors
    assert error.line == 10 * 1024 * 1024 // 3000 + 1  # the first row past the cap
    assert "holds more than 10 MiB once decoded (PAIRLOOP_MAX_IMPORT_BYTES)" in str(failed.value)
    assert arrow_pool.max_memory() < 16 * 1024 * 1024, arrow_pool.max_memory()
    assert python_peak < 40 * 1024 * 1024, python_peak
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_refuses_a_parquet_whose_columns_decompress_past_the_cap_before_reading_a_row(tmp_path, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_IMPORT_BYTES": 1024 * 1024}
    campaign = make_campaign("pqzstd")
    path = tmp_path / "zstd.parquet"
    pq.write_table(pa.table({"prompt": ["Q"] * 3, "response_a": ["x" * (2 * 1024 * 1024)] * 3,
                             "response_b": ["y"] * 3}), path, compression="zstd", use_dictionary=False)
    assert path.stat().st_size < 64 * 1024

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    [error] = failed.value.errors
    assert error.line == 0
    assert "once decompressed, more than 1 MiB (PAIRLOOP_MAX_IMPORT_BYTES): no row was read" in error.reason
    assert not Pair.objects.filter(campaign=campaign).exists()


def test_it_refuses_a_dataset_directory_over_the_byte_cap(tmp_path, settings):
    settings.PAIRLOOP = {**settings.PAIRLOOP, "MAX_IMPORT_BYTES": 64 * 1024}
    campaign = make_campaign("hfbig")
    rows = [{"prompt": f"Q{i}", "response_a": "x" * 1000, "response_b": "y"} for i in range(100)]
    with pytest.raises(ImportFailed, match=r"file: it holds 9\d\.\d+ KiB, more than 64 KiB"):
        import_file(campaign, write_hf(tmp_path / "big", rows))
    assert not Pair.objects.filter(campaign=campaign).exists()


@pytest.mark.parametrize("name", ["pairs.parquet", "pairs_dataset"])
def test_it_refuses_a_parquet_or_dataset_row_over_the_row_cap_by_row_and_field(tmp_path, monkeypatch, name):
    monkeypatch.setattr("annotate.importing.MAX_LINE_BYTES", 4096)
    campaign = make_campaign("pqcell")
    rows = [{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in AB_ROWS]
    rows[2]["response_b"] = "y" * 5000
    rows[3]["prompt"] = [{"role": "user", "content": "c" * 5000}]  # a nested column: list of structs
    path = WRITERS[name](tmp_path / name, rows)

    with pytest.raises(ImportFailed) as failed:
        import_file(campaign, path)

    assert [(e.line, e.field) for e in failed.value.errors] == [(3, "response_b"), (4, "prompt")]
    assert "row 3, field 'response_b': 4.883 KiB (the row 4.909 KiB), more than the 4 KiB one row may hold" \
        in str(failed.value)
    assert not Pair.objects.filter(campaign=campaign).exists()

    monkeypatch.setattr("annotate.importing.MAX_LINE_BYTES", 64 * 1024)
    assert import_file(campaign, path).created == 5  # the same file, under a larger cap
