"""Approximate caches on a trained model: speed, token agreement with the exact decoder, and task accuracy.

    tracerl tiny outputs/repeat/init --hidden-size 64 --num-layers 4 && tracerl sft recipes/repeat_sft.yaml
    python benchmarks/cache_fidelity.py [--model outputs/repeat/sft/final] [--n 128] [--batch 8]
        [--variants none prefix dual dual:h8 dual:h32 dual:r8 elastic elastic:g0 elastic@0.9]
    tracerl sft recipes/repeat1024_sft.yaml && python benchmarks/cache_fidelity.py --length 1024 --n 64 \\
        --variants none prefix dual dual:h8 dual:h32 dual:h64 dual:h128 dual:r8

Greedy decoding of the first `--n` held-out Repeat prompts (`--length`-character responses, semi-AR blocks of 32,
2 tokens per step) with each variant: a rollout.cache mode, optionally with `:hH` (rollout.cache_horizon H) and
`:rR` (rollout.cache_refresh R) for prefix / dual, `:wW` (rollout.cache_window W) and `:gG` (rollout.cache_gamma G)
for elastic, and optionally `@T`: Fast-dLLM's dynamic threshold T (rollout.threshold) instead of
the fixed 2 tokens per step, i.e. parallel decoding on top of the cache. The first variant is the reference (keep it
`none`, the exact decoder): agreement = the share of response tokens equal to its tokens, accuracy = exact copies
(tracerl.tasks.repeat.solved_reward).

Two agreement columns, because a threshold changes the decoding policy as well as the cost. "tokens equal to exact"
compares with the reference (the fixed schedule): it counts both what the cache approximates and the different order
the threshold commits in. "same schedule" compares with the exact decoder at the variant's own schedule (`none@T`
for `X@T`, `none` for the rest): what the cache alone changes. The exact counterpart a variant needs is run (and
printed) before it when the list lacks it.

Two speed columns. "speed-up" is wall-clock on this machine, where a tiny model's per-call overhead makes a cached
step cost far more than its share of the arithmetic. "compute" is hardware-independent: the reference's positions
run through the network (positions entering each layer, summed over forwards and divided by the layers, so a
cache that recomputes some layers only, like elastic, counts what it runs) over the variant's, the
speed-up a model large enough to be bound by its matrix products approaches (attention over the keys, cached or
not, is a few percent of an 8B model's work at these lengths).
"""

from __future__ import annotations

import argparse
import time

import torch

from tracerl.errors import UserError
from tracerl.models import load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings
from tracerl.rollout.display import completions
from tracerl.tasks import read_rows
from tracerl.tasks.repeat import PROMPT_TEMPLATE, chars_reward, solved_reward


def exact_counterpart(name: str) -> str:
    """The exact decoder at a variant's schedule: 'dual:h8@0.9' -> 'none@0.9', 'dual:h8' -> 'none'."""
    _, at, threshold = name.partition("@")
    return f"none{at}{threshold}"


def with_exact_counterparts(variants: list[str]) -> list[str]:
    """The variants in order, each preceded by its exact counterpart where the list runs none before it."""
    ordered: list[str] = []
    for name in variants:
        counterpart = exact_counterpart(name)
        if counterpart not in ordered and counterpart != name:
            ordered.append(counterpart)
        if name not in ordered:
            ordered.append(name)
    return ordered


def variant_config(name: str, length: int) -> RolloutConfig:
    """'dual:h32:r8' -> the greedy RolloutConfig of that cache (blocks of 32, 2 tokens per step); 'dual:h8@0.9'
    -> the same cache with the dynamic threshold 0.9."""
    cache, _, threshold = name.partition("@")
    try:
        settings = cache_settings(cache)
    except ValueError as err:
        raise SystemExit(f"variant {name!r}: {err}") from None
    try:
        threshold_value = float(threshold) if threshold else None
    except ValueError:
        raise SystemExit(f"variant {name!r}: the threshold after @ must be a number, got {threshold!r}") from None
    cfg = RolloutConfig(max_completion_length=length, steps=length // 2, block_length=32, temperature=0.0,
                        threshold=threshold_value, **settings)
    try:
        cfg.validate()
    except UserError as err:
        raise SystemExit(f"variant {name!r}: {err}") from None
    return cfg


class PositionCounter:
    """Counts the positions every decoder layer runs (rows x positions entering its MLP), over the layers: the
    positions a forward runs through the whole network. Counting per layer is what lets a cache that recomputes
    only some layers (elastic) be measured like the others."""

    def __init__(self, model: torch.nn.Module):
        self.layer_positions = 0
        layers = list(model.decoder().layers)
        self.num_layers = len(layers)
        for layer in layers:
            layer.mlp.register_forward_pre_hook(self.count)

    def count(self, _module: torch.nn.Module, args: tuple) -> None:
        self.layer_positions += args[0].shape[:-1].numel()

    @property
    def positions(self) -> float:
        return self.layer_positions / self.num_layers

    @positions.setter
    def positions(self, value: float) -> None:
        self.layer_positions = value * self.num_layers


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
    if exact_counterpart(args.variants[0]) != args.variants[0]:
        raise SystemExit(f"the first variant is the reference and must be an exact decoder (none or none@T), "
                         f"got {args.variants[0]!r}")
    variants = with_exact_counterparts(args.variants)
    configs = {name: variant_config(name, args.length) for name in variants}
    model = load_model(args.model)
    counter = PositionCounter(model)
    rows = read_rows(args.data)[:args.n]
    gold = [r["solution"] for r in rows]
    if any(len(g) != args.length for g in gold):
        raise SystemExit(f"{args.data}: solutions are not {args.length} characters (pass --length)")
    print(f"{args.model}: {len(rows)} held-out prompts, batch {args.batch}, {args.length} tokens, block 32, "
          "2 tokens/step (@T: threshold T)")
    print("| cache | forwards | tokens/s | speed-up | compute | tokens equal to exact | same schedule | exact copies | "
          "characters right |")
    print("|---|---|---|---|---|---|---|---|---|")
    exact_ids, exact_tps, exact_positions = None, None, None
    outputs: dict[str, torch.Tensor] = {}  # response ids [n, length] of every variant run so far
    for name, cfg in configs.items():
        ids, texts, seconds, forwards = [], [], 0.0, 0
        counter.positions = 0
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
        if exact_ids is None:
            exact_ids, exact_tps, exact_positions = ids, tps, counter.positions
        outputs[name] = ids
        agree = (ids == exact_ids).float().mean().item()
        same_schedule = (ids == outputs[exact_counterpart(name)]).float().mean().item()
        solved = sum(solved_reward(None, texts, gold)) / len(rows)
        chars = sum(chars_reward(None, texts, gold)) / len(rows)
        compute = exact_positions / counter.positions
        print(f"| {name} | {forwards} | {tps:,.0f} | {tps / exact_tps:.2f}x | {compute:.2f}x | {100 * agree:.1f}% | "
              f"{100 * same_schedule:.1f}% | {100 * solved:.1f}% | {100 * chars:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
