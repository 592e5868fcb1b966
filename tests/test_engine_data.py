"""Reading exported preference pairs: JSONL, Parquet and save_to_disk directories, chat-turn prompts,
margins, clear errors naming the row and field, a split that keeps each prompt on one side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from training.engine.common import EngineError
from training.engine.data import data_version, load_pairs, read_pairs, round_weights, split_pairs

ROWS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A colour.", "margin": 1.0, "pair_id": 1,
     "labeler": "lena"},
    {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "I won't.", "margin": 0.5, "pair_id": 2,
     "labeler": "otto"},
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "margin": 0.0, "pair_id": 3, "labeler": "lena"},
]
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a fruit."}], "chosen": "Apple.", "rejected": "No."},
    {"prompt": [{"role": "user", "content": "Name a fruit."}], "chosen": "Pear.", "rejected": "Car."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_it_reads_jsonl_parquet_and_save_to_disk_exports_alike(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    parquet = tmp_path / "pairs.parquet"
    Dataset.from_list(ROWS).to_parquet(str(parquet))
    saved = tmp_path / "pairs_dir"
    Dataset.from_list(ROWS).save_to_disk(str(saved))
    splits = tmp_path / "splits_dir"
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(splits))
    for path in (jsonl, parquet, saved, splits):
        ds = load_pairs(path)
        assert ds["chosen"] == ["Blue.", "Red.", "4"], path
        assert ds["margin"] == [1.0, 0.5, 0.0]
        assert ds["pair_id"] == [1, 2, 3] and ds["labeler"] == ["lena", "otto", "lena"]


def test_it_flattens_chat_turn_prompts_and_defaults_the_margin_to_zero(tmp_path):
    for path in (write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), tmp_path / "chat.parquet"):
        if path.suffix == ".parquet":
            Dataset.from_list(CHAT_ROWS).to_parquet(str(path))
        ds = load_pairs(path)
        assert ds["prompt"] == ["user: Hi\n\nassistant: Hello!\n\nuser: Name a fruit.", "Name a fruit."]
        assert ds["margin"] == [0.0, 0.0]
    # TRL's conversational form for the responses is read too.
    conversational = [{"prompt": [{"role": "user", "content": "Q?"}],
                       "chosen": [{"role": "assistant", "content": "Yes."}],
                       "rejected": [{"role": "assistant", "content": "No."}], "margin": None}]
    ds = load_pairs(write_jsonl(tmp_path / "conv.jsonl", conversational))
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"], ds[0]["margin"]) == ("Q?", "Yes.", "No.", 0.0)


@pytest.mark.parametrize("rows, message", [
    ([], "holds no pairs"),
    ([{"prompt": "a", "rejected": "c"}], "no 'chosen' column"),
    (ROWS[:2] + [{"prompt": "q", "chosen": ["not", "turns"], "rejected": "b"}], "row 3: field 'chosen'"),
    (ROWS[:1] + [{"prompt": None, "chosen": "a", "rejected": "b"}], "row 2: field 'prompt' must be text"),
    (ROWS[:1] + [{"prompt": "  ", "chosen": "a", "rejected": "b"}], "row 2: field 'prompt' is empty"),
    ([{"prompt": "q", "chosen": "", "rejected": "b"}], "holds no pairs with both responses non-empty"),
    (ROWS[:1] + [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}], "row 2: field 'margin'"),
    (ROWS[:1] + [{"prompt": "q", "chosen": "a", "rejected": "b", "round": "2"}], "row 2: field 'round'"),
])
def test_it_names_the_row_and_field_of_a_bad_value(tmp_path, rows, message):
    with pytest.raises(EngineError, match=message):
        load_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))


def test_a_pair_made_k_rounds_before_the_newest_weighs_w_to_the_k_and_an_import_counts_as_round_0(tmp_path):
    rows = [{**ROWS[0], "round": 3}, {**ROWS[1], "round": 2}, {**ROWS[2], "round": None}, {**ROWS[0]}]
    made_by = load_pairs(write_jsonl(tmp_path / "rounds.jsonl", rows))["round"]
    assert made_by == [3, 2, None, None]
    assert round_weights(made_by, 0.5) == [1.0, 0.5, 0.125, 0.125]
    assert round_weights(made_by, 1.0) == [1.0] * 4
    assert round_weights(made_by, 0.0) == [1.0, 0.0, 0.0, 0.0]  # the newest round's pairs only
    assert round_weights([None, None], 0.0) == [1.0, 1.0]  # no round's pairs yet: the imports are the newest


def test_it_leaves_out_pairs_with_an_empty_response_instead_of_refusing_the_file(tmp_path):
    # Anthropic HH has pairs whose preferred reply is empty; the rest of such a file is good data.
    rows = ROWS[:2] + [{"prompt": "q", "chosen": "", "rejected": "b"}, {"prompt": "r", "chosen": "a", "rejected": " "}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    ds, skipped = read_pairs(path)
    assert skipped == [3, 4] and len(ds) == 2 and ds["chosen"] == [r["chosen"] for r in ROWS[:2]]
    assert len(load_pairs(path)) == 2


def test_it_refuses_missing_paths_unknown_formats_and_broken_files(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_pairs(tmp_path / "none.jsonl")
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(EngineError, match="unknown pairs format '.txt'"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(EngineError, match="line 2 is not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(EngineError, match="cannot read Parquet"):
        load_pairs(tmp_path / "bad.parquet")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(EngineError, match="not one written by datasets' save_to_disk"):
        load_pairs(tmp_path / "plain_dir")


def test_it_splits_by_prompt_so_no_prompt_is_on_both_sides():
    rows = [{"prompt": f"prompt {i % 25}", "chosen": f"good {i}", "rejected": f"bad {i}", "margin": 0.0}
            for i in range(100)]
    ds = Dataset.from_list(rows)
    train, held = split_pairs(ds, 0.2, seed=0)
    assert len(train) + len(held) == 100
    assert 20 <= len(held) <= 24  # whole prompts of 4 pairs each, until at least 20 %
    assert not set(train["prompt"]) & set(held["prompt"])
    assert split_pairs(ds, 0.2, seed=0)[1]["chosen"] == held["chosen"]
    assert split_pairs(ds, 0.2, seed=1)[1]["chosen"] != held["chosen"]
    assert len(split_pairs(ds, 0.0, seed=0)[1]) == 0
    with pytest.raises(EngineError, match="share one prompt"):
        split_pairs(Dataset.from_list([rows[0], rows[25]]), 0.5, seed=0)


def test_it_versions_data_by_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS)
    assert data_version(a) == data_version(b) and len(data_version(a)) == 16
    write_jsonl(b, ROWS[:2])
    assert data_version(a) != data_version(b)
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "dir"))
    before = data_version(tmp_path / "dir")
    Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "dir2"))
    assert before != data_version(tmp_path / "dir2")
