"""Approximate caches on a trained model: speed, token agreement with the exact decoder, and task accuracy.

    tracerl tiny outputs/repeat/init --hidden-size 64 --num-layers 4 && tracerl sft recipes/repeat_sft.yaml
    python benchmarks/cache_fidelity.py [--model outputs/repeat/sft/final] [--n 128] [--batch 8]
        [--variants none prefix dual dual:h8 dual:h32 dual:r8]
    tracerl sft recipes/repeat1024_sft.yaml && python benchmarks/cache_fidelity.py --length 1024 --n 64 \\
        --variants none prefix dual dual:h8 dual:h32 dual:h64 dual:h128 dual:r8

Greedy decoding of the first `--n` held-out Repeat prompts (`--length`-character responses, semi-AR blocks of 32,
2 tokens per step) with each variant: a rollout.cache mode, optionally with `:hH` (rollout.cache_horizon H) and
`:rR` (rollout.cache_refresh R). The first variant is the reference (keep it `none`, the exact decoder): agreement =
the share of response tokens equal to its tokens, accuracy = exact copies (tracerl.tasks.repeat.solved_reward).
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.models import load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings
from tracerl.rollout.display import completions
from tracerl.tasks import read_rows
from tracerl.tasks.repeat import PROMPT_TEMPLATE, chars_reward, solved_reward


def variant_config(name: str, length: int) -> RolloutConfig:
    """'dual:h32:r8' -> the greedy RolloutConfig of that cache (blocks of 32, 2 tokens per step)."""
    try:
        settings = cache_settings(name)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    cfg = RolloutConfig(max_completion_length=length, steps=length // 2, block_length=32, temperature=0.0,
                        **settings)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=256, help="response tokens: 256 or 1024 (the data's answers)")
    p.add_argument("--model", help="default: outputs/repeat/sft/final (256), outputs/repeat1024/sft/final (1024)")
    p.add_argument("--data", help="default: recipes/data/repeat_test.jsonl (256), repeat1024_test.jsonl (1024)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["none", "prefix", "dual"])
    args = p.parse_args(argv)
    tag = "" if args.length == 256 else str(args.length)
    args.model = args.model or f"outputs/repeat{tag}/sft/final"
    args.data = args.data or f"recipes/data/repeat{tag}_test.jsonl"
    torch.set_num_threads(args.threads)
    configs = {name: variant_config(name, args.length) for name in args.variants}
    model = load_model(args.model)
    rows = read_rows(args.data)[:args.n]
    gold = [r["solution"] for r in rows]
    if any(len(g) != args.length for g in gold):
        raise SystemExit(f"{args.data}: solutions are not {args.length} characters (pass --length)")
    print(f"{args.model}: {len(rows)} held-out prompts, batch {args.batch}, {args.length} tokens, block 32, "
          "2 tokens/step")
    print("| cache | forwards | tokens/s | speed-up | tokens equal to exact | exact copies | characters right |")
    print("|---|---|---|---|---|---|---|")
    exact_ids, exact_tps = None, None
    for name, cfg in configs.items():
        ids, texts, seconds, forwards = [], [], 0.0, 0
        for i in range(0, len(rows), args.batch):
            chunk = rows[i:i + args.batch]
            prompts = [model.tokenizer(PROMPT_TEMPLATE.format(**r), add_special_tokens=False)["input_ids"]
                       for r in chunk]
            start = time.perf_counter()
            traj = generate(model, prompts, cfg)
            seconds += time.perf_counter() - start
            forwards += traj.num_forwards
            ids.append(traj.response_ids)
            texts += completions(traj, model.tokenizer)
        ids = torch.cat(ids)
        tps = ids.numel() / seconds
        exact_ids, exact_tps = (ids, tps) if exact_ids is None else (exact_ids, exact_tps)
        agree = (ids == exact_ids).float().mean().item()
        solved = sum(solved_reward(None, texts, gold)) / len(rows)
        chars = sum(chars_reward(None, texts, gold)) / len(rows)
        print(f"| {name} | {forwards} | {tps:,.0f} | {tps / exact_tps:.2f}x | {100 * agree:.1f}% | "
              f"{100 * solved:.1f}% | {100 * chars:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
