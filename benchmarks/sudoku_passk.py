"""Does the start model already hold the answers greedy decoding misses? pass@k at temperature T vs greedy.

    python benchmarks/sudoku_passk.py outputs/sudoku/sft/final --steps 4      # the demo's start model

Samples k completions per held-out puzzle (recipes/data/sudoku_test.jsonl, first --n) with the recipe's 4-step
decoder and prints greedy solve rate, sample@1 (the RL reward's mean at step 0), pass@4 / pass@k, and the share of
puzzles greedy fails but some sample solves: the room RL has by moving probability onto answers already sampled.
"""

from __future__ import annotations

import argparse

import torch

from reward_models import load_reward
from tracerl.models import load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.tasks import apply_template, read_rows, sudoku


def solved(model, rows: list[dict], config: RolloutConfig) -> list[bool]:
    ids = [model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    texts = completions(generate(model, ids, config), model.tokenizer)
    columns = {"puzzle": [r["puzzle"] for r in rows], "solution": [r["solution"] for r in rows]}
    cells = load_reward("sudoku")(None, texts, **columns)
    return [c == 1.0 for c in cells]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rows = apply_template(read_rows("recipes/data/sudoku_test.jsonl")[:a.n], sudoku.PROMPT_TEMPLATE)
    model = load_model(a.model)
    with torch.no_grad():
        greedy = solved(model, rows, RolloutConfig(max_completion_length=16, steps=a.steps, temperature=0))
        flat = solved(model, [r for r in rows for _ in range(a.k)],
                      RolloutConfig(max_completion_length=16, steps=a.steps, temperature=a.temperature))
    samples = [flat[i * a.k:(i + 1) * a.k] for i in range(len(rows))]
    n = len(rows)
    print(f"{a.model}: {a.steps} steps, T={a.temperature}, {n} puzzles")
    print(f"  greedy solve      {sum(greedy) / n:.3f}")
    print(f"  sample@1          {sum(map(sum, samples)) / (n * a.k):.3f}")
    print(f"  pass@4            {sum(any(s[:4]) for s in samples) / n:.3f}")
    print(f"  pass@{a.k:<12d}{sum(any(s) for s in samples) / n:.3f}")
    print(f"  greedy fails, a sample solves  {sum(any(s) and not g for s, g in zip(samples, greedy)) / n:.3f}")


if __name__ == "__main__":
    main()
