"""Shared helpers for the Sudoku / Countdown experiments (scratch code, not part of the package)."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from reward_models import load_reward
from tracerl.config import OptimizerConfig, SFTConfig, SFTSection, TrainerConfig
from tracerl.models import build_tiny_model, load_model
from tracerl.rollout import RolloutConfig, generate
from tracerl.rollout.display import completions
from tracerl.sft import train_sft
from tracerl.tasks import apply_template, sudoku

ROOT = Path(__file__).resolve().parents[1]


def fresh_dir(path: str | Path) -> Path:
    path = Path(path).resolve()
    assert str(path).startswith(str(ROOT / "outputs")) or str(path).startswith("/tmp/"), path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def sudoku_splits(n_train: int, n_test: int, blanks, seed: int = 0, template: str = sudoku.PROMPT_TEMPLATE,
                  test_blanks=None):
    train = sudoku.generate(n_train, blanks, seed)
    test = sudoku.generate(n_test, test_blanks or blanks, seed + 1000, exclude={r["puzzle"] for r in train})
    return apply_template(train, template), apply_template(test, template)


@torch.no_grad()
def evaluate(model, rows, rollout: RolloutConfig, reward_name: str = "sudoku", batch: int = 128) -> dict:
    """Greedy (or whatever `rollout` says) held-out scores: mean reward, full-solve rate, steps, forwards."""
    reward = load_reward(reward_name)
    tok = model.tokenizer
    scores, steps, forwards, texts = [], [], 0, []
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        traj = generate(model, ids, rollout)
        comp = completions(traj, tok)
        cols = {k: [r[k] for r in chunk] for k in chunk[0] if k != "prompt"}
        scores += [float(s) for s in reward([r["prompt"] for r in chunk], comp, **cols)]
        steps += traj.steps_per_sequence().tolist()
        forwards += traj.num_forwards
        texts += comp
    n = len(scores)
    return {"reward": sum(scores) / n, "solve": sum(s == 1.0 for s in scores) / n,
            "steps": sum(steps) / n, "forwards": forwards, "eval_seconds": time.perf_counter() - t0,
            "examples": texts[:3]}


def sft_model(rows, out_dir, *, hidden=128, layers=4, heads=4, kv_heads=2, steps=300, lr=2e-3, batch=64,
              completion_column="solution", max_len=16, seed=0, warmup=0.05, sched="cosine", logging_steps=100):
    model = build_tiny_model("llama", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                             seed=seed, max_position_embeddings=256)
    cfg = SFTConfig(sft=SFTSection(completion_column=completion_column, max_completion_length=max_len),
                    optimizer=OptimizerConfig(learning_rate=lr, lr_scheduler_type=sched, warmup_ratio=warmup),
                    trainer=TrainerConfig(max_steps=steps, per_device_train_batch_size=batch, seed=seed,
                                          output_dir=str(out_dir), logging_steps=logging_steps))
    t0 = time.perf_counter()
    hist = train_sft(model, rows, cfg)
    return model, time.perf_counter() - t0, hist


def dump(obj, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
