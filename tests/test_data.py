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


def test_a_saved_single_dataset_is_not_taken_for_another_split(tmp_path):
    """A directory holding one Dataset saved as 'train' is not the eval split: evaluating it would silently score
    the training rows."""
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}], split="train").save_to_disk(str(tmp_path / "ds"))
    assert load_rows(DataConfig(dataset_name=str(tmp_path / "ds")))[0]["prompt"] == "a"
    with pytest.raises(UserError, match="saved as split 'train', and split 'test' was asked for"):
        load_rows(DataConfig(dataset_name=str(tmp_path / "ds"), eval_split="test"), "eval")


def test_chat_message_prompts_pass_through(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}) + "\n")
    rows = load_rows(DataConfig(train_files=[str(path)]))
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_missing_columns_fail_early_naming_what_was_found(files):
    with pytest.raises(UserError, match=r"column 'prompt' not found in row 0 of data.train_files \[.*d.jsonl'\]; "
                                        r"columns found: \['meta', 'puzzle'"):
        load_rows(DataConfig(train_files=[str(files["jsonl"])]))
    with pytest.raises(UserError, match=r"uses column 'grid', which row 0 of data.train_files \[.*\] lacks"):
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


@pytest.mark.parametrize("lines,message", [
    # rows of one file differ: the row without the prompt column reads as null, and failed only after the model load
    ([{"prompt": "1+1=", "answer": "2"}, {"answer": "3"}], r"row 1 of data.train_files .*is null"),
    ([{"prompt": 5}, {"prompt": 7}], r"row 0 of data.train_files .*is int 5, not a string or a list of chat"),
    ([{"prompt": []}], r"row 0 of data.train_files .*is an empty list of chat messages"),
    ([{"prompt": [{"role": "user", "content": 5}]}], r"row 0 of data.train_files .*role or content is not text"),
    ([{"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}], "role or content is not text"),
    # a column named like a reward argument would reach every reward twice
    ([{"prompt": "1+2=", "completions": "3"}], r"column 'completions' has the name of an argument every reward"),
])
def test_a_prompt_that_is_not_a_prompt_names_its_row(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(UserError, match=message):
        load_rows(DataConfig(train_files=[str(path)]))


@pytest.mark.parametrize("template", ["{0}=", "{puzzle=", "{puzzle.size}", "{meta:x}{puzzle:d}"])
def test_a_template_that_cannot_be_filled_names_the_template_and_row(files, template):
    with pytest.raises(UserError, match=r"data.prompt_template .* cannot be filled from row 0"):
        load_rows(DataConfig(train_files=[str(files["jsonl"])], prompt_template=template))


def test_data_without_rows_is_an_error_naming_it(tmp_path):
    import datasets

    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(UserError, match=r"data file '.*d.jsonl' is empty"):
        load_rows(DataConfig(eval_files=[str(tmp_path / "d.jsonl")]), "eval")
    (tmp_path / "d.csv").write_text("puzzle,solution\n")
    with pytest.raises(UserError, match=r"data files \[.*d.csv'\]: could not be read"):
        load_rows(DataConfig(eval_files=[str(tmp_path / "d.csv")]), "eval")
    # a saved dataset with no rows used to evaluate nothing and write an empty result, exit code 0
    datasets.Dataset.from_dict({"prompt": ["a"]}, split="test").filter(lambda r: False).save_to_disk(
        str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"data.dataset_name '.*ds' \(split 'test'\): no rows"):
        load_rows(DataConfig(dataset_name=str(tmp_path / "ds")), "eval")


def test_a_dataset_folder_of_files_loads_as_datasets_reads_it_and_an_empty_one_is_named(tmp_path):
    """A dataset repository's layout (data/train-*.parquet, data/test-*.parquet) loads by split, as
    datasets.load_dataset(dir) reads it; a folder with no data files is refused naming it."""
    import pandas as pd

    (tmp_path / "ds" / "data").mkdir(parents=True)
    pd.DataFrame([{"prompt": "a"}]).to_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame([{"prompt": "b"}]).to_parquet(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet")
    cfg = DataConfig(dataset_name=str(tmp_path / "ds"))
    assert [r["prompt"] for r in load_rows(cfg)] == ["a"]
    assert [r["prompt"] for r in load_rows(cfg, "eval")] == ["b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data.dataset_name '.*empty' \(split 'train'\): neither a save_to_disk "
                                        r"directory nor a dataset of files"):
        load_rows(DataConfig(dataset_name=str(tmp_path / "empty")))


def test_globs_bom_csv_and_a_malformed_line_named(tmp_path):
    for i in range(2):
        (tmp_path / f"part-{i}.jsonl").write_text(json.dumps({"prompt": f"p{i}"}) + "\n")
    rows = load_rows(DataConfig(train_files=[str(tmp_path / "part-*.jsonl")]))
    assert [r["prompt"] for r in rows] == ["p0", "p1"]
    (tmp_path / "run[1]").mkdir()  # a folder whose name holds glob characters is taken literally
    (tmp_path / "run[1]" / "a.jsonl").write_text(json.dumps({"prompt": "bracketed"}) + "\n")
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "a.jsonl").write_text(json.dumps({"prompt": "wrong folder"}) + "\n")
    rows = load_rows(DataConfig(train_files=[str(tmp_path / "run[1]" / "*.jsonl")]))
    assert [r["prompt"] for r in rows] == ["bracketed"]
    with pytest.raises(UserError, match=r"data.train_files: the pattern '.*nomatch-\*.jsonl' matches no file"):
        load_rows(DataConfig(train_files=[str(tmp_path / "nomatch-*.jsonl")]))
    (tmp_path / "excel.csv").write_bytes("\ufeffquestion,answer\n2+2,4\n".encode("utf-8"))  # Excel's CSV UTF-8
    rows = load_rows(DataConfig(train_files=[str(tmp_path / "excel.csv")], prompt_template="{question}="))
    assert rows[0]["prompt"] == "2+2=" and rows[0]["answer"] == "4"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(UserError, match=r"could not be read as json \((?!DatasetGenerationError)\w+"):
        load_rows(DataConfig(train_files=[str(tmp_path / "bad.jsonl")]))


def test_one_saved_dataset_without_splits_is_not_also_the_eval_data(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(DataConfig(dataset_name=str(tmp_path / "ds")))[0]["prompt"] == "a"
    with pytest.raises(UserError, match=r"holds one dataset without splits, and it is the training data"):
        load_rows(DataConfig(dataset_name=str(tmp_path / "ds")), "eval")
    with pytest.raises(UserError, match=r"data.split='nosuch' selects a split of data.dataset_name"):
        DataConfig(train_files=["x.jsonl"], split="nosuch").validate()



def test_a_template_column_missing_in_one_row_is_not_filled_with_none(tmp_path):
    path = tmp_path / "d.jsonl"  # the row without `question` reads as null: its prompt used to be "None="
    path.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(UserError, match=r"data.prompt_template uses column 'question', which is null in row 1 of "
                                        r"data.train_files"):
        load_rows(DataConfig(train_files=[str(path)], prompt_template="{question}="))


def test_a_directory_given_as_a_data_file(tmp_path):
    with pytest.raises(UserError, match="is a directory .*data.dataset_name"):
        load_rows(DataConfig(train_files=[str(tmp_path)]))
