"""Cost of one RL update on CPU: forwards per response and seconds per step for each estimator, and the achieved
FLOP/s of the train step against this machine's own matmul FLOP/s, measured in the same run.

    python benchmarks/train_step.py [--threads 2] [--completions 4] [--length 32] [--old-logprobs-only]

One random ~26M-parameter model (hidden 512, 8 layers) per attention kind. Rollouts use one token per step (the
worst case for TraceRL: steps = length), so full-attention TraceRL at s = 1 replays every step.
Achieved FLOP/s counts 6 * parameters * tokens through the network (forward + backward) for the update phase.

A second table times the default configuration (old_logprobs: recompute, one PPO iteration) with the old
log-probs from a separate no-grad forward over every replay row (how TraceRL did it before) and taken from the
gradient pass, which computes the same numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.config import AlgorithmConfig, OptimizerConfig, RLConfig, TrainerConfig
from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig
from tracerl.trainer import RLTrainer
from tracerl.update import has_dropout as _reuses


def matmul_flops(seconds: float = 3.0, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def reward(prompts, completions, **kwargs):
    return [len(set(c)) / 10 for c in completions]


def measure(block: bool, estimator: str, shrink: int, args, separate_old: bool = False) -> dict[str, float]:
    model = build_tiny_model("qwen3" if block else "llama", block_size=4 if block else None, hidden_size=512,
                             num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=args.length, steps=args.length,
                              block_length=None if block else args.length),
        algorithm=AlgorithmConfig(estimator=estimator, shrink=shrink),
        optimizer=OptimizerConfig(learning_rate=1e-5),
        trainer=TrainerConfig(num_generations=args.completions, per_device_train_batch_size=args.completions,
                              replay_batch_size=16, output_dir="/tmp/tracerl-bench"),
    )
    rows = [{"prompt": "Fill the grid: 1 _ 3 _ / _ 4 _ 2"}]
    trainer = RLTrainer(cfg, model, reward, rows)
    import tracerl.trainer

    tracerl.trainer.has_dropout = (lambda m: True) if separate_old else _reuses  # True: the separate forward
    trainer.train_step()  # warm-up step (allocations, first-call overheads)
    flops = {"total": 0.0, "active": False}
    for name in ("logits", "logits_packed"):  # every replay forward goes through one of these two
        real = getattr(model, name)

        def counted(ids, *a, _real=real, **k):
            if flops["active"]:  # forward + backward = 6 flops per parameter per token, forward only = 2
                flops["total"] += (6 if torch.is_grad_enabled() else 2) * n_params * ids.numel()
            return _real(ids, *a, **k)

        setattr(model, name, counted)
    real_update = trainer.update

    def update(*a, **k):
        flops["active"] = True
        try:
            return real_update(*a, **k)
        finally:
            flops["active"] = False

    trainer.update = update
    metrics = trainer.train_step()
    return {
        "forwards": metrics["trajectory/replay_forwards_per_response"],
        "train_seconds": metrics["perf/train_seconds"],
        "step_seconds": metrics["perf/step_seconds"],
        "flops": flops["total"] / metrics["perf/train_seconds"],
    }


def compare_old_logprobs(args) -> None:
    print("| model | old log-probs | train s / step | RL step s | train speed-up |")
    print("|---|---|---|---|---|")
    for block, name in ((False, "full attention s=1"), (True, "block diffusion (packed) s=1")):
        runs: dict[bool, list] = {True: [], False: []}
        for _ in range(3):  # interleaved, so a busy moment of the machine hits both alike; the best of 3 each
            for separate in (True, False):
                runs[separate].append(measure(block, "trace", 1, args, separate_old=separate))
        before = min(runs[True], key=lambda r: r["train_seconds"])
        after = min(runs[False], key=lambda r: r["train_seconds"])
        print(f"| {name} | separate forward (before) | {before['train_seconds']:.2f} | {before['step_seconds']:.2f} | "
              "1.00x |")
        print(f"| {name} | from the gradient pass | {after['train_seconds']:.2f} | {after['step_seconds']:.2f} | "
              f"{before['train_seconds'] / after['train_seconds']:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--old-logprobs-only", action="store_true", help="only the before/after old log-probs table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.old_logprobs_only:
        compare_old_logprobs(args)
        return
    peak = matmul_flops()
    print(f"machine matmul: {peak / 1e9:.1f} GFLOP/s fp32 ({args.threads} threads)")
    print("| estimator | forwards / response | train s / step | RL step s | achieved GFLOP/s | share of matmul |")
    print("|---|---|---|---|---|---|")
    runs = [(False, "trace", s, f"TraceRL full attention s={s}") for s in (1, 2, 4, 8)]
    runs += [(True, "trace", 1, "TraceRL block diffusion (packed) s=1"),
             (True, "trace", 2, "TraceRL block diffusion (packed) s=2"),
             (False, "d1", 1, "d1 (diffu-GRPO), one iteration"), (False, "coupled", 1, "coupled-GRPO, one iteration"),
             (False, "wd1", 1, "wd1, one iteration")]
    for block, estimator, shrink, name in runs:
        r = measure(block, estimator, shrink, args)
        print(f"| {name} | {r['forwards']:.1f} | {r['train_seconds']:.2f} | {r['step_seconds']:.2f} | "
              f"{r['flops'] / 1e9:.1f} | {r['flops'] / peak:.0%} |", flush=True)
    print()
    compare_old_logprobs(args)


if __name__ == "__main__":
    main()
