"""The README's main job (`make demo`): TraceRL teaches a tiny diffusion LM 4x4 Sudoku on this CPU.

    python -m tracerl.demo                    # one RL seed, about 6 minutes on 2 cores
    python -m tracerl.demo --seeds 0 1 2      # the README's 3-seed numbers (mean and spread)

Steps, each the command a user would type (printed as it runs):
  1. `tracerl tiny` + `tracerl sft recipes/sudoku_sft.yaml`: the start model, SFT from random weights (~30 s);
  2. held-out evaluation of the start model (512 puzzles none of which is in the train file);
  3. `tracerl train recipes/sudoku_tracerl.yaml trainer.seed=S`: TraceRL, held-out accuracy every 25 steps;
  4. held-out evaluation after RL, a before/after table, and a PNG of reward and held-out accuracy per RL step.
Everything goes under outputs/sudoku/ (results.json holds the numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

SFT_RECIPE, RL_RECIPE = "recipes/sudoku_sft.yaml", "recipes/sudoku_tracerl.yaml"
ROOT = Path("outputs/sudoku")  # where both recipes write; --out elsewhere adds the overrides that say so
# (label, rollout overrides): the RL setting first; the others show what the gain does to other decoders
DECODERS = [
    ("4 steps (trained)", {}),
    ("16 steps", {"steps": 16}),
    ("dynamic, conf > 0.9", {"steps": 16, "threshold": 0.9}),
]


def tracerl(*args: str) -> None:
    """Run one `tracerl` command in a child process, as the README shows it; stop the demo if it fails."""
    print(f"\n$ tracerl {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "tracerl", *args])
    if done.returncode:  # the child already said why; pass its exit code on (2 = a user error)
        print(f"demo: `tracerl {' '.join(args)}` failed with exit code {done.returncode}", file=sys.stderr)
        raise SystemExit(done.returncode)


def evaluate_checkpoint(checkpoint: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Greedy held-out scores of a checkpoint under each decoder: what `tracerl eval RL_RECIPE --checkpoint DIR
    rollout.steps=...` prints, without paying the process start-up once per decoder."""
    from tracerl.build import build_model, build_rewards
    from tracerl.data import load_rows
    from tracerl.evaluate import evaluate
    from tracerl.recipe import load_config

    config = load_config(RL_RECIPE, overrides)
    rows, rewards = load_rows(config.data, "eval"), build_rewards(config)
    model = build_model(config.model, None, path=str(checkpoint))
    scores = {}
    for label, decoder in DECODERS:
        cfg = replace(config, rollout=replace(config.rollout, **decoder))
        summary, _ = evaluate(model, rows, rewards, cfg)
        scores[label] = {"cells": summary["rewards/cells/mean"], "solved": summary["accuracy"],
                         "steps": summary["mean_steps"]}
    return scores


def eval_curve(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of one RL run: every step's train reward, and the held-out eval/* rows where present."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def print_table(before: dict, after: list[dict], n_eval: int) -> None:
    """Before/after per decoder; with several seeds, `after` is their mean and (min..max) spread."""
    print(f"\nHeld-out 4x4 Sudoku, {n_eval} puzzles, greedy decoding"
          + (f", RL mean of {len(after)} seeds (min..max)" if len(after) > 1 else ""))
    head = f"{'decoder':<22}{'':<8}{'cell acc':>24}{'full solve':>24}{'mean steps':>12}"
    print(head + "\n" + "-" * len(head))
    for label, _ in DECODERS:
        b = before[label]
        print(f"{label:<22}{'start':<8}{b['cells']:>24.3f}{b['solved']:>24.3f}{b['steps']:>12.2f}")
        cells = [a[label]["cells"] for a in after]
        solved = [a[label]["solved"] for a in after]
        steps = [a[label]["steps"] for a in after]
        print(f"{'':<22}{'TraceRL':<8}{_spread(cells):>24}{_spread(solved):>24}{statistics.mean(steps):>12.2f}")
    gains = [a[DECODERS[0][0]]["solved"] - before[DECODERS[0][0]]["solved"] for a in after]
    print(f"\nfull-solve gain with the trained decoder: {100 * statistics.mean(gains):+.1f} points"
          + (f" (per seed: {', '.join(f'{100 * g:+.1f}' for g in gains)})" if len(gains) > 1 else ""))


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}..{max(values):.3f})"


def plot_curves(runs: dict[int, list[dict[str, Any]]], path: Path) -> Path:
    """Left: train reward (share of RL rollouts that solve their puzzle) per step, smoothed over 10 steps.
    Right: held-out full-solve rate and cell accuracy (greedy, the trained 4-step decoder) per RL step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (seed, rows) in enumerate(sorted(runs.items())):
        color = f"C{i}"
        train = [(r["step"], r["reward"]) for r in rows if "reward" in r]
        smooth = [sum(v for _, v in train[max(0, k - 9):k + 1]) / len(train[max(0, k - 9):k + 1])
                  for k in range(len(train))]
        left.plot([s for s, _ in train], [v for _, v in train], color=color, alpha=0.2, lw=0.8)
        left.plot([s for s, _ in train], smooth, color=color, label=f"seed {seed}")
        ev = [(r["step"], r["eval/accuracy"], r["eval/rewards/cells/mean"]) for r in rows if "eval/accuracy" in r]
        right.plot([s for s, _, _ in ev], [a for _, a, _ in ev], "o-", color=color, label=f"full solve, seed {seed}")
        right.plot([s for s, _, _ in ev], [c for _, _, c in ev], "s--", color=color, alpha=0.6,
                   label=f"cell accuracy, seed {seed}")
    left.set(xlabel="RL step", ylabel="train reward (rollouts solved, T=1)", title="TraceRL reward")
    right.set(xlabel="RL step", ylabel="held-out", title="Held-out Sudoku (greedy, 4 denoising steps)")
    left.legend(), right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracerl.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="RL seeds (one run each, same start model)")
    p.add_argument("--out", type=Path, default=ROOT, help="where everything goes")
    p.add_argument("--reuse-start", action="store_true", help="keep an existing OUT/sft/final instead of retraining")
    p.add_argument("--sft-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the SFT recipe, e.g. trainer.max_steps=50 (repeatable)")
    p.add_argument("--reuse-runs", action="store_true", help="keep RL runs that already have a checkpoint")
    p.add_argument("overrides", nargs="*", help="extra overrides for the RL recipe, e.g. trainer.max_steps=100")
    a = p.parse_args(argv)
    if not Path(RL_RECIPE).is_file():  # recipes and shipped data are named relative to the repository root
        p.error(f"{RL_RECIPE} not found: run the demo from the repository root (where `make demo` runs it)")
    t0 = time.perf_counter()
    root, start = a.out, a.out / "sft" / "final"
    moved = a.out != ROOT  # recipes write under outputs/sudoku; elsewhere, say so on every command
    sft_paths = [f"model.path={root / 'init'}", f"trainer.output_dir={root / 'sft'}"] if moved else []
    rl_paths = [f"model.path={start}"] if moved else []

    print("== 1. the start model: a tiny LLaDA-style diffusion LM, SFT from random weights on solved puzzles")
    if not (a.reuse_start and start.exists()):
        tracerl("tiny", str(root / "init"), "--hidden-size", "48", "--num-layers", "4")
        tracerl("sft", SFT_RECIPE, *sft_paths, *a.sft_override)
    print("\n== 2. held-out evaluation of the start model")
    before = evaluate_checkpoint(start, rl_paths + a.overrides)
    print(json.dumps(before, indent=1))

    after, runs = [], {}
    for seed in a.seeds:
        run_dir = root / f"rl_seed{seed}"
        print(f"\n== 3. TraceRL (seed {seed}); held-out accuracy every 25 steps goes to {run_dir}/metrics.jsonl")
        if not (a.reuse_runs and list(run_dir.glob("checkpoint-*"))):
            tracerl("train", RL_RECIPE, f"trainer.seed={seed}", f"trainer.output_dir={run_dir}", *rl_paths,
                    *a.overrides)
        runs[seed] = eval_curve(run_dir)
        last = max((d for d in run_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                   key=lambda d: int(d.name.split("-")[-1]))
        print(f"\n== 4. held-out evaluation of {last}")
        after.append(evaluate_checkpoint(last, rl_paths + a.overrides))

    from tracerl.data import load_rows
    from tracerl.recipe import load_config

    print_table(before, after, len(load_rows(load_config(RL_RECIPE, rl_paths + a.overrides).data, "eval")))
    png = plot_curves(runs, root / "curves.png")
    results = {"before": before, "after": dict(zip(map(str, a.seeds), after)), "seconds": time.perf_counter() - t0}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nplot: {png}   numbers: {root / 'results.json'}   total {time.perf_counter() - t0:.0f} s")
    print(f"see a trajectory: tracerl generate --model {last} --prompt $'Sudoku: 1200301201304301\\n' "
          f"--max-completion-length 16 --steps 4 --temperature 0 --show-trajectory --plot {root / 'trajectory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
