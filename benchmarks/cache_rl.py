"""RL with approximate rollout caches: does TraceRL still learn when the sampler is not the model, and does TIS help?

    tracerl tiny outputs/repeat/init --hidden-size 64 --num-layers 4 && tracerl sft recipes/repeat_sft.yaml
    python benchmarks/cache_rl.py --jobs 2 --seeds 0 1 2         # 6 arms x 3 seeds, ~110 min (README: all but elastic)
    python benchmarks/cache_rl.py --quick                        # smoke run, under a minute

The task is Repeat (tracerl/tasks/repeat.py: 256-character answers) from the SFT start model of
recipes/repeat_sft.yaml. Every arm starts from the same checkpoint, sees the same prompts in the same order, samples
the same number of completions per RL step (temperature 1, 64 denoising steps in semi-AR blocks of 32, so 4 tokens
per step; 4 prompts x 8 completions per RL step) and trains with the same objective (TraceRL, s = 1, the
all-or-nothing `solved` reward, learning rate 1e-5: at 1e-4 the 256-token copy broke within 10 steps) until the
same compute budget; only the rollout differs:

  none       the exact decoder (a full forward at every denoising step)
  prefix     rollout.cache=prefix: the prompt's and committed blocks' keys/values reused within a block
  dual       rollout.cache=dual: the masked suffix's reused too (Fast-dLLM's dual cache)
  dual_tis   dual + algorithm.rollout_correction=tis (each token's loss weighted by min(pi_old / pi_sampler, 2))
  dual_h8    dual with rollout.cache_horizon=8: the 8 positions after the block recomputed at every step too
  elastic    rollout.cache=elastic: Elastic-Cache at its published gamma 0.9, a window of 32 masks from the block

The budget clock is the process CPU time (one thread per run), so runs sharing the machine are charged only their
own work. Every `--eval-every` RL steps (not charged) the held-out prompts are decoded greedily twice: with the exact
decoder and with the arm's own cache. The rollout/replay gap the trainer logs (rollout/logprob_gap_mean,
rollout/greedy_mismatch, rollout/is_weight_mean) is kept per step. Writes, under --out: results.jsonl, results.md,
reward_and_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from dataclasses import replace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from _plots import finish_figure  # benchmarks/_plots.py (the script's own directory)
from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.models import DiffusionLM, build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings
from tracerl.rollout.display import completions
from tracerl.tasks import apply_template, read_rows
from tracerl.tasks.repeat import LENGTH, PROMPT_TEMPLATE, solved_reward
from tracerl.trainer import RLTrainer

ARMS: dict[str, dict[str, Any]] = {
    "none": {"cache": "none"},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "dual_tis": {"cache": "dual", "rollout_correction": "tis"},
    "dual_h8": {"cache": "dual:h8"},
    "elastic": {"cache": "elastic"},
}
GAP_KEYS = ("rollout/logprob_gap_mean", "rollout/greedy_mismatch", "rollout/is_weight_mean")


def rollout_config(args: argparse.Namespace, cache: str, temperature: float) -> RolloutConfig:
    """cache: a cache name (tracerl.rollout.caching.cache_settings), e.g. 'dual:h8'."""
    return RolloutConfig(max_completion_length=LENGTH, steps=args.rollout_steps, block_length=32,
                         temperature=temperature, **cache_settings(cache))


@torch.no_grad()
def exact_copy_rate(model: DiffusionLM, rows: list[dict], config: RolloutConfig, batch: int = 64) -> float:
    """Share of held-out prompts whose greedy completion is the exact 256-character answer."""
    solved = 0.0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        ids = [model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        texts = completions(generate(model, ids, config), model.tokenizer)
        solved += sum(solved_reward(None, texts, [r["solution"] for r in chunk]))
    return solved / len(rows)


def evaluate(model: DiffusionLM, rows: list[dict], args: argparse.Namespace, cache: str) -> dict[str, float]:
    scores = {"exact_decoder": exact_copy_rate(model, rows, rollout_config(args, "none", 0.0))}
    scores["own_decoder"] = (scores["exact_decoder"] if cache == "none"
                             else exact_copy_rate(model, rows, rollout_config(args, cache, 0.0)))
    return scores


def run_one(args: argparse.Namespace, arm: str, seed: int, train: list[dict], test: list[dict]) -> dict[str, Any]:
    """One RL run under the CPU budget (in a worker process): its evaluation curve and per-step training log."""
    torch.set_num_threads(args.threads)
    settings = dict(ARMS[arm])
    cache = settings.pop("cache")
    out = Path(args.out) / "runs" / f"{arm}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    config = RLConfig(
        rollout=rollout_config(args, cache, args.temperature),
        algorithm=AlgorithmConfig(estimator="trace", shrink=1, **settings),
        optimizer=OptimizerConfig(learning_rate=args.learning_rate),
        trainer=TrainerConfig(max_steps=10**6, num_generations=args.num_generations,
                              per_device_train_batch_size=args.num_generations * args.prompts_per_step,
                              replay_batch_size=args.replay_batch_size, seed=seed, output_dir=str(out),
                              logging_steps=10**9))
    model = load_model(args.start)
    trainer = RLTrainer(config, model, solved_reward, train)
    curve = [{"seconds": 0.0, "step": 0, **evaluate(model, test, args, cache)}]
    log: list[dict[str, float]] = []
    spent = 0.0
    while spent < args.budget:
        start = time.process_time()
        metrics = trainer.train_step()
        spent += time.process_time() - start
        log.append({"seconds": spent, "step": trainer.step, "reward": metrics["reward"],
                    **{k: metrics[k] for k in GAP_KEYS if k in metrics}})
        if args.verbose:
            print(f"  {arm} seed {seed}: step {trainer.step} {spent:.0f}s {log[-1]}", flush=True)
        if trainer.step % args.eval_every == 0 or spent >= args.budget:
            curve.append({"seconds": spent, "step": trainer.step, **evaluate(model, test, args, cache)})
            print(f"  {arm} seed {seed}: step {trainer.step} {spent:.0f}s reward {metrics['reward']:.3f} "
                  f"held-out exact {curve[-1]['exact_decoder']:.3f} own {curve[-1]['own_decoder']:.3f}", flush=True)
    result = {"arm": arm, "seed": seed, "curve": curve, "log": log}
    (out / "result.json").write_text(json.dumps(result))  # kept even if a later run fails
    return result


def time_rollouts(args: argparse.Namespace, train: list[dict]) -> str:
    """CPU seconds of one RL step's rollout (the first step's prompts, each repeated num_generations times) per cache
    mode, against the measured seconds per RL step: how much of a step the cache can save on this machine."""
    torch.set_num_threads(args.threads)
    model = load_model(args.start)
    rows = train[:args.prompts_per_step]
    prompts = [model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
               for r in rows for _ in range(args.num_generations)]
    lines = ["| cache | rollout CPU s (32 completions) | speed-up |", "|---|---|---|"]
    base = None
    for cache in dict.fromkeys(settings["cache"] for settings in ARMS.values()):
        config = replace(rollout_config(args, cache, args.temperature), seed=0)
        start = time.process_time()
        with torch.no_grad():
            generate(model, prompts, config)
        seconds = time.process_time() - start
        base = base or seconds
        lines.append(f"| {cache} | {seconds:.1f} | {base / seconds:.2f}x |")
    return "\n".join(lines) + "\n"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def summarize(results: list[dict], budget: float) -> str:
    """Markdown table, one row per arm, mean ± sd over seeds."""
    lines = [f"Budget {budget:.0f} CPU s per run (one thread); held-out = greedy exact copies (%).", "",
             "| arm | seeds | RL steps | s / step | train reward, first 3 -> last 3 steps | held-out, exact decoder: "
             "start -> end | held-out, own decoder: start -> end | mean abs log-prob gap, first 3 -> last 3 steps | "
             "greedy mismatch | mean IS weight |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        last = [r["curve"][-1] for r in runs]

        def over_log(key: str, rows: slice) -> list[float]:
            return [mean([x[key] for x in r["log"][rows] if key in x]) for r in runs]

        has_is = all(GAP_KEYS[2] in x for r in runs for x in r["log"])
        lines.append(
            f"| {arm} | {len(runs)} | {mean([p['step'] for p in last]):.1f} | "
            f"{mean([p['seconds'] / max(p['step'], 1) for p in last]):.1f} | "
            f"{mean_sd(over_log('reward', slice(0, 3)), 1, 2)} -> {mean_sd(over_log('reward', slice(-3, None)), 1, 2)} | "
            f"{mean_sd([r['curve'][0]['exact_decoder'] for r in runs], 100)} -> "
            f"{mean_sd([p['exact_decoder'] for p in last], 100)} | "
            f"{mean_sd([r['curve'][0]['own_decoder'] for r in runs], 100)} -> "
            f"{mean_sd([p['own_decoder'] for p in last], 100)} | "
            f"{mean(over_log(GAP_KEYS[0], slice(0, 3))):.4f} -> {mean(over_log(GAP_KEYS[0], slice(-3, None))):.4f} | "
            f"{100 * mean(over_log(GAP_KEYS[1], slice(None))):.2f}% | "
            f"{f'{mean(over_log(GAP_KEYS[2], slice(None))):.3f}' if has_is else '-'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    for r in results:
        first_of_arm = r is next(x for x in results if x["arm"] == r["arm"])
        color, label = f"C{arms.index(r['arm'])}", r["arm"] if first_of_arm else None
        window = 5  # the per-step reward of 32 completions is noisy: a running mean
        rewards = [x["reward"] for x in r["log"]]
        smooth = [mean(rewards[max(0, j - window + 1):j + 1]) for j in range(len(rewards))]
        axes[0].plot([x["seconds"] for x in r["log"]], smooth, color=color, alpha=0.8, label=label)
        for ax, key in zip(axes[1:], ("exact_decoder", "own_decoder")):
            ax.plot([p["seconds"] for p in r["curve"]], [100 * p[key] for p in r["curve"]], color=color,
                    alpha=0.8, marker=".", label=label)
    titles = ("train reward (running mean of 5 steps)", "held-out exact copies (%), exact decoder",
              "held-out exact copies (%), the arm's own decoder")
    finish_figure(fig, axes, titles, "RL CPU seconds (evaluation excluded)",
                  "Repeat (256 tokens): TraceRL with exact and cached rollouts at equal compute (one line per seed)",
                  path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", default="outputs/repeat/sft/final", help="SFT checkpoint (recipes/repeat_sft.yaml)")
    p.add_argument("--out", default="outputs/cache_rl")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budget", type=float, default=480.0, help="RL CPU seconds per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=4, help="RL steps between held-out evaluations")
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollout-steps", type=int, default=64)
    p.add_argument("--replay-batch-size", type=int, default=256, help="training rows per forward (memory)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--verbose", action="store_true", help="print every RL step's reward and rollout gap")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget and held-out set")
    p.add_argument("--time-rollout", action="store_true", help="only time one RL step's rollout per cache mode")
    p.add_argument("--summarize", action="store_true", help="only rebuild the table and plot from --out/runs")
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.eval_every, args.n_test, args.prompts_per_step, args.num_generations = 5.0, 2, 8, 1, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.summarize:
        found = [out / "runs" / f"{arm}_seed{seed}" / "result.json" for arm, seed in jobs]
        return report([json.loads(f.read_text()) for f in found if f.exists()], args, out)
    if args.quick and args.start == p.get_default("start"):  # a smoke test of the script, not a start point
        args.start = str(out / "quick_init")
        build_tiny_model("llama", hidden_size=32, num_layers=2, max_position_embeddings=512).save_pretrained(args.start)
    if not Path(args.start).is_dir():
        p.error(f"--start {args.start}: no such checkpoint directory (run recipes/repeat_sft.yaml first)")
    train = apply_template(read_rows("recipes/data/repeat_train.jsonl"), PROMPT_TEMPLATE)
    if args.time_rollout:
        return print(time_rollouts(args, train))
    test = apply_template(read_rows("recipes/data/repeat_test.jsonl")[:args.n_test], PROMPT_TEMPLATE)
    results = []
    with (out / "results.jsonl").open("w") as f, ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, args, arm, seed, train, test) for arm, seed in jobs]
        for future in futures:
            results.append(future.result())
            f.write(json.dumps({**results[-1], "config": vars(args)}) + "\n")
            f.flush()
    report(results, args, out)


def report(results: list[dict], args: argparse.Namespace, out: Path) -> None:
    table = summarize(results, args.budget)
    (out / "results.md").write_text(table)
    plot(results, out / "reward_and_accuracy.png")
    print(table)
    print(f"wrote {out}/results.jsonl, results.md, reward_and_accuracy.png")


if __name__ == "__main__":
    main()
