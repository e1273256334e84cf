"""Rollout throughput on CPU: naive full-sequence sampling vs block diffusion with the KV cache vs dynamic threshold;
and for full attention (LLaDA / Dream) the approximate prefix / dual caches against the exact decoder.

    python benchmarks/rollout.py [--lengths 64 256 1024] [--batch 2] [--threads 2] [--table block|full|both]

One random model (Qwen3 architecture, 4 layers, hidden 256, block_size 4), one run, three samplers:
  (a) naive     block-causal model, every step runs the whole frame (use_kv_cache=False), 1 token per step
  (b) kv-cache  committed blocks served from the KV cache, 1 token per step (same tokens as (a) when greedy)
  (c) dynamic   KV cache + Fast-dLLM threshold 0.9 (commit every token with p > 0.9, at least one)
The random model's lm_head is scaled up so its distributions are as peaked as a trained model's; otherwise no
token ever clears the threshold and (c) degenerates to (b).

Full-attention table: a random LLaDA-shaped model (Llama architecture, 4 layers, hidden 128), semi-AR blocks of 32,
2 tokens per step, greedy; tokens/s of rollout.cache none / prefix / dual / dual with a fresh horizon of 8
(`--full-caches`) at each length and batch size, and the share of response tokens equal to the exact (uncached)
decoder's. Random weights are the hard case for agreement (nothing is confident, so a small logit change flips a
choice); benchmarks/cache_fidelity.py measures agreement and task accuracy on a trained model.
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.models import build_tiny_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings


def run(model, prompts, cfg) -> tuple[float, int]:
    start = time.perf_counter()
    traj = generate(model, prompts, cfg)
    seconds = time.perf_counter() - start
    return traj.num_sequences * traj.response_length / seconds, traj.num_forwards


def full_attention_table(lengths: list[int], batches: list[int], caches: list[str]) -> None:
    model = build_tiny_model("llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             max_position_embeddings=4096, seed=0)
    with torch.no_grad():
        model.backbone.lm_head.weight.mul_(20.0)
    prompt = model.tokenizer("Solve the puzzle step by step: 3 1 _ 4 / _ 4 3 _", add_special_tokens=False)["input_ids"]
    print(f"full attention: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, block 32, 2 tokens/step")
    print("| length | batch | cache | forwards | tokens/s | speed-up vs none | tokens equal to exact |")
    print("|---|---|---|---|---|---|---|")
    for L in lengths:
        for batch in batches:
            prompts = [prompt] * batch
            results = {}
            for name in ["none"] + [c for c in caches if c != "none"]:  # the exact decoder first: the reference
                cfg = RolloutConfig(max_completion_length=L, steps=L // 2, block_length=32, temperature=0.0,
                                    **cache_settings(name))
                start = time.perf_counter()
                traj = generate(model, prompts, cfg)
                seconds = time.perf_counter() - start
                results[name] = (traj, batch * L / seconds)
            exact_tps = results["none"][1]
            for mode, (traj, tps) in results.items():
                agree = (traj.response_ids == results["none"][0].response_ids).float().mean().item()
                print(f"| {L} | {batch} | {mode} | {traj.num_forwards} | {tps:,.0f} | {tps / exact_tps:.2f}x | "
                      f"{100 * agree:.1f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", choices=["block", "full", "both"], default="both")
    parser.add_argument("--full-lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--full-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--full-caches", nargs="+", default=["none", "prefix", "dual", "dual:h8"],
                        help="cache names (tracerl.rollout.caching.cache_settings): mode[:hH][:rR]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table in ("full", "both"):
        full_attention_table(args.full_lengths, args.full_batches, args.full_caches)
        if args.table == "full":
            return
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
