"""The Repeat task in one place: a long-response task (256 or more characters) for measuring approximate decoders.

    rows = generate(n=2000, seed=0)                      # {"pattern", "solution"}: the pattern repeated to 256 chars
    rows = generate(n=1000, seed=0, length=1024)         # the 1,024-character variant
    prompt = PROMPT_TEMPLATE.format(**row)
    rewards = [solved_reward, chars_reward]              # 1 for an exact copy / the share of characters right

The prompt gives a pattern of 8 random lowercase letters; the completion is the pattern repeated to `length`
characters (32 times at the default 256). Every
position depends on a token far from it (the prompt, or the same phase of an earlier period), so a decoder that
reuses stale keys and values (rollout.cache) is tested on exactly what it approximates, over 256 tokens.

    python -m tracerl.tasks.repeat --out recipes/data/repeat_train.jsonl --n 2000 --seed 0
    python -m tracerl.tasks.repeat --out recipes/data/repeat_test.jsonl --n 256 --seed 1000 \
        --exclude recipes/data/repeat_train.jsonl
    python -m tracerl.tasks.repeat --out recipes/data/repeat1024_train.jsonl --n 1000 --seed 0 --length 1024
    python -m tracerl.tasks.repeat --out recipes/data/repeat1024_test.jsonl --n 128 --seed 1000 --length 1024 \
        --exclude recipes/data/repeat_train.jsonl
"""

from __future__ import annotations

import argparse
import random
import string
from typing import Any, Sequence

from tracerl.tasks import keys_in, write_rows

PATTERN, LENGTH = 8, 256
PROMPT_TEMPLATE = "Repeat: {pattern}\n"


def make_row(rng: random.Random, length: int = LENGTH) -> dict[str, str]:
    pattern = "".join(rng.choice(string.ascii_lowercase) for _ in range(PATTERN))
    return {"pattern": pattern, "solution": (pattern * (length // PATTERN + 1))[:length]}


def generate(n: int, seed: int, exclude: set[str] | None = None, length: int = LENGTH) -> list[dict[str, str]]:
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    rng, rows, seen = random.Random(seed), [], set(exclude or ())
    while len(rows) < n:
        row = make_row(rng, length)
        if row["pattern"] not in seen:
            seen.add(row["pattern"])
            rows.append(row)
    return rows


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def chars_reward(prompts: list, completions: list, solution: list, **kwargs: Any) -> list[float]:
    """The share of the solution's characters the completion has at the same place (TRL signature)."""
    out = []
    for completion, gold in zip(completions, solution):
        text = _text(completion)
        out.append(sum(a == b for a, b in zip(text, gold)) / len(gold))
    return out


def solved_reward(prompts: list, completions: list, solution: list, **kwargs: Any) -> list[float]:
    """1.0 for an exact copy of the solution (trailing whitespace ignored), else 0.0."""
    return [float(_text(c).rstrip() == gold) for c, gold in zip(completions, solution)]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tracerl.tasks.repeat", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output file (.jsonl or .csv)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length", type=int, default=LENGTH, help="characters per solution")
    p.add_argument("--exclude", nargs="*", default=[], help="files whose patterns must not be repeated")
    args = p.parse_args(argv)
    if args.length < 1:
        p.error(f"--length must be positive, got {args.length}")
    rows = generate(args.n, args.seed, keys_in(args.exclude, lambda r: str(r["pattern"])), args.length)
    path = write_rows(rows, args.out)
    print(f"wrote {len(rows)} rows (seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
