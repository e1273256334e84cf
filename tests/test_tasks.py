"""Task generators: unique Sudoku solutions, exact blanks, seeded determinism, disjoint splits, and rows that the
built-in rewards score as intended."""

from pathlib import Path

import pytest

from reward_models import load_reward
from tracerl.tasks import apply_template, read_rows, write_rows
from tracerl.tasks import countdown, sudoku


@pytest.fixture(scope="module")
def puzzles():
    return sudoku.generate(300, (4, 10), seed=0)


def test_all_grids_are_the_288_solved_grids():
    grids = sudoku.all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(sudoku.is_solved(g) for g in grids)


def test_count_solutions():
    solved = sudoku.all_grids()[0]
    assert sudoku.count_solutions(solved) == 1
    assert sudoku.count_solutions("0" * 16, limit=1000) == 288
    assert sudoku.count_solutions("11" + "0" * 14) == 0  # clashing givens


def test_puzzles_have_unique_solutions_and_exact_blanks(puzzles):
    for row in puzzles:
        assert sudoku.count_solutions(row["puzzle"]) == 1
        assert sudoku.is_solved(row["solution"])
        assert all(p in ("0", s) for p, s in zip(row["puzzle"], row["solution"]))  # givens agree
    assert {r["puzzle"].count("0") for r in puzzles} == set(range(4, 11))
    assert all(r["puzzle"].count("0") == 9 for r in sudoku.generate(50, 9, seed=3))


def test_sudoku_determinism_and_distinct_puzzles(puzzles):
    assert sudoku.generate(300, (4, 10), seed=0) == puzzles
    assert sudoku.generate(50, 6, seed=1) != sudoku.generate(50, 6, seed=2)
    assert len({r["puzzle"] for r in puzzles}) == len(puzzles)


def test_held_out_split_does_not_overlap(tmp_path):
    train = tmp_path / "train.jsonl"
    sudoku.main(["--out", str(train), "--n", "400", "--blanks", "4", "--seed", "0"])
    test = tmp_path / "test.csv"
    # the same seed would regenerate the train puzzles: --exclude must skip every one of them
    sudoku.main(["--out", str(test), "--n", "100", "--blanks", "4", "--seed", "0", "--exclude", str(train)])
    train_p, test_p = {r["puzzle"] for r in read_rows(train)}, [r["puzzle"] for r in read_rows(test)]
    assert len(test_p) == 100 and not train_p & set(test_p)


def test_csv_round_trip_keeps_leading_zeros(tmp_path):
    rows = [{"puzzle": "0204300120000340", "solution": "1234341221434321"}]
    assert read_rows(write_rows(rows, tmp_path / "s.csv")) == rows


def test_sudoku_reward_scores_solutions(puzzles):
    reward = load_reward("sudoku")
    rows = apply_template(puzzles[:50], sudoku.PROMPT_TEMPLATE)
    prompts = [r["prompt"] for r in rows]
    cols = {"puzzle": [r["puzzle"] for r in rows], "solution": [r["solution"] for r in rows]}
    assert all("{" not in p and r["puzzle"] in p for p, r in zip(prompts, rows))
    assert reward(prompts, [r["solution"] for r in rows], **cols) == [1.0] * 50
    # the puzzle itself leaves every blank at 0: score 0; one wrong blank: < 1
    assert reward(prompts, [r["puzzle"] for r in rows], **cols) == [0.0] * 50
    wrong = []
    for r in rows:
        i = r["puzzle"].index("0")
        wrong.append(r["solution"][:i] + str(int(r["solution"][i]) % 4 + 1) + r["solution"][i + 1:])
    assert all(s < 1.0 for s in reward(prompts, wrong, **cols))


def test_countdown_problems_and_solutions():
    rows = countdown.generate(300, seed=0)
    assert countdown.generate(300, seed=0) == rows
    assert {len(r["nums"]) for r in rows} == {3, 4}
    assert all(2 <= r["target"] <= 100 and all(1 <= n <= 20 for n in r["nums"]) for r in rows)
    assert len({countdown.problem_key(r) for r in rows}) == 300
    reward = load_reward("countdown")
    prompts = [r["prompt"] for r in apply_template(rows, countdown.PROMPT_TEMPLATE)]
    scores = reward(prompts, [r["solution"] for r in rows], nums=[r["nums"] for r in rows],
                    target=[r["target"] for r in rows])
    assert scores == [1.0] * 300
    assert reward(prompts[:1], ["1+1"], nums=[rows[0]["nums"]], target=[rows[0]["target"]]) == [0.0]


def test_countdown_held_out_split_does_not_overlap(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    countdown.main(["--out", str(train), "--n", "300", "--seed", "0", "--counts", "3", "--max-num", "9"])
    countdown.main(["--out", str(test), "--n", "100", "--seed", "0", "--counts", "3", "--max-num", "9",
                    "--exclude", str(train)])
    keys = {countdown.problem_key(r) for r in read_rows(train)}
    assert not keys & {countdown.problem_key(r) for r in read_rows(test)}


def test_solved_reward_is_all_or_nothing(puzzles):
    reward = load_reward("tracerl.tasks.sudoku:solved_reward")
    row = puzzles[1]

    def changed(i):
        return row["solution"][:i] + str(int(row["solution"][i]) % 4 + 1) + row["solution"][i + 1:]

    blank = row["puzzle"].index("0")
    given = next(i for i, d in enumerate(row["puzzle"]) if d != "0")
    texts = [row["solution"], changed(blank), changed(given), "no digits", row["puzzle"]]
    cols = {"puzzle": [row["puzzle"]] * 5, "solution": [row["solution"]] * 5}
    # a wrong *given* cell is not scored (the built-in reward's rule); a wrong blank fails the whole grid
    assert reward(None, texts, **cols) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_repeat_task_rows_and_rewards():
    from tracerl.tasks import repeat

    rows = repeat.generate(5, seed=0)
    assert rows == repeat.generate(5, seed=0) and len({r["pattern"] for r in rows}) == 5
    row = rows[0]
    assert len(row["solution"]) == 256 and row["solution"][:8] == row["pattern"] == row["solution"][8:16]
    assert repeat.PROMPT_TEMPLATE.format(**row).startswith("Repeat: ")
    wrong = row["solution"][:-1] + ("a" if row["solution"][-1] != "a" else "b")
    assert repeat.solved_reward(None, [row["solution"], wrong], [row["solution"]] * 2) == [1.0, 0.0]
    assert repeat.chars_reward(None, [wrong], [row["solution"]]) == [255 / 256]
    held_out = repeat.generate(5, seed=1, exclude={r["pattern"] for r in rows})
    assert not {r["pattern"] for r in held_out} & {r["pattern"] for r in rows}
    # the 1,024-character variant: same patterns for the same seed, each repeated 128 times
    long = repeat.generate(5, seed=0, length=1024)
    assert [r["pattern"] for r in long] == [r["pattern"] for r in rows]
    assert long[0]["solution"] == long[0]["pattern"] * 128
    with pytest.raises(ValueError, match="length must be positive"):
        repeat.generate(1, seed=0, length=0)


def test_the_shipped_repeat_files_are_what_the_generator_writes():
    from tracerl.tasks import read_rows, repeat

    data = Path(__file__).resolve().parents[1] / "recipes" / "data"
    train = read_rows(str(data / "repeat1024_train.jsonl"))
    test = read_rows(str(data / "repeat1024_test.jsonl"))
    assert train == repeat.generate(1000, seed=0, length=1024)
    seen = {r["pattern"] for r in read_rows(str(data / "repeat_train.jsonl"))}
    assert test == repeat.generate(128, seed=1000, exclude=seen, length=1024)
    assert not {r["pattern"] for r in test} & seen
