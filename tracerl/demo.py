"""The README's main job (`make demo`): a tiny diffusion LM learns two-digit addition by masked-diffusion SFT on
this CPU, then `tracerl generate` denoises answers and shows the order it unmasked them in.

Runs in about a minute on 2 cores; everything it writes goes under outputs/demo/.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from tracerl.config import OptimizerConfig, SFTConfig, SFTSection, TrainerConfig
from tracerl.models import build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.sft import train_sft


def addition_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def accuracy(model, rows) -> float:
    ids = [model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    traj = generate(model, ids, RolloutConfig(max_completion_length=4, steps=4, temperature=0))
    return sum(c == r["completion"] for c, r in zip(completions(traj, model.tokenizer), rows)) / len(rows)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = Path("outputs/demo")
    train, held_out = addition_rows(3000, seed=0), addition_rows(200, seed=1)
    model = build_tiny_model("llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, seed=0)
    print(f"[demo] tiny LLaDA-style model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"held-out accuracy before training: {accuracy(model, held_out):.1%}", flush=True)
    cfg = SFTConfig(sft=SFTSection(max_completion_length=4), optimizer=OptimizerConfig(learning_rate=2e-3,
                    lr_scheduler_type="cosine", warmup_ratio=0.05),
                    trainer=TrainerConfig(max_steps=2000, per_device_train_batch_size=64, output_dir=str(out / "sft"),
                                          logging_steps=250))
    start = time.perf_counter()
    train_sft(model, train, cfg)
    print(f"[demo] masked-diffusion SFT: {time.perf_counter() - start:.0f} s; held-out accuracy after: "
          f"{accuracy(load_model(str(out / 'sft' / 'final')), held_out):.1%}", flush=True)
    cmd = [sys.executable, "-m", "tracerl", "generate", "--model", str(out / "sft" / "final"), "--prompt", "47+38=",
           "--max-completion-length", "4", "--steps", "4", "--show-trajectory"]
    print("[demo] $ tracerl generate --model outputs/demo/sft/final --prompt '47+38=' --max-completion-length 4 "
          "--steps 4 --show-trajectory", flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
