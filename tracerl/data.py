"""Prompt rows for RL: a seeded, resumable sampler over a dataset of rows (dicts with a prompt + other columns)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tracerl.errors import UserError


@dataclass
class PromptSampler:
    """Walks a fresh seeded permutation each epoch; (epoch, cursor) is the whole state, so a resumed run
    continues with exactly the prompts the uninterrupted run would have drawn."""

    num_rows: int
    seed: int = 0
    epoch: int = 0
    cursor: int = 0

    def _order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=gen)

    def next(self, k: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < k:
            order = self._order()
            take = min(k - len(picked), self.num_rows - self.cursor)
            picked += order[self.cursor:self.cursor + take].tolist()
            self.cursor += take
            if self.cursor >= self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """A checkpoint's position; refused when it was taken over other data or another seed: the position
        would then name other prompts, and the resumed run would not continue the one that wrote it."""
        changed = [f"{what} {state[key]} -> {now}" for key, what, now in (
            ("num_rows", "the training data's rows", self.num_rows), ("seed", "trainer.seed", self.seed))
            if key in state and int(state[key]) != now]
        if changed:
            raise UserError(f"the checkpoint was written by a run with other data or seed ({'; '.join(changed)}); "
                            "resume with the data and trainer.seed of the run that wrote it, or start the new "
                            "run from its model/ directory (model.path)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def column_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every column any row has, in the order first seen."""
    return list(dict.fromkeys(k for r in rows for k in r))


def uniform_columns(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows given as dicts with different keys (a mixed-task list: math rows with `answer`, code rows with `tests`)
    -> rows that all have every column, None where a row had none, as a `datasets.Dataset` would hold them; so every
    batch passes the rewards the same columns whichever rows it drew."""
    names = column_names(rows)
    return [r if len(r) == len(names) else {k: r.get(k) for k in names} for r in rows]


def columns_of(rows: Sequence[dict[str, Any]], exclude: tuple[str, ...] = ("prompt",)) -> dict[str, list[Any]]:
    """Row dicts -> {column: [values]} for every column any row has but `exclude` (what reward functions get as
    kwargs); None where a row lacks the column."""
    return {k: [r.get(k) for r in rows] for k in column_names(rows) if k not in exclude}


# ---- loading rows with the `datasets` library -----------------------------------------------------------------
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(data: Any, which: str = "train") -> list[dict[str, Any]]:
    """Rows (dicts) of the train or eval data named by a DataConfig, each with a `prompt` built from the recipe.

    Local files go through `datasets`' json / parquet / csv builders; `dataset_name` is a Hub name (needs network)
    or a directory written by `Dataset.save_to_disk`. Missing columns fail here, naming the columns found.
    """
    files = data.train_files if which == "train" else (data.eval_files or [])
    split = data.split if which == "train" else data.eval_split
    key = "data.train_files" if which == "train" else "data.eval_files"
    source = data_source(data, which)
    if files:
        dataset = _from_files(files, key)
    elif data.dataset_name:
        # one saved dataset without splits can only be the training data: read as the eval split too, the
        # held-out accuracy would be measured on the training rows
        one_for_both = which == "eval" and not data.train_files
        dataset = _from_name(data.dataset_name, data.dataset_config, split, refuse_unsplit=one_for_both)
    else:
        raise UserError(f"{key}: no data given (set {key} or data.dataset_name)")
    rows = [dict(r) for r in dataset]
    if not rows:  # training would fail after the model load; evaluation would write an empty result
        raise UserError(f"{source}: no rows")
    if which == "eval" and data.max_eval_samples:
        rows = rows[: data.max_eval_samples]
    check_column_names(rows, source)
    return [with_prompt(r, data, i, source) for i, r in enumerate(rows)]


def data_source(data: Any, which: str) -> str:
    """How error messages name the train or eval data: the recipe key and its value."""
    files = data.train_files if which == "train" else data.eval_files
    if files:
        return f"{'data.train_files' if which == 'train' else 'data.eval_files'} {files}"
    split = data.split if which == "train" else data.eval_split
    return f"data.dataset_name {data.dataset_name!r} (split {split!r})"


def check_column_names(rows: Sequence[dict[str, Any]], source: str) -> None:
    """A column named like an argument every reward receives would reach the rewards twice: refused, named."""
    clash = sorted({name for r in rows for name in r} & REWARD_ARGUMENTS)
    if clash:
        raise UserError(f"{source}: column {clash[0]!r} has the name of an argument every reward function receives "
                        f"({', '.join(sorted(REWARD_ARGUMENTS))}); rename the column")


# what reward functions receive besides the dataset's columns (TRL's names, and the trajectory)
REWARD_ARGUMENTS = frozenset({"prompts", "completions", "completion_ids", "trajectory", "trainer_state", "log_metric",
                              "log_extra"})


def expand_files(files: list[str], key: str) -> list[str]:
    """Glob patterns (data/train-*.parquet) expanded, in sorted order; a pattern matching nothing is refused. The
    longest leading part that names an existing directory is taken literally, so a folder called run[1] is not
    read as the character class [1]."""
    import glob

    out = []
    for f in files:
        f = os.path.expanduser(f)
        if any(c in f for c in "*?[") and not Path(f).exists():
            parts = Path(f).parts
            n = max((i for i in range(len(parts)) if Path(*parts[:i]).is_dir()), default=0) if len(parts) > 1 else 0
            literal = glob.escape(str(Path(*parts[:n]))) if n else ""
            pattern = os.path.join(literal, *parts[n:]) if literal else f
            matched = sorted(glob.glob(pattern, recursive=True))
            if not matched:
                raise UserError(f"{key}: the pattern {f!r} matches no file")
            out += matched
        else:
            out.append(f)
    return out


def _from_files(files: list[str], key: str = "data.train_files") -> Any:
    import glob

    import datasets

    files = expand_files(files, key)
    for f in files:
        if Path(f).is_dir():
            raise UserError(f"data file {f!r} is a directory (a directory saved by datasets, or one holding a "
                            "dataset's files, goes in data.dataset_name; or name its files, e.g. dir/*.parquet)")
        if not Path(f).is_file():
            raise UserError(f"data file {f!r} does not exist")
        if Path(f).stat().st_size == 0:  # datasets' own error for it has an empty message
            raise UserError(f"data file {f!r} is empty")
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FORMATS:
        raise UserError(f"data files {files}: use one format of {', '.join(FORMATS)}")
    builder = FORMATS[suffixes.pop()]
    # CSV has no types: read every cell as the text it is, so a puzzle "0123..." keeps its leading zero; a
    # byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
    options = ({"features": _text_features(files[0]), "keep_default_na": False, "encoding": "utf-8-sig"}
               if builder == "csv" else {})
    try:
        # escaped: datasets reads data_files as patterns, and a literal run[1]/a.jsonl would match run1/a.jsonl
        return datasets.load_dataset(builder, data_files=[glob.escape(str(Path(f).resolve())) for f in files],
                                     split="train", **options)
    except Exception as exc:  # datasets raises many types for a malformed file; the user needs the file name
        raise UserError(f"data files {files}: could not be read as {builder} ({_root_cause(exc)})") from exc


def _root_cause(exc: BaseException) -> str:
    """datasets wraps the parser's error ("An error occurred while generating the dataset"): the innermost one
    says which line and why."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _text_features(csv_file: str) -> Any:
    import csv

    import datasets

    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # pandas would keep one of them and drop the other's values without a word
        raise UserError(f"data file {csv_file!r}: the header names column {repeated[0]!r} more than once; give "
                        "every column its own name")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _from_name(name: str, config_name: str | None, split: str, refuse_unsplit: bool = False) -> Any:
    import datasets

    if Path(name).is_dir():
        if not _saved_to_disk(Path(name)):  # a dataset repository's files (data/train-*.parquet, README splits)
            try:
                return datasets.load_dataset(name, config_name, split=split)
            except Exception as exc:  # noqa: BLE001 - no split of that name, no data files, unreadable files
                raise UserError(f"data.dataset_name {name!r} (split {split!r}): neither a save_to_disk directory nor "
                                f"a dataset of files datasets can read ({_root_cause(exc)})") from None
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as exc:  # noqa: BLE001 - damaged
            raise UserError(f"data.dataset_name {name!r}: not a dataset saved by datasets' save_to_disk "
                            f"({type(exc).__name__}: {exc}); data files go in data.train_files") from None
        if refuse_unsplit and not isinstance(loaded, datasets.DatasetDict) and loaded.split is None:
            raise UserError(f"data.dataset_name {name!r} holds one dataset without splits, and it is the training "
                            f"data: evaluating split {split!r} would measure the training rows; name the held-out "
                            "data in data.eval_files, or save a DatasetDict with its splits")
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"data.dataset_name {name!r}: no split {split!r} (found {sorted(loaded)})")
            loaded = loaded[split]
        elif loaded.split is not None and str(loaded.split) != split:  # one saved split is not another
            raise UserError(f"data.dataset_name {name!r} holds one dataset, saved as split {str(loaded.split)!r}, "
                            f"and split {split!r} was asked for (data.split / data.eval_split); save a DatasetDict, "
                            "or name the eval data in data.eval_files")
        return loaded
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:
        raise UserError(f"data.dataset_name {name!r} (split {split!r}) could not be loaded: {exc}") from exc


def _saved_to_disk(directory: Path) -> bool:
    """Written by Dataset / DatasetDict.save_to_disk (its state or dict-of-splits files are there)."""
    return any((directory / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


def with_prompt(row: dict[str, Any], data: Any, index: int, source: str = "data") -> dict[str, Any]:
    """Fill `prompt` from data.prompt_template (using the row's columns) or data.prompt_column.

    The prompt must be a string or a non-empty list of chat messages: a file whose rows differ in their columns
    gives the rows without the column a null (None) there, which would otherwise fail only after the model loads."""
    if data.prompt_template:
        try:
            prompt = data.prompt_template.format(**row)
        except KeyError as exc:
            raise UserError(f"data.prompt_template uses column {exc.args[0]!r}, which row {index} of {source} "
                            f"lacks; columns found: {sorted(row)}") from None
        except (IndexError, ValueError, AttributeError, TypeError) as exc:  # "{0}", "{x", "{x.attr}", "{x:d}"
            raise UserError(f"data.prompt_template {data.prompt_template!r} cannot be filled from row {index} of "
                            f"{source} ({type(exc).__name__}: {exc}); use {{column}} names, and {{{{ }}}} for a "
                            "literal brace") from None
        null = next((name for name in _template_columns(data.prompt_template) if row.get(name) is None), None)
        if null is not None:  # a row without the column reads as null, and the prompt would say "None"
            raise UserError(f"data.prompt_template uses column {null!r}, which is null in row {index} of {source}")
        return {**row, "prompt": prompt}
    if data.prompt_column not in row:
        raise UserError(f"data.prompt_column: column {data.prompt_column!r} not found in row {index} of {source}; "
                        f"columns found: {sorted(row)} (or set data.prompt_template)")
    prompt = row[data.prompt_column]
    problem = prompt_problem(prompt)
    if problem:
        raise UserError(f"data.prompt_column: row {index} of {source}: the prompt in column {data.prompt_column!r} "
                        f"{problem}")
    return {**row, "prompt": prompt}


def _template_columns(template: str) -> list[str]:
    """The columns a str.format template reads: "{a} {b[0]} {c.x:>4}" -> [a, b, c]."""
    import re
    import string

    names = (field for _, field, _, _ in string.Formatter().parse(template) if field)
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for name in names]


def prompt_problem(prompt: Any) -> str | None:
    """Why `prompt` is not a prompt (a string, or a non-empty list of {role, content} messages), or None."""
    if isinstance(prompt, str):
        return None
    if prompt is None:
        return "is null (missing in this row?)"
    if isinstance(prompt, list):
        if not prompt:
            return "is an empty list of chat messages"
        bad = next((m for m in prompt if not isinstance(m, dict) or not {"role", "content"} <= set(m)), None)
        if bad is not None:
            return f"is a list whose entry {bad!r} is not a chat message ({{role, content}})"
        # a chat template concatenates the text: null, a number or a list of content parts fails inside jinja
        bad = next((m for m in prompt if not isinstance(m["role"], str) or not isinstance(m["content"], str)), None)
        return None if bad is None else f"has a chat message {bad!r} whose role or content is not text"
    return f"is {type(prompt).__name__} {prompt!r}, not a string or a list of chat messages"
