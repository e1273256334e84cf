"""Policy-gradient estimators for diffusion LMs, head to head on 4x4 Sudoku from one SFT start model.

    python benchmarks/compare_estimators.py --start outputs/sudoku_start/final          # the full comparison
    python benchmarks/compare_estimators.py --quick                                      # smoke run, ~2 minutes

Every run starts from the same checkpoint, sees the same prompts in the same order (trainer.seed), spends the same
rollouts per RL step, and stops at the same compute budget; only `algorithm` differs:

  trace_s1        TraceRL: one training row per denoising step (every state the sampler visited)
  trace_s4        TraceRL with step shrinkage s=4: 4 consecutive steps merged into one row (4x fewer forwards)
  trace_value     TraceRL s=4 with the diffusion value model (step-level GAE instead of group baselines)
  random_masking  d1 / diffu-GRPO: the completion re-masked at a random ratio, prompt tokens masked w.p. 0.15
  coupled         DiffuCoder: a random mask and its complement (two rows per completion)

The budget clock is the process CPU time by default (`--clock cpu`, run with one thread): on a machine shared with
other jobs it measures the work a run did, where wall time would measure the neighbours. Held-out greedy accuracy is
evaluated every `--eval-every` RL steps (evaluation time is not charged to the budget). Writes, under --out:
results.jsonl (one curve per run), results.md (table) and accuracy_vs_time.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from reward_models import load_reward
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, SFTConfig, SFTSection, TrainerConfig
from tracerl.models import DiffusionLM, build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.sft import train_sft
from tracerl.tasks import apply_template, sudoku
from tracerl.trainer import RLTrainer

ESTIMATORS: dict[str, dict[str, Any]] = {
    "trace_s1": {"estimator": "trace", "shrink": 1},
    "trace_s4": {"estimator": "trace", "shrink": 4},
    "trace_value": {"estimator": "trace", "shrink": 4, "use_value_model": True},
    "random_masking": {"estimator": "random_masking", "p_mask_prompt": 0.15},
    "coupled": {"estimator": "coupled"},
}
RESPONSE = 16  # the 16-digit solution; no EOS needed


def sudoku_data(n_train: int, n_test: int, blanks: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out puzzles (disjoint), with prompts."""
    train = sudoku.generate(n_train, blanks, seed)
    test = sudoku.generate(n_test, blanks, seed + 1000, exclude={r["puzzle"] for r in train})
    return apply_template(train, sudoku.PROMPT_TEMPLATE), apply_template(test, sudoku.PROMPT_TEMPLATE)


@torch.no_grad()
def evaluate(model: DiffusionLM, rows: list[dict], steps: int, batch: int = 256) -> dict[str, float]:
    """Greedy held-out scores: cell accuracy over the blanks (the reward) and full-solve rate."""
    reward = load_reward("sudoku")
    config = RolloutConfig(max_completion_length=RESPONSE, steps=steps, temperature=0)
    scores: list[float] = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        ids = [model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        texts = completions(generate(model, ids, config), model.tokenizer)
        scores += reward(None, texts, puzzle=[r["puzzle"] for r in chunk], solution=[r["solution"] for r in chunk])
    return {"cell_accuracy": sum(scores) / len(scores), "solve_rate": sum(s == 1.0 for s in scores) / len(scores)}


def quick_start_model(rows: list[dict], out: Path) -> Path:
    """--quick without --start: a small SFT model (a smoke test of the script, not a meaningful start point)."""
    model = build_tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=0,
                             max_position_embeddings=256)
    cfg = SFTConfig(sft=SFTSection(completion_column="solution", max_completion_length=RESPONSE),
                    optimizer=OptimizerConfig(learning_rate=3e-3),
                    trainer=TrainerConfig(max_steps=30, per_device_train_batch_size=32, output_dir=str(out),
                                          logging_steps=10**9))
    train_sft(model, rows, cfg)
    return out / "final"


def rl_config(args: argparse.Namespace, algorithm: dict[str, Any], seed: int, out: Path) -> RLConfig:
    return RLConfig(
        rollout=RolloutConfig(max_completion_length=RESPONSE, steps=args.rollout_steps, temperature=args.temperature),
        algorithm=AlgorithmConfig(**algorithm),
        optimizer=OptimizerConfig(learning_rate=args.learning_rate),
        trainer=TrainerConfig(max_steps=10**6, num_generations=args.num_generations,
                              per_device_train_batch_size=args.num_generations * args.prompts_per_step,
                              seed=seed, output_dir=str(out), logging_steps=10**9),
    )


def run_one(args: argparse.Namespace, name: str, seed: int, train: list[dict], test: list[dict],
            clock: Callable[[], float]) -> dict[str, Any]:
    """One RL run under the budget; returns its accuracy curve [(seconds, step, rollouts, scores)]."""
    out = Path(args.out) / "runs" / f"{name}_seed{seed}"
    model = load_model(args.start)
    trainer = RLTrainer(rl_config(args, ESTIMATORS[name], seed, out), model, load_reward("sudoku"), train)
    per_step = args.num_generations * args.prompts_per_step
    curve = [{"seconds": 0.0, "step": 0, "rollouts": 0, **evaluate(model, test, args.rollout_steps)}]
    spent = 0.0
    while spent < args.budget:
        start = clock()
        metrics = trainer.train_step()
        spent += clock() - start
        if trainer.step % args.eval_every == 0 or spent >= args.budget:
            curve.append({"seconds": spent, "step": trainer.step, "rollouts": trainer.step * per_step,
                          "train_reward": metrics["reward"], **evaluate(model, test, args.rollout_steps)})
            print(f"  {name} seed {seed}: step {trainer.step} {spent:.0f}s solve {curve[-1]['solve_rate']:.3f} "
                  f"cell {curve[-1]['cell_accuracy']:.3f}", flush=True)
    return {"estimator": name, "seed": seed, "curve": curve}


def value_at(curve: list[dict], key: str, limit: float, metric: str) -> float:
    """The metric at the last evaluation with curve[key] <= limit."""
    return [p for p in curve if p[key] <= limit + 1e-9][-1][metric]


def summarize(results: list[dict], budget: float) -> str:
    """Markdown table: before, at equal rollouts (the fewest any run reached), at the budget; mean ± sd over seeds."""
    common = min(r["curve"][-1]["rollouts"] for r in results)
    lines = [f"Rollouts compared at: {common} (the fewest any run completed); budget {budget:.0f} s.", "",
             "| estimator | seeds | RL steps in budget | solve before | solve @ equal rollouts | solve @ budget | "
             "cell acc @ budget | s / step |", "|---|---|---|---|---|---|---|---|"]

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"

    for name in dict.fromkeys(r["estimator"] for r in results):
        runs = [r for r in results if r["estimator"] == name]
        last = [r["curve"][-1] for r in runs]
        steps = [p["step"] for p in last]
        lines.append(
            f"| {name} | {len(runs)} | {statistics.mean(steps):.0f} | "
            f"{fmt([r['curve'][0]['solve_rate'] for r in runs])} | "
            f"{fmt([value_at(r['curve'], 'rollouts', common, 'solve_rate') for r in runs])} | "
            f"{fmt([p['solve_rate'] for p in last])} | {fmt([p['cell_accuracy'] for p in last])} | "
            f"{statistics.mean(p['seconds'] / max(p['step'], 1) for p in last):.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(dict.fromkeys(r["estimator"] for r in results)):
        color = f"C{i}"
        for j, run in enumerate(r for r in results if r["estimator"] == name):
            xs = [p["seconds"] for p in run["curve"]]
            for ax, key in zip(axes, ("solve_rate", "cell_accuracy")):
                ax.plot(xs, [100 * p[key] for p in run["curve"]], color=color, alpha=0.8, marker=".",
                        label=name if j == 0 else None)
    for ax, title in zip(axes, ("held-out full-solve rate (%)", "held-out cell accuracy (%)")):
        ax.set_xlabel(f"RL {clock} seconds (evaluation excluded)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("4x4 Sudoku: policy-gradient estimators from one SFT start (each line = one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", help="SFT checkpoint directory (required unless --quick)")
    p.add_argument("--out", default="outputs/compare_estimators")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=180.0, help="RL seconds per run (see --clock)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=5, help="RL steps between held-out evaluations")
    p.add_argument("--blanks", type=int, default=6)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--rollout-steps", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, budget and model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.n_train, args.n_test, args.budget, args.eval_every = 64, 32, 6.0, 2
        args.seeds, args.prompts_per_step, args.num_generations = args.seeds[:1], 2, 4
    train, test = sudoku_data(args.n_train, args.n_test, args.blanks)
    if args.start is None:
        if not args.quick:
            p.error("--start is required (or --quick)")
        args.start = str(quick_start_model(train, out / "quick_sft"))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = []
    with (out / "results.jsonl").open("w") as f:
        for seed in args.seeds:
            for name in args.estimators:
                results.append(run_one(args, name, seed, train, test, clock))
                f.write(json.dumps({**results[-1], "config": {k: v for k, v in vars(args).items()}}) + "\n")
                f.flush()
    table = summarize(results, args.budget)
    (out / "results.md").write_text(table)
    plot(results, out / "accuracy_vs_time.png", args.clock)
    print(table)
    print(f"wrote {out}/results.jsonl, results.md, accuracy_vs_time.png")


if __name__ == "__main__":
    main()
