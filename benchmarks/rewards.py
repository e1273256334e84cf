"""Reward throughput: sandboxed code rewards per second and math verifications per second.

    python benchmarks/rewards.py [--programs 200] [--answers 300]

Code: small programs (a function with 3 assert cases, or a stdin/stdout program with 2 cases, half each),
scored by the `code` reward through its sandbox pool (default 2 x cores workers) and with one worker.
Math: the `math` reward on answers that need Math-Verify (LaTeX vs plain forms, e.g. \\frac{1}{2} vs 0.5),
in worker processes (the default) and inline, plus the cheap path (plain numbers, no sympy).
Each figure is the median of --repeats timed batches after one warm-up batch (fork servers and Math-Verify
workers start and import during the warm-up, as they do once per training run).
The code reward runs generated programs: run this from a throwaway copy of the repo, as the sandbox tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout this script sits in

from reward_models.code_reward import CodeReward  # noqa: E402
from reward_models.math_reward import MathReward  # noqa: E402

ASSERT_PROGRAM = "```python\ndef f(x):\n    return x * {k} + 1\n```"
STDIO_PROGRAM = "```python\nn = int(input())\nprint(sum(range(n)) + {k})\n```"


def code_batch(n: int) -> tuple[list[str], list]:
    completions, tests = [], []
    for i in range(n):
        k = i % 7
        if i % 2 == 0:
            completions.append(ASSERT_PROGRAM.format(k=k))
            tests.append([f"assert f({x}) == {x * k + 1}" for x in (0, 1, 5)])
        else:
            completions.append(STDIO_PROGRAM.format(k=k))
            tests.append({"inputs": ["10\n", "3\n"], "outputs": [f"{45 + k}\n", f"{3 + k}\n"]})
    return completions, tests


def math_batch(n: int, hard: bool, offset: int) -> tuple[list[str], list[str]]:
    """Hard pairs differ as strings and as plain numbers, so Math-Verify (sympy) decides them. Every answer
    is new (offset): the worker caches parsed strings, and a repeated batch would only measure that cache."""
    completions, answers = [], []
    for i in range(offset, offset + n):
        a, b = i + 1, i % 5 + 2
        if hard:
            completions.append(f"so \\boxed{{\\frac{{{a}}}{{{b}}}}}")
            answers.append(f"{a}/{b}" if i % 3 else f"\\dfrac{{{a * 2}}}{{{b * 2}}} + 0")
        else:
            completions.append(f"#### {a * b}")
            answers.append(f"{a * b}" if i % 2 else f"{a * b}.0")  # equal as exact numbers: no sympy
    return completions, answers


def rate(make_call: Callable[[int], Callable[[], list]], n: int, repeats: int) -> tuple[float, list]:
    """Items per second: median over `repeats` batches; batch r is make_call(r), and batch 0 is a warm-up
    (servers/workers start and import there)."""
    out = make_call(0)()
    times = []
    for r in range(1, repeats + 1):
        call = make_call(r)
        t0 = time.perf_counter()
        out += call()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times), out


def bench_code(n: int, repeats: int) -> None:
    completions, tests = code_batch(n)
    for workers in (None, 1):
        reward = CodeReward(timeout_s=5.0, num_workers=workers)
        try:
            per_s, out = rate(lambda r: lambda: reward(None, completions, tests=tests), n, repeats)
        finally:
            reward.close()
        assert all(r == 1.0 for r in out), "a benchmark program failed: the numbers would be meaningless"
        count = workers or 2 * (os.cpu_count() or 1)
        label = f"{count} worker{'s' if count > 1 else ''}" + (" (default pool)" if workers is None else "")
        print(f"code  sandboxed programs/s      {per_s:8.1f}   {label}, {n} programs, 2-3 cases each")


def bench_math(n: int, repeats: int) -> None:
    cases = [("Math-Verify, process workers=1", dict(isolation="process", num_workers=1), True),
             ("Math-Verify, process workers=2", dict(isolation="process", num_workers=2), True),
             ("Math-Verify, inline", dict(isolation="inline"), True),
             ("cheap path (numbers, no sympy)", dict(isolation="process"), False)]
    for label, options, hard in cases:
        reward = MathReward(**options)

        def make_call(r: int) -> Callable[[], list]:
            completions, answers = math_batch(n, hard, offset=r * n)
            return lambda: reward(None, completions, answer=answers)

        try:
            per_s, out = rate(make_call, n, repeats)
        finally:
            reward.close()
        correct = sum(out) / len(out)  # every pair is equal: anything under 1.00 is a verifier failure
        print(f"math  verifications/s         {per_s:8.1f}   {label}, {n} answers (mean reward {correct:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
    bench_code(args.programs, args.repeats)
    bench_math(args.answers, args.repeats)


if __name__ == "__main__":
    main()
