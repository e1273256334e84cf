"""Data through the `datasets` library: local formats, prompt templates, early errors naming the columns."""

import json

import pytest

from tracerl.config import DataConfig
from tracerl.data import PromptSampler, load_rows
from tracerl.errors import UserError

ROWS = [{"puzzle": "0120", "solution": "4123", "meta": i} for i in range(5)]


@pytest.fixture
def files(tmp_path):
    import pandas as pd

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    csv, parquet = tmp_path / "d.csv", tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    pd.DataFrame(ROWS).to_parquet(parquet)
    return {"jsonl": jsonl, "csv": csv, "parquet": parquet}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_formats_with_a_prompt_template(files, fmt):
    rows = load_rows(DataConfig(train_files=[str(files[fmt])], prompt_template="Solve {puzzle}:"))
    assert len(rows) == 5
    assert rows[0]["prompt"] == "Solve 0120:"  # CSV cells stay text: the leading zero survives
    assert {"puzzle", "solution", "meta"} <= set(rows[0])  # every other column reaches the rewards


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "b", "answer": "2"}])})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(dataset_name=str(tmp_path / "ds"), split="train", eval_split="test")
    assert load_rows(cfg)[0]["prompt"] == "a"
    assert load_rows(cfg, "eval")[0]["answer"] == "2"
    with pytest.raises(UserError, match="no split 'validation'"):
        load_rows(DataConfig(dataset_name=str(tmp_path / "ds"), split="validation"))


def test_chat_message_prompts_pass_through(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n")
    rows = load_rows(DataConfig(train_files=[str(path)]))
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_missing_columns_fail_early_naming_what_was_found(files):
    with pytest.raises(UserError, match=r"column 'prompt' not found in row 0; columns found: \['meta', 'puzzle'"):
        load_rows(DataConfig(train_files=[str(files["jsonl"])]))
    with pytest.raises(UserError, match="uses column 'grid', which row 0 lacks"):
        load_rows(DataConfig(train_files=[str(files["jsonl"])], prompt_template="{grid}"))
    with pytest.raises(UserError, match="data file .*nope.jsonl' does not exist"):
        load_rows(DataConfig(train_files=["nope.jsonl"]))
    with pytest.raises(UserError, match="data.train_files: no data given"):
        load_rows(DataConfig())


def test_prompt_sampler_is_seeded_and_resumable():
    a = PromptSampler(7, seed=3)
    first = a.next(5) + a.next(5)  # crosses an epoch boundary
    b = PromptSampler(7, seed=3)
    b.next(5)
    state = b.state_dict()
    c = PromptSampler(7, seed=3)
    c.load_state_dict(state)
    assert c.next(5) == first[5:]
    assert sorted(first[:7]) == list(range(7))  # an epoch is a permutation
