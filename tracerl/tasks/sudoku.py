"""The 4x4 Sudoku task in one place: the puzzle generator, the prompt template and the rewards.

    rows = generate(n=2000, blanks=6, seed=0)            # {"puzzle", "solution"} with a unique solution each
    prompt = PROMPT_TEMPLATE.format(**row)
    rewards = [solved_reward, cells_reward]              # 1 for a full solve / the share of empty cells right

4x4 Sudoku puzzles with a unique solution and an exact number of empty cells.

Grids are 16-character strings, row-major, "0" = empty; boxes are 2x2. There are only 288 solved 4x4 grids, so
what makes puzzles differ is which cells are blank: 288 x C(16, k) candidates, of which the unique-solution ones
are kept. The completion a model writes is the 16-digit solution itself (the `sudoku` reward reads the last 16
digits of a completion).

    python -m tracerl.tasks.sudoku --out data/sudoku_train.jsonl --n 2000 --blanks 6 --seed 0
    python -m tracerl.tasks.sudoku --out data/sudoku_test.jsonl --n 500 --blanks 6 --seed 1 \
        --exclude data/sudoku_train.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import random
from functools import lru_cache
from typing import Any, Sequence

from reward_models.sudoku import SudokuReward

cells_reward = SudokuReward()  # the built-in `sudoku` reward: the share of the empty cells filled right
from tracerl.tasks import keys_in, write_rows

SIDE, BOX = 4, 2
CELLS = SIDE * SIDE
# Short on purpose: with a character tokenizer every prompt character is a token that each denoising forward
# and each training row pays for ("Sudoku 4x4, 0 = empty: ...\nSolution: " doubles the frame).
PROMPT_TEMPLATE = "Sudoku: {puzzle}\n"


def _units() -> list[list[int]]:
    """The 12 groups of cells that must hold 1..4 once each: rows, columns, boxes."""
    rows = [[r * SIDE + c for c in range(SIDE)] for r in range(SIDE)]
    cols = [[r * SIDE + c for r in range(SIDE)] for c in range(SIDE)]
    boxes = [[(br + r) * SIDE + bc + c for r in range(BOX) for c in range(BOX)]
             for br in range(0, SIDE, BOX) for bc in range(0, SIDE, BOX)]
    return rows + cols + boxes


UNITS = _units()
PEERS = [sorted({j for u in UNITS if i in u for j in u} - {i}) for i in range(CELLS)]


def is_solved(grid: str) -> bool:
    return len(grid) == CELLS and all(sorted(grid[i] for i in u) == list("1234") for u in UNITS)


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of completions of `puzzle` that are solved grids, counting stops at `limit`."""
    cells = list(puzzle)
    for i, d in enumerate(cells):  # a puzzle whose givens already clash has none
        if d != "0" and any(cells[j] == d for j in PEERS[i]):
            return 0

    def search() -> int:
        try:
            i = cells.index("0")
        except ValueError:
            return 1
        found = 0
        for d in "1234":
            if all(cells[j] != d for j in PEERS[i]):
                cells[i] = d
                found += search()
                cells[i] = "0"
                if found >= limit:
                    break
        return found

    return search()


@lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """All 288 solved 4x4 grids, sorted (so a seed picks the same grid on every machine)."""
    grids = []
    for rows in itertools.product(itertools.permutations("1234"), repeat=SIDE):
        grid = "".join("".join(r) for r in rows)
        if is_solved(grid):
            grids.append(grid)
    return tuple(sorted(grids))


def make_puzzle(rng: random.Random, blanks: int) -> dict[str, str]:
    """One puzzle with exactly `blanks` empty cells and a unique solution.

    Cells are emptied in a random order, skipping any whose removal would admit a second solution; a grid that
    cannot reach `blanks` that way is dropped for another.
    """
    if not 0 <= blanks <= 12:  # 4 givens is the minimum for a unique 4x4 solution
        raise ValueError(f"blanks must lie in 0..12, got {blanks}")
    while True:
        solution = rng.choice(all_grids())
        cells = list(solution)
        removed = 0
        for i in rng.sample(range(CELLS), CELLS):
            if removed == blanks:
                break
            cells[i] = "0"
            if count_solutions("".join(cells)) == 1:
                removed += 1
            else:
                cells[i] = solution[i]
        if removed == blanks:
            return {"puzzle": "".join(cells), "solution": solution}


def generate(n: int, blanks: int | tuple[int, int], seed: int, exclude: set[str] | None = None
             ) -> list[dict[str, str]]:
    """`n` distinct puzzles (none in `exclude`); blanks an int, or an inclusive (low, high) range drawn uniformly."""
    rng = random.Random(seed)
    low, high = (blanks, blanks) if isinstance(blanks, int) else blanks
    seen = set(exclude or ())
    rows: list[dict[str, str]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only find {len(rows)} new distinct puzzles with {blanks} blanks (asked {n})")
        row = make_puzzle(rng, rng.randint(low, high))
        if row["puzzle"] not in seen:
            seen.add(row["puzzle"])
            rows.append(row)
    return rows


def solved_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when every empty cell is right, else 0.0 (TRL reward signature; columns `puzzle` and `solution`).

    The sparse counterpart of the built-in `sudoku` reward (the fraction of empty cells right). For RL on a tiny
    model it is the better signal: the advantage is per sequence, so under the fractional reward an above-average
    completion that still holds a wrong cell gets that cell reinforced; here only complete solutions are.
    Recipe: rewards: [{fn: "tracerl.tasks.sudoku:solved_reward"}].
    """
    cells = SudokuReward()(prompts, completions, **columns)
    return [None if s is None else float(s == 1.0) for s in cells]


def parse_blanks(text: str) -> int | tuple[int, int]:
    """"6" -> 6; "4-8" -> (4, 8)."""
    low, _, high = text.partition("-")
    return int(low) if not high else (int(low), int(high))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tracerl.tasks.sudoku", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output file (.jsonl or .csv)")
    p.add_argument("--n", type=int, default=2000, help="number of puzzles")
    p.add_argument("--blanks", type=parse_blanks, default=6, help="empty cells per puzzle: N or LOW-HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["jsonl", "csv"], default=None, help="default: from the file suffix")
    p.add_argument("--exclude", nargs="*", default=[], help="files whose puzzles must not be repeated "
                   "(write the held-out split with --exclude <train file>)")
    args = p.parse_args(argv)
    rows = generate(args.n, args.blanks, args.seed, keys_in(args.exclude, lambda r: str(r["puzzle"])))
    path = write_rows(rows, args.out, args.format)
    print(f"wrote {len(rows)} puzzles ({args.blanks} blanks, seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
