"""Checkpoints: weights (or LoRA adapter) in Hugging Face layout, optimizer, scheduler, value model, RNG states, data
position and step, so `resume_from_checkpoint` continues exactly where the run stopped.

    output_dir/checkpoint-<step>/
        model/                 load_model()-able directory; with LoRA the peft adapter (adapter_config.json +
                               adapter_model.safetensors, a value adapter under value/) for `load_lora` / export
        training_state.pt      scheduler and RNG states; single process also: optimizer, value model + optimizer
        trainer_state.json     step, prompt-sampler position, world size
      under DeepSpeed also:
        deepspeed/policy/      engine.save_checkpoint: every rank's optimizer / parameter partitions (ZeRO)
        deepspeed/value/       the value model's engine (full-copy value model only; a LoRA value adapter shares
                               the policy's engine)
        rng_state_<rank>.pt    each rank's RNG states
A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a half-written
checkpoint that `latest` would pick. A DeepSpeed checkpoint resumes under DeepSpeed with the same world size (the
weights come from the engine checkpoint; model/ is the exported copy).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from tracerl.errors import UserError
from tracerl.peft_utils import ADAPTER_CONFIG, is_lora, load_adapter_weights, save_lora


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """TraceRL checkpoints in output_dir, oldest step first: directories named exactly checkpoint-<step> that hold
    a trainer_state.json. A folder of the user's (checkpoint-best-500, checkpoint-2024-06-30, one without the
    state file) is never counted, so never moved, resumed or pruned."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def save_checkpoint(trainer: Any) -> Path:
    """Collective under DeepSpeed: every rank calls it (engine shards, gathered weights); rank 0 writes the rest.

    `trainer` provides: step, config, backend, state_dict(), engines(), and the policy for save_weights."""
    tr, backend = trainer.config.trainer, trainer.backend
    final = Path(tr.output_dir) / f"checkpoint-{trainer.step}"
    tmp = final.with_name(final.name + ".tmp")
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()  # the directory exists before any rank writes into it
    save_weights(trainer, tmp / "model")
    if backend.engine_checkpoints:
        for name, engine in trainer.engines().items():
            engine.save(tmp / "deepspeed", name)
        torch.save(rng_state(), tmp / f"rng_state_{backend.rank}.pt")
    if backend.is_main:
        state = trainer.state_dict()
        torch.save(state, tmp / "training_state.pt")
        meta = {"step": state["step"], "sampler": state["sampler"], "world_size": backend.world_size,
                "deepspeed": backend.engine_checkpoints, "zero_stage": getattr(backend, "stage", None)}  # for people and for `latest`; the state is in the .pt
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    backend.barrier()  # every shard is written before the rename makes the checkpoint visible
    if backend.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(Path(tr.output_dir), tr.save_total_limit, final)
    backend.barrier()
    return final


def save_weights(trainer: Any, path: Path) -> None:
    """The policy in Hugging Face layout (or its LoRA adapter) on rank 0. Under ZeRO-3 the parameters to write
    (all of them, or only the adapters') are gathered on every rank first; that is collective."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad] if is_lora(model) else list(model.parameters())
    with trainer.backend.gathered(params):
        if trainer.backend.is_main:
            save_lora(model, path) if is_lora(model) else model.save_pretrained(path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(root: Path, limit: int | None, written: Path) -> None:
    """Keep the newest `limit` checkpoints, always counting the one just written among them."""
    if limit:
        others = [p for p in checkpoint_dirs(root) if p != written]
        for old in others[:max(0, len(others) - (limit - 1))]:
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
    output_dir = Path(trainer.config.trainer.output_dir)
    # the checkpoint's own name unresolved: a checkpoint-N that is a symlink (to scratch storage) still lies here
    trainer.resumed_elsewhere = path.absolute().parent.resolve() != output_dir.resolve()
    max_steps = trainer.config.trainer.max_steps
    if trainer.step > max_steps:
        raise UserError(f"trainer.resume_from_checkpoint: {path} is at step {trainer.step}, past "
                        f"trainer.max_steps={max_steps}; raise max_steps to train on from it")
    if trainer.step == max_steps:  # a finished job run again: nothing to train, and nothing is rewritten
        return
    if trainer.resumed_elsewhere:  # output_dir holds another run: its checkpoints are set aside, not pruned
        _set_aside(trainer, checkpoint_dirs(output_dir),
                   f"resumed from {path}, outside trainer.output_dir: {{n}} checkpoints of another run in "
                   f"{output_dir} moved to {{aside}}/")
    else:
        _set_aside(trainer, [p for p in checkpoint_dirs(output_dir) if checkpoint_step(p) > trainer.step],
                   f"resumed from step {trainer.step}: {{n}} later checkpoints of the abandoned branch moved to "
                   "{aside}/ (they would be overwritten one by one and outrank this run's in save_total_limit)")


def already_finished(trainer: Any) -> bool:
    """Resumed at trainer.max_steps (`latest` of a finished job): there is nothing to train; say so."""
    if trainer.step < trainer.config.trainer.max_steps:
        return False
    if trainer.backend.is_main:
        print(f"[checkpoints] nothing to train: the run in {trainer.config.trainer.output_dir} is already at "
              f"trainer.max_steps={trainer.config.trainer.max_steps} (raise it to train on); nothing was changed",
              flush=True)
    return True


def _read(path: Path, what: str, read: Any) -> Any:
    """A checkpoint file, or a UserError naming it (damaged, cut short by a full disk, or missing)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise UserError(f"trainer.resume_from_checkpoint: {path} is missing; the checkpoint is incomplete "
                        "(resume from another)") from None
    except Exception as exc:  # noqa: BLE001 - JSON / pickle / zip errors of a damaged file
        raise UserError(f"trainer.resume_from_checkpoint: {path} cannot be read as {what} ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); the checkpoint is damaged (resume from another)") from None


def load_checkpoint(trainer: Any, path: Path) -> None:
    meta = _read(path / "trainer_state.json", "JSON", lambda p: json.loads(p.read_text()))
    if not isinstance(meta, dict) or "step" not in meta:
        raise UserError(f"trainer.resume_from_checkpoint: {path / 'trainer_state.json'} is not a TraceRL "
                        "checkpoint's state (no step)")
    if not (path / "model").is_dir():
        raise UserError(f"trainer.resume_from_checkpoint: {path} has no model/ directory; the checkpoint is "
                        "incomplete (resume from another)")
    backend = trainer.backend
    written_by_ds = bool(meta.get("deepspeed", False))
    if written_by_ds != backend.engine_checkpoints:
        how = "under DeepSpeed" if written_by_ds else "without DeepSpeed"
        raise UserError(f"{path} was written {how}; resume it the same way (its model/ directory can start a new "
                        "run as model.path)")
    if written_by_ds:
        if int(meta.get("world_size", 1)) != backend.world_size:
            raise UserError(f"{path} was written by {meta.get('world_size')} ranks; resume it with the same number "
                            f"(this run has {backend.world_size})")
        stage, ours = meta.get("zero_stage"), getattr(backend, "stage", None)
        # stages 1 and 2 share one optimizer and its shard files; stage 3 partitions the parameters as well
        if stage is not None and ours is not None and (int(stage) == 3) != (int(ours) == 3):
            raise UserError(f"{path} was written under ZeRO stage {stage}, and this run's distributed.deepspeed config "
                            f"is stage {ours}: DeepSpeed cannot load stage 3's shards into stage 1/2 or back. "
                            "Resume with the same config (its model/ directory can start a new run as model.path)")
        engines = trainer.engines()
        if "value" in engines and not (path / "deepspeed/value").is_dir():
            raise UserError(f"{path}: the checkpoint has no value model but algorithm.use_value_model is on")
        for name, engine in engines.items():
            engine.load(path / "deepspeed", name)
        set_rng_state(_read(path / f"rng_state_{backend.rank}.pt", "a torch file",
                            lambda p: torch.load(p, map_location="cpu", weights_only=False)))
    else:
        try:
            _load_weights(trainer.model, path / "model")
        except RuntimeError as exc:  # another model's checkpoint: shapes or names differ
            raise UserError(f"trainer.resume_from_checkpoint: {path} does not fit this run's model "
                            f"({str(exc).strip().splitlines()[-1].strip()}); resume with the model.path and peft "
                            "settings of the run that wrote it") from None
    state = _read(path / "training_state.pt", "a torch file",
                  lambda p: torch.load(p, map_location="cpu", weights_only=False))
    if not isinstance(state, dict):
        raise UserError(f"trainer.resume_from_checkpoint: {path / 'training_state.pt'} is not a training state")
    state.setdefault("step", meta["step"])  # checkpoints before the state held them
    state.setdefault("sampler", meta["sampler"])
    if "critic" not in state and "value_model" in state:
        state["critic"] = {"model": state["value_model"], "optimizer": state["value_optimizer"]}
    try:
        trainer.load_state_dict(state)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def set_aside_previous_run(trainer: Any) -> None:
    """A fresh run (nothing resumed) in an output_dir that holds another run's checkpoints moves them to
    checkpoints.prev-N/ first, as metrics.jsonl moves to metrics.prev-N.jsonl: left in place they would be
    overwritten step by step, outlive this run beside its own, be what `latest` resumes, and make save_total_limit
    prune this run's checkpoints instead of theirs. Nothing is deleted. Collective under DeepSpeed."""
    if trainer.step == 0:
        _set_aside(trainer, checkpoint_dirs(trainer.config.trainer.output_dir),
                   "a new run: {n} checkpoints of an earlier run moved to {aside}/ (resume a run with "
                   "trainer.resume_from_checkpoint: latest)")


def _set_aside(trainer: Any, found: list[Path], message: str) -> None:
    """Move `found` (checkpoints in output_dir) into a fresh checkpoints.prev-N/; nothing is deleted. Collective."""
    backend = trainer.backend
    if found and backend.is_main:
        root = Path(trainer.config.trainer.output_dir)
        n = 1
        while (aside := root / f"checkpoints.prev-{n}").exists():
            n += 1
        aside.mkdir()
        for directory in found:
            directory.rename(aside / directory.name)
        print(f"[checkpoints] {message.format(n=len(found), aside=aside.name)}", flush=True)
    backend.barrier()


def _load_weights(model: Any, directory: Path) -> None:
    """Single process: the checkpoint's policy weights (or LoRA adapter) into the live model."""
    from tracerl.models import load_model

    if (directory / ADAPTER_CONFIG).is_file():
        load_adapter_weights(model, directory)
    else:
        saved = load_model(str(directory), dtype=model.dtype, device=str(model.device))
        model.backbone.load_state_dict(saved.backbone.state_dict())
