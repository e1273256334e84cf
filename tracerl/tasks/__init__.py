"""Synthetic reasoning tasks with verifiable answers (4x4 Sudoku, Countdown): seeded generators, their prompt
templates, and jsonl / csv files in the column layout the built-in rewards read.

    python -m tracerl.tasks.sudoku --out data/sudoku_train.jsonl --n 2000 --blanks 6 --seed 0
    python -m tracerl.tasks.countdown --out data/countdown_train.jsonl --n 2000 --seed 0

Grids and equations are written as strings; CSV readers that infer types (pandas, `datasets`) turn a puzzle such as
"0123..." into an int and drop its leading zero, so read CSV files back with `read_rows` (all strings) or with
dtype=str.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

FORMATS = ("jsonl", "csv")


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path, fmt: str | None = None) -> Path:
    """Write rows as jsonl (one object a line) or csv (header = the first row's keys); fmt None = from suffix."""
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix == ".csv" else "jsonl")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps(row) + "\n")
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            # lists (countdown's nums) go in as JSON text so they read back unambiguously
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl or csv file written by `write_rows` (csv cells stay strings; JSON lists are decoded)."""
    path = Path(path)
    with path.open(newline="") as f:
        if path.suffix == ".csv":
            return [{k: json.loads(v) if v.startswith("[") else v for k, v in r.items()} for r in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]


def apply_template(rows: Iterable[dict[str, Any]], template: str, column: str = "prompt") -> list[dict[str, Any]]:
    """Copies of `rows` with `column` = template.format(**row) (what data.prompt_template does in a recipe)."""
    return [{**row, column: template.format(**row)} for row in rows]


def keys_in(paths: Iterable[str | Path], key: Callable[[dict[str, Any]], str]) -> set[str]:
    """`key(row)` of every row in existing files: the problems a new split must not repeat."""
    return {key(r) for p in paths for r in read_rows(p)}
