"""Checkpoints: weights (or LoRA adapter) in Hugging Face layout, optimizer, scheduler, value model, RNG states, data
position and step, so `resume_from_checkpoint` continues exactly where the run stopped.

    output_dir/checkpoint-<step>/
        model/                 load_model()-able directory
        training_state.pt      optimizer, scheduler, value model + its optimizer, RNG states
        trainer_state.json     step, prompt-sampler position
A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a half-written
checkpoint that `latest` would pick.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from tracerl.errors import UserError


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(trainer: Any) -> Path:
    tr = trainer.config.trainer
    final = Path(tr.output_dir) / f"checkpoint-{trainer.step}"
    if trainer.backend.is_main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.model.save_pretrained(tmp / "model")
        torch.save(_training_state(trainer), tmp / "training_state.pt")
        meta = {"step": trainer.step, "sampler": trainer.sampler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(Path(tr.output_dir), tr.save_total_limit)
    trainer.backend.barrier()
    return final


def _training_state(trainer: Any) -> dict[str, Any]:
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    if trainer.value_model is not None:
        state["value_model"] = trainer.value_model.checkpoint_state()
        state["value_optimizer"] = trainer.value_optimizer.state_dict()
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _prune(root: Path, limit: int | None) -> None:
    if limit:
        for old in checkpoint_dirs(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


def resume_if_asked(trainer: Any) -> None:
    """Load `trainer.resume_from_checkpoint` ("latest" = newest in output_dir) into the trainer."""
    spec = trainer.config.trainer.resume_from_checkpoint
    if not spec:
        return
    if spec == "latest":
        found = checkpoint_dirs(trainer.config.trainer.output_dir)
        if not found:
            return  # nothing to resume: a fresh run (so one command both starts and resumes a job)
        path = found[-1]
    else:
        path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"trainer.resume_from_checkpoint: {str(path)!r} is not a TraceRL checkpoint "
                        "(no trainer_state.json)")
    load_checkpoint(trainer, path)


def load_checkpoint(trainer: Any, path: Path) -> None:
    from tracerl.models import load_model

    saved = load_model(str(path / "model"), dtype=trainer.model.dtype, device=str(trainer.model.device))
    trainer.model.backbone.load_state_dict(saved.backbone.state_dict())
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.value_model is not None:
        if "value_model" not in state:
            raise UserError(f"{path}: the checkpoint has no value model but algorithm.use_value_model is on")
        trainer.value_model.load_checkpoint_state(state["value_model"])
        trainer.value_optimizer.load_state_dict(state["value_optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    meta = json.loads((path / "trainer_state.json").read_text())
    trainer.step = int(meta["step"])
    trainer.sampler.load_state_dict(meta["sampler"])
