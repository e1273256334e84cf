"""Policy-gradient estimators for diffusion LMs, head to head on 4x4 Sudoku from one SFT start model.

    python -m tracerl.demo                                    # makes the start model outputs/sudoku/sft/final
    python benchmarks/compare_estimators.py --jobs 2          # the README's comparison: 6 x 3 runs on 2 cores
    python benchmarks/compare_estimators.py --quick           # smoke run, ~2 minutes

The setting is recipes/sudoku_tracerl.yaml's: 4 denoising steps for 16 cells, temperature 1, the all-or-nothing
`solved` reward, 32 puzzles x 8 completions per RL step, learning rate 2e-4, the shipped train / held-out files.
Every run starts from the same checkpoint, sees the same prompts in the same order (trainer.seed), spends the same
rollouts per RL step, and stops at the same compute budget; only `algorithm` differs. The published baselines run
with their published method settings (tracerl/estimators.py, docs/estimators.md): PPO iterations per rollout batch,
clip range, KL coefficient, prompt masking. The learning rate is the shared one (the published ones are for LoRA
on 8B models):

  trace_s1     TraceRL: one training row per denoising step (every state the sampler visited)
  trace_s2     TraceRL with step shrinkage s=2: 2 consecutive steps merged into one row (half the forwards)
  trace_value  TraceRL s=1 with the diffusion value model (step-level GAE, lambda 0.5, instead of group baselines)
  d1           diffu-GRPO as published: completion fully masked, prompt masked w.p. 0.15, a fresh mask per
               iteration, 8 iterations per batch (d1's Sudoku setting), eps 0.5, beta 0.04, no std scaling
  coupled      coupled-GRPO as published: 3 passes (all / u < t / u > t), weighted scores, leave-one-out
               advantage, 2 iterations, eps 0.5, beta 0.01
  wd1          wd1 as published: d1's masks, ratio-free weighted likelihood, 8 iterations (wd1's Sudoku setting)
  wd1_lr/16    the same with the learning rate / 16 (its loss sums the 16 tokens) and one group per micro-batch

The budget clock is the process CPU time by default (`--clock cpu`, run with one thread): on a machine shared with
other jobs it measures the work a run did, where wall time would measure the neighbours. Held-out greedy accuracy is
evaluated every `--eval-every` RL steps (evaluation time is not charged to the budget). Writes, under --out:
results.jsonl (one curve per run), results.md (table) and accuracy_vs_time.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from _plots import finish_figure  # benchmarks/_plots.py (the script's own directory)
from reward_models import load_reward
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, SFTConfig, SFTSection, TrainerConfig
from tracerl.models import DiffusionLM, build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.sft import train_sft
from tracerl.tasks import apply_template, read_rows, sudoku
from tracerl.trainer import RLTrainer

ESTIMATORS: dict[str, dict[str, Any]] = {
    "trace_s1": {"estimator": "trace", "shrink": 1},
    "trace_s2": {"estimator": "trace", "shrink": 2},
    "trace_value": {"estimator": "trace", "shrink": 1, "use_value_model": True, "lam": 0.5,
                    "value_learning_rate": 1e-3},
    "d1": {"estimator": "d1", "num_iterations": 8, "epsilon": 0.5, "beta": 0.04, "p_mask_prompt": 0.15},
    "coupled": {"estimator": "coupled", "num_iterations": 2, "epsilon": 0.5, "beta": 0.01},
    "wd1": {"estimator": "wd1", "num_iterations": 8, "p_mask_prompt": 0.15},
    # wd1's loss sums its 16 tokens (no length normalisation) and takes no ratio, so the shared lr is ~16x larger
    # for it than for a token-mean PPO loss; this variant scales it back and gives each micro-batch one group, as
    # wd1's published runs do (per-device batch = one group of G)
    "wd1_lr/16": {"estimator": "wd1", "num_iterations": 8, "p_mask_prompt": 0.15, "lr_scale": 1 / 16,
                  "one_group_per_microbatch": True},
}
RESPONSE = 16  # the 16-digit solution; no EOS needed


def sudoku_data(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """The recipe's train and held-out files (disjoint), first n rows of each, with prompts."""
    train = read_rows("recipes/data/sudoku_train.jsonl")[:n_train]
    test = read_rows("recipes/data/sudoku_test.jsonl")[:n_test]
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
    algorithm = dict(algorithm)
    lr = args.learning_rate * algorithm.pop("lr_scale", 1.0)
    per_device = args.num_generations * args.prompts_per_step
    accumulation = 1
    if algorithm.pop("one_group_per_microbatch", False):
        per_device, accumulation = args.num_generations, args.prompts_per_step
    return RLConfig(
        rollout=RolloutConfig(max_completion_length=RESPONSE, steps=args.rollout_steps, temperature=args.temperature),
        algorithm=AlgorithmConfig(**algorithm),
        optimizer=OptimizerConfig(learning_rate=lr),
        trainer=TrainerConfig(max_steps=10**6, num_generations=args.num_generations,
                              per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                              seed=seed, output_dir=str(out), logging_steps=10**9),
    )


def run_one(args: argparse.Namespace, name: str, seed: int, train: list[dict], test: list[dict],
            clock_name: str) -> dict[str, Any]:
    """One RL run under the budget (in a worker process); returns its accuracy curve
    [(seconds, step, rollouts, scores)]."""
    clock: Callable[[], float] = time.process_time if clock_name == "cpu" else time.perf_counter
    out = Path(args.out) / "runs" / run_dir(name, seed)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.start).to(args.device)
    torch.set_num_threads(args.threads)
    # --quick's 30-step model never solves a grid: the cell fraction gives its smoke run a signal to train on
    reward = load_reward("sudoku") if args.quick else sudoku.solved_reward
    trainer = RLTrainer(rl_config(args, ESTIMATORS[name], seed, out), model, reward, train)
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
    result = {"estimator": name, "seed": seed, "curve": curve}
    (out / "result.json").write_text(json.dumps(result))  # kept even if a later run fails
    return result


def run_dir(name: str, seed: int) -> str:
    return f"{name.replace('/', '_')}_seed{seed}"


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
    finish_figure(fig, axes, ("held-out full-solve rate (%)", "held-out cell accuracy (%)"),
                  f"RL {clock} seconds (evaluation excluded)",
                  "4x4 Sudoku: policy-gradient estimators from one SFT start (each line = one seed)", path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", default="outputs/sudoku/sft/final", help="SFT checkpoint directory (the demo's)")
    p.add_argument("--out", default="outputs/compare_estimators")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=240.0, help="RL seconds per run (see --clock)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda: where each run's model lives")
    p.add_argument("--eval-every", type=int, default=10, help="RL steps between held-out evaluations")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--rollout-steps", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, budget and model")
    p.add_argument("--summarize", action="store_true", help="only rebuild the table and plot from --out/runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.n_train, args.n_test, args.budget, args.eval_every = 64, 32, 3.0, 5
        args.seeds, args.prompts_per_step, args.num_generations = args.seeds[:1], 2, 4
    jobs = [(name, seed) for seed in args.seeds for name in args.estimators]
    if args.summarize:
        found = [out / "runs" / run_dir(name, seed) / "result.json" for name, seed in jobs]
        return report([json.loads(f.read_text()) for f in found if f.exists()], args, out)
    train, test = sudoku_data(args.n_train, args.n_test)
    if args.quick and args.start == p.get_default("start"):
        args.start = str(quick_start_model(train, out / "quick_sft"))
    if not Path(args.start).is_dir():
        p.error(f"--start {args.start}: no such checkpoint directory (run `python -m tracerl.demo` first)")
    results = []
    with (out / "results.jsonl").open("w") as f, ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, args, name, seed, train, test, args.clock) for name, seed in jobs]
        for future in futures:  # in submission order, so the file and table are ordered however the runs finish
            results.append(future.result())
            f.write(json.dumps({**results[-1], "config": {k: v for k, v in vars(args).items()}}) + "\n")
            f.flush()
    report(results, args, out)


def report(results: list[dict], args: argparse.Namespace, out: Path) -> None:
    table = summarize(results, args.budget)
    (out / "results.md").write_text(table)
    plot(results, out / "accuracy_vs_time.png", args.clock)
    print(table)
    print(f"wrote {out}/results.jsonl, results.md, accuracy_vs_time.png")


if __name__ == "__main__":
    main()
