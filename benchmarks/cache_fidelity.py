"""Approximate caches on a trained model: speed, token agreement with the exact decoder, and task accuracy.

    tracerl tiny outputs/repeat/init --hidden-size 64 --num-layers 4 && tracerl sft recipes/repeat_sft.yaml
    python benchmarks/cache_fidelity.py [--model outputs/repeat/sft/final] [--n 128] [--batch 8]

Greedy decoding of the first `--n` held-out Repeat prompts (256-character responses, semi-AR blocks of 32, 2 tokens
per step) with rollout.cache none / prefix / dual; agreement = the share of response tokens equal to the exact
(none) decoder's, accuracy = exact copies (tracerl.tasks.repeat.solved_reward).
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.models import load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.tasks import read_rows
from tracerl.tasks.repeat import PROMPT_TEMPLATE, chars_reward, solved_reward


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="outputs/repeat/sft/final")
    p.add_argument("--data", default="recipes/data/repeat_test.jsonl")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rows = read_rows(args.data)[:args.n]
    print(f"{args.model}: {len(rows)} held-out prompts, batch {args.batch}, 256 tokens, block 32, 2 tokens/step")
    print("| cache | tokens/s | speed-up | tokens equal to exact | exact copies | characters right |")
    print("|---|---|---|---|---|---|")
    exact_ids, exact_tps = None, None
    for mode in ("none", "prefix", "dual"):
        cfg = RolloutConfig(max_completion_length=256, steps=128, block_length=32, temperature=0.0, cache=mode)
        ids, texts, seconds = [], [], 0.0
        for i in range(0, len(rows), args.batch):
            chunk = rows[i:i + args.batch]
            prompts = [model.tokenizer(PROMPT_TEMPLATE.format(**r), add_special_tokens=False)["input_ids"]
                       for r in chunk]
            start = time.perf_counter()
            traj = generate(model, prompts, cfg)
            seconds += time.perf_counter() - start
            ids.append(traj.response_ids)
            texts += completions(traj, model.tokenizer)
        ids = torch.cat(ids)
        tps = ids.numel() / seconds
        exact_ids, exact_tps = (ids, tps) if exact_ids is None else (exact_ids, exact_tps)
        agree = (ids == exact_ids).float().mean().item()
        gold = [r["solution"] for r in rows]
        solved = sum(solved_reward(None, texts, gold)) / len(rows)
        chars = sum(chars_reward(None, texts, gold)) / len(rows)
        print(f"| {mode} | {tps:,.0f} | {tps / exact_tps:.2f}x | {100 * agree:.1f}% | {100 * solved:.1f}% | "
              f"{100 * chars:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
