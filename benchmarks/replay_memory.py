"""Memory of packed block-diffusion replay: what the rows hold, and the peak of one packed forward.

    python benchmarks/replay_memory.py [--lengths 1024 4096] [--rows 16] [--threads 2]

A synthetic trajectory (prompt 37 tokens, block 4, one token per step, so 4 replay rounds per response) of `--rows`
responses is turned into packed replay rows, and one row goes through a small block-diffusion model (Qwen3, hidden
64, 2 layers, 4 heads). Each length runs in a fresh process so the peak resident memory (ru_maxrss) is its own.
The rows carry per-token block ids instead of a [T, T] visibility mask each; the column "per-row masks" is what
such masks would have taken (rows x T^2 bytes), for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

PROMPT, BLOCK = 37, 4


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_trajectory(rows: int, length: int, vocab: int, mask_id: int):
    from tracerl.rollout import Trajectory

    gen = torch.Generator().manual_seed(0)
    offset = PROMPT % BLOCK
    j = torch.arange(length)
    block = (j + offset) // BLOCK
    # one token per step inside each block, blocks one after another: step = rank of j in a random order per block
    order = torch.rand(rows, length, generator=gen)
    steps = torch.zeros(rows, length, dtype=torch.long)
    for b in range(int(block.max()) + 1):
        cols = (block == b).nonzero().flatten()
        ranks = order[:, cols].argsort(1).argsort(1)
        steps[:, cols] = b * BLOCK + ranks
    return Trajectory(
        prompt_ids=torch.randint(10, vocab, (rows, PROMPT), generator=gen), prompt_mask=torch.ones(rows, PROMPT,
                                                                                                   dtype=torch.bool),
        response_ids=torch.randint(10, vocab, (rows, length), generator=gen), unmask_step=steps,
        action_mask=torch.ones(rows, length, dtype=torch.bool), behaviour_logprob=torch.zeros(rows, length),
        block_offset=torch.full((rows,), offset), group_id=torch.arange(rows), num_forwards=0,
        mask_token_id=mask_id, pad_token_id=1, eos_token_id=1, block_size=BLOCK, block_length=BLOCK, temperature=1.0)


def measure(length: int, rows: int, threads: int) -> dict[str, float]:
    from tracerl.models import build_tiny_model
    from tracerl.replay import build_replay, token_logprobs

    torch.set_num_threads(threads)
    model = build_tiny_model("qwen3", block_size=BLOCK, max_position_embeddings=2 * length + 64, seed=0)
    traj = synthetic_trajectory(rows, length, model.config.vocab_size, model.mask_token_id)
    replay = build_replay(traj, traj.unmask_step, "trace")
    held = sum(t.numel() * t.element_size() for t in vars(replay).values() if isinstance(t, torch.Tensor))
    before = rss_mib()
    one = replay.slice(slice(0, 1))
    with torch.no_grad():
        token_logprobs(model, one, one.targets(traj), 1.0)
    T = replay.input_ids.shape[1]
    return {"length": length, "T": T, "replay_rows": replay.num_rows, "held_mib": held / 2**20,
            "per_row_masks_mib": replay.num_rows * T * T / 2**20, "forward_peak_mib": rss_mib() - before,
            "rss_peak_mib": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one length, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.rows, args.threads)))
        return
    print("| response tokens | packed row width T | replay rows | rows hold (MiB) | per-row [T, T] masks would hold "
          "(MiB) | peak of one packed forward (MiB) | process peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--one", str(length), "--rows", str(args.rows),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['length']:,} | {r['T']:,} | {r['replay_rows']} | {r['held_mib']:.1f} | "
              f"{r['per_row_masks_mib']:,.0f} | {r['forward_peak_mib']:,.0f} | {r['rss_peak_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
