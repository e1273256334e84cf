"""The Countdown task in one place: the problem generator, the prompt template and the reward.

    rows = generate(n=2000, seed=0)                      # {"nums", "target", "solution"}
    prompt = PROMPT_TEMPLATE.format(**row)
    rewards = [countdown_reward]                         # 1 when the final equation reaches the target

Countdown: reach `target` from `nums` with + - * / and parentheses, each number used at most once.

A problem is made by drawing the numbers, combining all of them in a random expression tree whose every
intermediate value is a positive integer (exact division, no negative differences), and taking the result as the
target; that expression, printed with the fewest parentheses, is the row's `solution` (the SFT completion).

    python -m tracerl.tasks.countdown --out data/countdown_train.jsonl --n 2000 --seed 0
    python -m tracerl.tasks.countdown --out data/countdown_test.jsonl --n 500 --seed 1 \
        --exclude data/countdown_train.jsonl
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any, Sequence

from reward_models.countdown import CountdownReward
from tracerl.tasks import keys_in, write_rows

countdown_reward = CountdownReward()  # the built-in `countdown` reward

# Short: every prompt character is a token each denoising forward pays for (character tokenizer).
PROMPT_TEMPLATE = "Countdown: {nums} -> {target}\n"
OPS = "+-*/"
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass
class Expr:
    """A number (op None) or `left op right`."""

    value: int
    text: str
    op: str | None = None


def combine(left: Expr, op: str, right: Expr) -> Expr | None:
    """left op right, or None when the result would not be a positive integer."""
    a, b = left.value, right.value
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        value = a // b if b and a % b == 0 else 0
    if value <= 0:
        return None
    # parentheses only where precedence needs them: a lower-precedence child, or an equal one right of - or /
    lt = f"({left.text})" if left.op and PRECEDENCE[left.op] < PRECEDENCE[op] else left.text
    tight = right.op and (PRECEDENCE[right.op] < PRECEDENCE[op]
                          or (PRECEDENCE[right.op] == PRECEDENCE[op] and op in "-/"))
    rt = f"({right.text})" if tight else right.text
    return Expr(value, f"{lt}{op}{rt}", op)


def random_expression(rng: random.Random, leaves: list[Expr]) -> Expr | None:
    """Combine every leaf (in the given order) under a random tree shape and random operators."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    left, right = random_expression(rng, leaves[:cut]), random_expression(rng, leaves[cut:])
    if left is None or right is None:
        return None
    return combine(left, rng.choice(OPS), right)


def make_problem(rng: random.Random, count: int, max_num: int, max_target: int) -> dict[str, Any]:
    """Numbers in 1..max_num (the order shown is shuffled) and a target in 2..max_target that they reach."""
    while True:
        nums = [rng.randint(1, max_num) for _ in range(count)]
        expr = random_expression(rng, [Expr(n, str(n)) for n in nums])
        if expr is not None and 2 <= expr.value <= max_target:
            shown = rng.sample(nums, len(nums))  # the solution's order must not be readable off the prompt
            return {"nums": shown, "target": expr.value, "solution": expr.text}


def problem_key(row: dict[str, Any]) -> str:
    """Two rows are the same problem when they have the same numbers (in any order) and target."""
    return f"{sorted(int(n) for n in row['nums'])}->{int(row['target'])}"


def generate(n: int, seed: int, counts: tuple[int, ...] = (3, 4), max_num: int = 20, max_target: int = 100,
             exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """`n` distinct problems (none whose key is in `exclude`), with len(nums) drawn from `counts`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only find {len(rows)} new distinct problems (asked {n})")
        row = make_problem(rng, rng.choice(counts), max_num, max_target)
        if problem_key(row) not in seen:
            seen.add(problem_key(row))
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tracerl.tasks.countdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output file (.jsonl or .csv)")
    p.add_argument("--n", type=int, default=2000, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts", type=int, nargs="+", default=[3, 4], help="how many numbers a problem may have")
    p.add_argument("--max-num", type=int, default=20, help="numbers are drawn from 1..max-num")
    p.add_argument("--max-target", type=int, default=100)
    p.add_argument("--format", choices=["jsonl", "csv"], default=None, help="default: from the file suffix")
    p.add_argument("--exclude", nargs="*", default=[], help="files whose problems must not be repeated")
    args = p.parse_args(argv)
    try:
        rows = generate(args.n, args.seed, tuple(args.counts), args.max_num, args.max_target,
                        keys_in(args.exclude, problem_key))
    except ValueError as exc:  # too few distinct problems for these limits: say so, exit 2, write nothing
        p.error(f"{exc}; raise --max-num / --max-target or lower --n")
    path = write_rows(rows, args.out, args.format)
    print(f"wrote {len(rows)} problems (seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
