"""Published-family shapes at full size on a GPU: LLaDA-8B and SDAR/TraDo-8B rollouts with random weights.

    python benchmarks/gpu_families.py           # one CUDA GPU, bf16; under 2 minutes on an H100
    python benchmarks/gpu_families.py --tiny    # CPU dry run with toy dimensions (checks the script itself)
    python benchmarks/gpu_families.py --families llada --caches none prefix dual dual:h128 elastic elastic:g0.99 --length 1024
                                                # LLaDA with each approximate cache (rollout.cache), static and dynamic

The models are built from published-style config.json dicts through the family modules' own config mapping
(tracerl.models.llada / sdar), randomly initialised in bf16 directly on the GPU (no checkpoint is read or
written, no CPU copy of 8B parameters), and sampled with tracerl.rollout.generate:
  static   low-confidence remasking, one token per step (steps = response length)
  dynamic  Fast-dLLM threshold 0.9: every position whose confidence exceeds it, at least one per step
The lm_head is scaled up (x40) so the random model's distributions are as peaked as a trained model's; otherwise
no position ever clears the threshold and the dynamic policy degenerates to the static one. Reported per run:
committed tokens/s, model forwards, peak GPU memory (torch.cuda.max_memory_allocated) and the GPU's name.
`--caches` runs full-attention families (LLaDA) once per cache name (tracerl.rollout.caching.cache_settings:
none | prefix | dual, with :hH for cache_horizon and :rR for cache_refresh; elastic, with :wW for cache_window and
:gG for cache_gamma); block diffusion keeps its exact KV cache.
Random weights say nothing about a cache's fidelity (benchmarks/cache_fidelity.py measures that on a trained model):
these rows are speed and memory only.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from tracerl.models import llada, sdar
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.caching import cache_settings

# Published config.json keys (LLaDA-8B-Instruct; SDAR-8B-Chat / TraDo-8B = Qwen3-8B dimensions).
LLADA_8B = {
    "model_type": "llada", "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
    "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464, "max_sequence_length": 4096,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False, "block_type": "llama", "rope": True,
    "activation_type": "silu", "layer_norm_type": "rms", "mask_token_id": 126336, "eos_token_id": 126081,
    "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
}
SDAR_8B = {
    "model_type": "sdar", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "block_size": 4, "mask_token_id": 151669, "eos_token_id": 151645,
}
TINY = {
    "llada": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 128,
              "vocab_size": 1024, "embedding_size": 1024, "mask_token_id": 1000, "eos_token_id": 1001},
    "sdar": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "vocab_size": 1024, "mask_token_id": 1000,
             "eos_token_id": 1001},
}


def build(family: str, published: dict, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    """A randomly initialised DiffusionLM of the family's published shape, created on `device` in `dtype`."""
    if family == "llada":
        config, cls = llada.backbone_config(published), LlamaForCausalLM
        spec = FamilySpec("llada", published["mask_token_id"])
    else:
        config, cls = sdar.backbone_config(published), Qwen3ForCausalLM
        spec = FamilySpec("sdar", published["mask_token_id"], block_size=published["block_size"])
    with torch.device(device):  # parameters are allocated (and initialised) on the GPU, never on the host
        backbone = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        backbone.lm_head.weight.mul_(40.0)  # peaked distributions, see the module docstring
    return DiffusionLM(backbone.eval(), None, spec)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: timings must include the queued kernels


def rollout(model: DiffusionLM, prompts: list[list[int]], cfg: RolloutConfig, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    traj = generate(model, prompts, cfg)
    sync(device)
    seconds = time.perf_counter() - start
    committed = int(traj.action_mask.sum())  # EOS padding after an early EOS is not counted as generated
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens": committed, "seconds": seconds, "tps": committed / seconds, "forwards": traj.num_forwards,
            "peak_gib": peak}


def check_attention(model: DiffusionLM, prompts: list[list[int]], device: torch.device) -> str:
    """One-line sanity check of the attention policy at full size (bf16 tolerance)."""
    ids = torch.tensor(prompts[:1], device=device)[:, :16]
    with torch.no_grad():
        full = model.logits(ids).float()
        if model.block_size is None:
            changed = ids.clone()
            changed[0, -1] = (changed[0, -1] + 1) % model.mask_token_id
            moved = (model.logits(changed).float()[0, 0] - full[0, 0]).abs().max().item()
            return f"bidirectional: last token moves position 0 by {moved:.3g}"
        ones = torch.ones_like(ids)
        _, cache = model.logits_cached(ids[:, :8], ones[:, :8], None, keep_in_cache=8)
        block, _ = model.logits_cached(ids[:, 8:12], ones[:, :12], cache, keep_in_cache=0)
        diff = (block.float() - full[:, 8:12]).abs().max().item()
        return f"KV-cached block vs uncached: max |diff| {diff:.3g} (logit scale {full.abs().max().item():.3g})"


def run_family(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[str]:
    published = {**(LLADA_8B if family == "llada" else SDAR_8B), **(TINY[family] if args.tiny else {})}
    start = time.perf_counter()
    model = build(family, published, device, dtype)
    sync(device)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n{family}: {params:.2f}B parameters, {dtype}, built in {time.perf_counter() - start:.1f}s "
          f"({type(model.backbone).__name__})", flush=True)
    gen = torch.Generator().manual_seed(0)
    # ordinary token ids, below the special ids (mask, EOS) that sit at the top of every vocabulary here
    prompts = torch.randint(10, 1000, (args.batch, args.prompt), generator=gen).tolist()
    print("  " + check_attention(model, prompts, device), flush=True)
    block = None if model.block_size else 32 if not args.tiny else 8
    base = dict(max_completion_length=args.length, steps=args.length, block_length=block, temperature=1.0, seed=0)
    rollout(model, prompts, RolloutConfig(**{**base, "max_completion_length": 8, "steps": 8,
                                             "block_length": None if block is None else 8}), device)  # warm-up
    rows = []
    caches = ["none"] if model.block_size else args.caches  # block diffusion: its own exact KV cache
    for cache in caches:
        settings = cache_settings(cache)
        for name, threshold in (("static", None), ("dynamic 0.9", 0.9)):
            r = rollout(model, prompts, RolloutConfig(**base, threshold=threshold, **settings), device)
            rows.append(f"| {family} | {name} | {cache} | {args.batch} x {args.length} | {r['tokens']} | "
                        f"{r['forwards']} | {r['seconds']:.1f} | {r['tps']:,.0f} | {r['peak_gib']:.1f} |")
            print("  " + rows[-1], flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with toy dimensions")
    parser.add_argument("--families", nargs="+", default=["llada", "sdar"], choices=["llada", "sdar"])
    parser.add_argument("--batch", type=int, default=None, help="rollouts per run (default 8 GPU, 2 tiny)")
    parser.add_argument("--length", type=int, default=None, help="response tokens (default 256 GPU, 32 tiny)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--caches", nargs="+", default=["none"],
                        help="full attention: rollout.cache names to run, e.g. none prefix dual dual:h128")
    args = parser.parse_args(argv)
    for cache in args.caches:
        try:
            cache_settings(cache)
        except ValueError as err:
            parser.error(str(err))
    args.batch = args.batch or (2 if args.tiny else 8)
    args.length = args.length or (32 if args.tiny else 256)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.prompt = min(args.prompt, 16)
        print("device: CPU (--tiny dry run)")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for a CPU dry run")
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    rows = [row for family in args.families for row in run_family(family, args, device, dtype)]
    print("\n| family | policy | cache | batch x length | committed tokens | forwards | seconds | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
