"""Rollout throughput on CPU: naive full-sequence sampling vs block diffusion with the KV cache vs dynamic threshold.

    python benchmarks/rollout.py [--lengths 64 256 1024] [--batch 2] [--threads 2]

One random model (Qwen3 architecture, 4 layers, hidden 256, block_size 4), one run, three samplers:
  (a) naive     block-causal model, every step runs the whole frame (use_kv_cache=False), 1 token per step
  (b) kv-cache  committed blocks served from the KV cache, 1 token per step (same tokens as (a) when greedy)
  (c) dynamic   KV cache + Fast-dLLM threshold 0.9 (commit every token with p > 0.9, at least one)
The random model's lm_head is scaled up so its distributions are as peaked as a trained model's; otherwise no
token ever clears the threshold and (c) degenerates to (b).
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig, generate


def run(model, prompts, cfg) -> tuple[float, int]:
    start = time.perf_counter()
    traj = generate(model, prompts, cfg)
    seconds = time.perf_counter() - start
    return traj.num_sequences * traj.response_length / seconds, traj.num_forwards


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_tiny_model("qwen3", block_size=4, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                             max_position_embeddings=4096, seed=0)
    with torch.no_grad():
        model.backbone.lm_head.weight.mul_(40.0)
    prompt = model.tokenizer("Solve the puzzle step by step: 3 1 _ 4 / _ 4 3 _", add_special_tokens=False)["input_ids"]
    prompts = [prompt] * args.batch
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print("| length | sampler | forwards | tokens/s | speed-up vs naive |")
    print("|---|---|---|---|---|")
    for L in args.lengths:
        base = dict(max_completion_length=L, steps=L, block_length=None, temperature=1.0, seed=0)
        naive_tps, naive_fw = run(model, prompts, RolloutConfig(**base, use_kv_cache=False))
        rows = [("(a) naive", naive_tps, naive_fw),
                ("(b) kv-cache", *run(model, prompts, RolloutConfig(**base))),
                ("(c) dynamic 0.9", *run(model, prompts, RolloutConfig(**base, threshold=0.9)))]
        for name, tps, fw in rows:
            print(f"| {L} | {name} | {fw} | {tps:,.0f} | {tps / naive_tps:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
