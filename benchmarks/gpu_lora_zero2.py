"""One TraceRL step of a LLaDA-1B-shaped model with LoRA under DeepSpeed ZeRO-2, on one GPU, in bf16.

    deepspeed --num_gpus 1 benchmarks/gpu_lora_zero2.py            # one CUDA GPU; a couple of minutes on an H100
    python benchmarks/gpu_lora_zero2.py --tiny                      # CPU dry run with toy dimensions (fp32)

The model is transformers' LlamaForCausalLM with LLaDA-1B-like dimensions (hidden 2048, 16 layers, 16 heads,
MLP 5632, vocabulary 32000), randomly initialised in bf16 directly on the GPU, made a full-attention diffusion LM
by its FamilySpec, wrapped with LoRA (r 16, all linear layers but the LM head) and trained by RLTrainer through
make_backend(recipes/deepspeed/zero2.json). The prompts are random characters and the reward is the share of
distinct characters: the numbers measure the machinery, not learning. The first step is a warm-up (CUDA context,
allocator, kernels); every step prints its wall time, rollout and training time, rollout tokens/s and the peak
GPU memory (torch.cuda.max_memory_allocated) of that step.
"""

from __future__ import annotations

import argparse
import random
import string
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tracerl.config import DistributedConfig, OptimizerConfig, PeftSection, RLConfig, TrainerConfig
from tracerl.distributed import make_backend
from tracerl.models import build_char_tokenizer
from tracerl.models.base import DiffusionLM, FamilySpec
from tracerl.peft_utils import apply_lora
from tracerl.rollout import RolloutConfig
from tracerl.trainer import RLTrainer

ZERO2 = Path(__file__).resolve().parents[1] / "recipes" / "deepspeed" / "zero2.json"
LLADA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0)


def distinct_chars(prompts, completions, **kwargs):
    return [len(set(c)) / max(len(c), 1) for c in completions]


def build(dims: dict, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    tok = build_char_tokenizer()  # ids 0..101; the larger vocabulary's other ids decode to nothing
    config = LlamaConfig(**dims, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):  # parameters are allocated (and initialised) on the device, never on the host
        backbone = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return DiffusionLM(backbone.eval(), tok, FamilySpec("llada_1b_random", mask_token_id=tok.mask_token_id))


def recipe(args: argparse.Namespace) -> RLConfig:
    return RLConfig(
        rollout=RolloutConfig(max_completion_length=args.length, steps=args.length // 2, block_length=args.block,
                              temperature=1.0),
        optimizer=OptimizerConfig(learning_rate=1e-5),
        trainer=TrainerConfig(max_steps=args.steps, num_generations=args.generations,
                              per_device_train_batch_size=args.batch, replay_batch_size=args.replay_batch,
                              output_dir=str(args.output_dir), logging_steps=1),
        peft=PeftSection(r=16, lora_alpha=32),
        distributed=DistributedConfig(deepspeed=str(ZERO2)),
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with toy dimensions")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the launcher
    parser.add_argument("--steps", type=int, default=3, help="RL steps (the first is a warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="completions per step (default 16 GPU, 4 tiny)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--length", type=int, default=None, help="response tokens (default 128 GPU, 16 tiny)")
    parser.add_argument("--block", type=int, default=None, help="semi-AR block length (default 32 GPU, 8 tiny)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt characters")
    parser.add_argument("--replay-batch", type=int, default=64, help="training rows per forward (memory knob)")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/tracerl_gpu_lora_zero2"))
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.tiny else 16)
    args.length = args.length or (16 if args.tiny else 128)
    args.block = args.block or (8 if args.tiny else 32)
    return args


def main() -> None:
    args = parse()
    cfg = recipe(args)
    backend = make_backend(cfg.distributed, args.local_rank)  # first: it picks this rank's GPU
    device = backend.device
    gpu = device.type == "cuda"
    if not gpu and not args.tiny:
        raise SystemExit("no GPU: run with --tiny for the CPU dry run")
    if not gpu:
        torch.set_num_threads(1)  # a shared CPU: oversubscribed threads spin instead of working
    dtype = torch.bfloat16 if gpu else torch.float32
    start = time.perf_counter()
    model = apply_lora(build(TINY if args.tiny else LLADA_1B, device, dtype), cfg.peft)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choices(string.ascii_lowercase, k=args.prompt))} for _ in range(64)]
    trainer = RLTrainer(cfg, model, distinct_chars, rows, backend=backend)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"{name}: {total:.2f}B parameters ({trainable:.1f}M LoRA), {dtype}, ZeRO-2, world {backend.world_size}, "
          f"set up in {time.perf_counter() - start:.1f}s; {args.batch} completions x {args.length} tokens, "
          f"{cfg.rollout.steps} denoising steps, prompt {args.prompt} chars", flush=True)
    for step in range(args.steps):
        if gpu:
            torch.cuda.synchronize(device)  # a CPU-GPU sync point: timings include the queued kernels
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        m = trainer.train_step()
        if gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
        print(f"step {step + 1}{' (warm-up)' if step == 0 else ''}: {seconds:.2f}s  rollout "
              f"{m['perf/rollout_seconds']:.2f}s ({m['perf/rollout_tokens_per_second']:,.0f} tokens/s)  train "
              f"{m['perf/train_seconds']:.2f}s ({m['trajectory/replay_forwards_per_response']:.0f} replay rows per "
              f"completion)  peak {peak:.1f} GiB  loss {m['loss']:.3g}  grad_norm {m['grad_norm']:.3g}", flush=True)


if __name__ == "__main__":
    main()
