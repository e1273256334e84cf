"""The sudoku reward: fraction of originally-empty cells filled correctly; unparsable grids score 0."""
from __future__ import annotations

import pytest

from reward_models.sudoku import SudokuReward, parse_grid

SOL4 = "1234" "3412" "2143" "4321"
PUZ4 = "1030" "0402" "2003" "0320"  # 8 empty cells: indices 1 3 4 6 9 10 12 15

SOL9 = ("534678912" "672195348" "198342567" "859761423" "426853791" "713924856" "961537284" "287419635"
        "345286179")
PUZ9 = ("530070000" "600195000" "098000060" "800060003" "400803001" "700020006" "060000280" "000419005"
        "000080079")  # 51 empty cells

reward = SudokuReward()


def grid4(cells: str) -> str:
    rows = [cells[i:i + 4] for i in range(0, 16, 4)]
    return "\n".join(f"{r[0]} {r[1]} | {r[2]} {r[3]}" for r in rows)


def set_cells(grid: str, changes: dict[int, str]) -> str:
    cells = list(grid)
    for i, d in changes.items():
        cells[i] = d
    return "".join(cells)


def test_4x4_solved_partial_and_given_cells():
    assert PUZ4.count("0") == 8
    solved = f"<think>try</think><answer>\n{grid4(SOL4)}\n</answer>"
    two_wrong = f"<answer>{grid4(set_cells(SOL4, {1: '3', 15: '2'}))}</answer>"  # 6 of 8 empties right
    given_changed = f"<answer>{grid4(set_cells(SOL4, {0: '4'}))}</answer>"  # a given cell: not scored
    unfilled = f"<answer>{grid4(PUZ4)}</answer>"  # zeros left in the empty cells
    out = reward(None, [solved, two_wrong, given_changed, unfilled], puzzle=[PUZ4] * 4, solution=[SOL4] * 4)
    assert out == [1.0, 0.75, 1.0, 0.0]


def test_9x9_solved_and_partial():
    assert PUZ9.count("0") == 51
    wrong3 = set_cells(SOL9, {2: "1", 3: "1", 78: "9"})  # three originally-empty cells wrong
    assert all(PUZ9[i] == "0" for i in (2, 3, 78))
    rows = "\n".join(" ".join(wrong3[r * 9:r * 9 + 9]) for r in range(9))
    out = reward(None, [SOL9, rows], puzzle=[PUZ9, PUZ9], solution=[SOL9, SOL9])
    assert out == [1.0, pytest.approx(48 / 51)]


def test_unparsable_grids_score_zero():
    completions = ["I cannot solve this.", "<answer>1 2 3 4</answer> " + SOL4, ""]
    # the second has 16 digits in total, but only the <answer> block counts and it has 4
    assert reward(None, completions, puzzle=[PUZ4] * 3, solution=[SOL4] * 3) == [0.0, 0.0, 0.0]


def test_grid_parsing_takes_the_last_cells_digits():
    assert parse_grid("Step 1: think. Grid: " + SOL4, 16) == SOL4
    assert parse_grid("12", 16) is None


def test_list_forms_dot_blanks_and_not_applicable():
    nested = [[int(d) for d in SOL4[i:i + 4]] for i in range(0, 16, 4)]
    dotted = PUZ4.replace("0", ".")
    out = reward(None, [SOL4, SOL4, SOL4, SOL4], puzzle=[nested, dotted, SOL4, None],
                 solution=[SOL4, nested, SOL4, SOL4])
    # no empty cells in the first and third puzzles, none at all in the fourth: nothing to score
    assert out == [None, 1.0, None, None]


def test_wrong_size_and_missing_column_are_errors():
    with pytest.raises(ValueError, match="16 or 81 digits"):
        reward(None, ["1"], puzzle=["123"], solution=["123"])
    with pytest.raises(ValueError, match="needs a 'solution' or 'Solution' column"):
        reward(None, ["1"], puzzle=[PUZ4])


def test_d1_csv_columns():
    """d1's 4x4_test_sudoku.csv has the header `Puzzle,Solution` and 16-digit strings with '0' for empty cells."""
    from reward_models import RewardSet

    rs = RewardSet(["sudoku"])
    out = rs(["p"], ["<answer>3142243142131324</answer>"], Puzzle=["3102200002100320"],
             Solution=["3142243142131324"])
    assert out.total.tolist() == [1.0]
