"""`sudoku` reward (4x4 and 9x9): the fraction of the puzzle's empty cells the completion fills correctly.

Columns: `puzzle` (16 or 81 cells, row-major, 0 or "." = empty; a string, or a list / nested lists of
ints, None = empty) and `solution` (same forms, no empty cells).
Grid parsing rule: if the completion has an <answer>...</answer> block, only the last such block is read;
the grid is the *last* 16 (4x4) or 81 (9x9) digits 0-9 in that text, in order, so separators, spaces, line
breaks, "|" and box borders are ignored. Fewer digits than cells: unparsable, reward 0. Given cells are
not scored (a completion that changes them only loses nothing there); a 0 in an empty cell is wrong.
Puzzles without empty cells: None (nothing to score).
"""
from __future__ import annotations

import re
from typing import Any

from .protocol import answer_span, column, completion_text


def digits(value: Any, blank: str = "") -> str:
    """The digits of a grid given as a string or (nested) lists of ints; characters in `blank` (and None
    list entries) count as empty cells, "0"."""
    if value is None:
        return "0"
    if isinstance(value, str):
        cells = re.findall(r"\d" + (f"|[{re.escape(blank)}]" if blank else ""), value)
        return "".join("0" if c in blank else c for c in cells)
    if isinstance(value, (list, tuple)):
        return "".join(digits(v, blank) for v in value)
    return str(int(value))


def parse_grid(text: str, cells: int) -> str | None:
    """The last `cells` digits of the completion's answer (see the module docstring), or None."""
    span = answer_span(text)
    found = re.findall(r"\d", span if span is not None else text)
    return "".join(found[-cells:]) if len(found) >= cells else None


def score(puzzle: str, solution: str, completion: str) -> float | None:
    if len(puzzle) not in (16, 81) or len(solution) != len(puzzle):
        raise ValueError(f"sudoku puzzle/solution must have 16 or 81 digits, got {len(puzzle)}/{len(solution)}")
    empty = [i for i, d in enumerate(puzzle) if d == "0"]
    if not empty:
        return None
    grid = parse_grid(completion, len(puzzle))
    if grid is None:
        return 0.0
    return sum(grid[i] == solution[i] for i in empty) / len(empty)


class SudokuReward:
    """See the module docstring. Options: puzzle_column ("puzzle", then d1's CSV header "Puzzle"),
    solution_column ("solution", then "Solution")."""

    __name__ = "sudoku"

    def __init__(self, puzzle_column: str | None = None, solution_column: str | None = None) -> None:
        self.puzzle_columns = [puzzle_column] if puzzle_column else ["puzzle", "Puzzle"]
        self.solution_columns = [solution_column] if solution_column else ["solution", "Solution"]

    @property
    def required_columns(self) -> list[list[str]]:
        """The dataset columns it reads (each a list of alternatives), checked before a run starts."""
        return [self.puzzle_columns, self.solution_columns]

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        puzzles = column(kwargs, self.puzzle_columns, "sudoku", n)
        solutions = column(kwargs, self.solution_columns, "sudoku", n)
        return [None if p is None or s is None else score(digits(p, blank="."), digits(s), completion_text(c))
                for c, p, s in zip(completions, puzzles, solutions)]
