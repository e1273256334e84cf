"""One process of the 2-rank DeepSpeed tests (tests/test_distributed.py launches it with the real launcher):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P tests/distributed/worker.py --out DIR --scenarios a,b

Every scenario runs in this one launch (the launcher, imports and process group are paid once) and writes
DIR/<scenario>.rank<r>.json; the test functions read those files. A failing scenario writes its traceback and
exits, which makes the launcher stop the other rank instead of leaving it waiting in a collective.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch

from tracerl.config import AlgorithmConfig, DistributedConfig, OptimizerConfig, PeftSection, RLConfig, TrainerConfig
from tracerl.distributed import make_backend
from tracerl.models import build_tiny_model, load_model
from tracerl.peft_utils import apply_lora
from tracerl.rollout import RolloutConfig, Trajectory
from tracerl.trainer import RLTrainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
# equal-length prompts, so the two ranks' trajectories concatenate into one single-process batch
ROWS = [{"prompt": p} for p in ["abc", "xyz", "the", "foo", "bar", "qux", "dog", "cat"]]


def distinct_chars(prompts, completions, **kwargs):
    return [len(set(c)) / 8 for c in completions]


STEP_REWARD_PROMPTS: set[str] = set()  # filled by a scenario with one rank's prompts


def step_rewards_for_some(prompts, completions, **kwargs):
    """Per-step rewards for the prompts in STEP_REWARD_PROMPTS only, a plain float for the rest."""
    from reward_models.protocol import ProcessReward

    return [ProcessReward(outcome=len(set(c)) / 8, steps=[0.5, -0.25]) if p in STEP_REWARD_PROMPTS
            else len(set(c)) / 8 for p, c in zip(prompts, completions)]


def make_config(ds: str | None, out: Path, block: bool = False, per_device: int = 4, ga: int = 2,
                **sections: dict[str, Any]) -> RLConfig:
    cfg = RLConfig(
        rollout=RolloutConfig(max_completion_length=8, steps=4, block_length=None if block else 4, temperature=1.0),
        algorithm=AlgorithmConfig(),
        optimizer=OptimizerConfig(learning_rate=3e-3),
        trainer=TrainerConfig(max_steps=2, num_generations=4, per_device_train_batch_size=per_device,
                              gradient_accumulation_steps=ga, output_dir=str(out), logging_steps=100),
        distributed=DistributedConfig(deepspeed=ds),
    )
    for name, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, name), k, v)
    return cfg


def tiny(block: bool = False, lora: bool = False):
    model = build_tiny_model("qwen3" if block else "llama", block_size=4 if block else None, seed=0)
    if not lora:
        return model
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are drawn from the global RNG
        torch.manual_seed(0)
        model = apply_lora(model, PeftSection(r=4, lora_alpha=8))
    with torch.no_grad():  # B = 0 at init would make the first step's adapter gradients trivial; nudge it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.01, 0.01, p.numel()).view_as(p))
    return model


def checksum(trainer: RLTrainer) -> str:
    """sha256 of every trained weight (gathered under ZeRO-3): ranks must agree bit for bit."""
    named = dict(trainer.model.named_parameters())
    if trainer.value_model is not None:
        named.update({f"value.{k}": v for k, v in trainer.value_model.named_parameters()})
    with trainer.backend.gathered(list(named.values())):
        h = hashlib.sha256()
        for k in sorted(named):
            h.update(named[k].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def run_with_checksums(trainer: RLTrainer) -> tuple[list[dict[str, float]], list[str]]:
    sums: list[str] = []
    step = trainer.train_step

    def spied() -> dict[str, float]:
        metrics = step()
        sums.append(checksum(trainer))
        return metrics

    trainer.train_step = spied
    return trainer.train(), sums


# ---- gradient equivalence: 2 ranks x half the completions == 1 process x all of them -------------------------
def cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    values = {}
    for f in fields(Trajectory):
        vals = [getattr(t, f.name) for t in parts]
        if not isinstance(vals[0], torch.Tensor):
            values[f.name] = sum(vals) if f.name == "num_forwards" else vals[0]
        else:
            values[f.name] = torch.cat(vals)
    return Trajectory(**values)


def capture_grads(trainable: Any, params: list[torch.nn.Parameter], out: list[torch.Tensor]) -> None:
    """Record the full (reduced) gradient of `params` just before the trainable's optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    step = trainable.step

    def spied(max_grad_norm):
        grads = [safe_get_full_grad(p) if hasattr(trainable, "engine") else p.grad for p in params]
        shapes = [getattr(p, "ds_shape", p.shape) for p in params]  # an unused parameter has no gradient: 0
        out.append(torch.cat([(torch.zeros(s) if g is None else g.detach().float().cpu()).flatten()
                              for g, s in zip(grads, shapes)]))
        return step(max_grad_norm)

    trainable.step = spied


def _trained(trainer: RLTrainer) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(policy parameters, value parameters) in a fixed order."""
    value = list(trainer.value_model.trainable_parameters()) if trainer.value_model is not None else []
    policy = [p for p in trainer.model.parameters() if p.requires_grad and not any(p is q for q in value)]
    return policy, value


def capture_all(trainer: RLTrainer, out: list[torch.Tensor]) -> None:
    policy, value = _trained(trainer)
    if trainer.value is None or trainer.value is trainer.policy:  # one optimizer: one capture of everything
        capture_grads(trainer.policy, policy + value, out)
    else:
        capture_grads(trainer.policy, policy, out)
        capture_grads(trainer.value, value, out)


def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in params])


def equivalence(out: Path, ds: str, lora: bool = False, steps: int = 1, reward: Callable = distinct_chars,
                **sections: dict[str, Any]) -> dict[str, Any]:
    """`steps` updates on 2 ranks (each its own completions) vs the same updates in one process on both ranks'
    completions: reduced gradients (before clipping), weights after the step, metrics."""
    backend = make_backend(DistributedConfig(deepspeed=ds))
    trainer = RLTrainer(make_config(ds, out / "ds", **sections), tiny(lora=lora), reward, ROWS, backend=backend)
    local = None
    if backend.is_main:  # the reference: one process, both ranks' completions
        local = RLTrainer(make_config(None, out / "local", ga=4, **sections), tiny(lora=lora), reward, ROWS)
        init = _flat(_trained(local)[0])
    grads: list[torch.Tensor] = []
    local_grads: list[torch.Tensor] = []
    capture_all(trainer, grads)
    if local is not None:
        capture_grads(local.policy, _trained(local)[0], local_grads)
        if local.value is not None:
            capture_grads(local.value, _trained(local)[1], local_grads)
    rounds = []
    for _ in range(steps):
        seen, local_seen = len(grads), len(local_grads)
        batch = trainer.sample_and_score(trainer._step_indices())
        traj, rewards = batch.traj, batch.rewards
        parts = backend.all_gather_object((traj, rewards))
        metrics = trainer.learn(traj, rewards)
        trained = _trained(trainer)[0]
        with backend.gathered(trained):
            after = _flat(trained)
        if local is None:
            continue
        ref = local.learn(cat_trajectories([t for t, _ in parts]), torch.cat([r for _, r in parts]))
        # this step's captures, policy then value on both sides (one joint capture or two)
        ours, theirs = torch.cat(grads[seen:]), torch.cat(local_grads[local_seen:])
        rounds.append({
            "ranks_prompts": [len(set(t.group_id.tolist())) for t, _ in parts],
            "grad_max_diff": float((ours - theirs).abs().max()),
            "grad_max_abs": float(theirs.abs().max()),
            "param_max_diff": float((after - _flat(_trained(local)[0])).abs().max()),
            "param_moved": float((_flat(_trained(local)[0]) - init).abs().max()),
            "metrics": {k: [metrics[k], ref[k]] for k in ref if k in metrics},
        })
    return {"rounds": rounds}


# ---- scenarios ---------------------------------------------------------------------------------------------
def zero2_equivalence(out: Path) -> dict[str, Any]:
    """ZeRO-2, step-mean aggregation, scale_rewards=batch: global normalisers and the global reward std."""
    return equivalence(out, str(RECIPES / "zero2.json"),
                       algorithm={"loss_aggregation": "step-mean", "scale_rewards": "batch"})


def step_rewards_on_one_rank(out: Path) -> dict[str, Any]:
    """Per-step rewards for rank 0's prompts only, scale_rewards=batch: the process statistics all-reduce, so both
    ranks must take that path (the other with no step rewards), as one process does with all the completions."""
    first_draw = make_trainer_sampler(out).next(4)  # the global order every rank slices
    STEP_REWARD_PROMPTS.update(ROWS[i]["prompt"] for i in first_draw[:2])  # rank 0's two prompts
    return equivalence(out, str(RECIPES / "zero2.json"), reward=step_rewards_for_some,
                       algorithm={"scale_rewards": "batch"})


def fails_on_rank_1(prompts, completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise ValueError("this reward only fails on rank 1")
    return [0.5] * len(completions)


def reward_fails_on_one_rank(out: Path) -> dict[str, Any]:
    """A reward that raises on rank 1 only: both ranks must stop at the same point with a user error."""
    backend = make_backend(DistributedConfig(deepspeed=str(RECIPES / "zero2.json")))
    trainer = RLTrainer(make_config(str(RECIPES / "zero2.json"), out), tiny(), fails_on_rank_1, ROWS,
                        backend=backend)
    try:
        trainer.train_step()
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


SCORED_PROMPTS: list[str] = []  # every prompt the eval reward scored on this rank


def counted_chars(prompts, completions, **kwargs):
    SCORED_PROMPTS.extend(prompts)
    return distinct_chars(prompts, completions)


def eval_fails_on_rank_1(prompts, completions, **kwargs):
    if os.environ.get("RANK") == "1" and kwargs["trainer_state"].global_step == 0:  # eval only, never training
        raise ValueError("this reward only fails on rank 1")
    return distinct_chars(prompts, completions)


def sharded_eval(out: Path) -> dict[str, Any]:
    """Held-out eval under ZeRO-3 (parameters gathered for generation): each rank scores its share of the prompts
    once, and the summary equals one process's; then a reward failing on rank 1 only during eval stops both."""
    ds = str(RECIPES / "zero3.json")
    backend = make_backend(DistributedConfig(deepspeed=ds))
    eval_rows = ROWS[:5]  # uneven: rank 0 takes 3, rank 1 takes 2
    sections = {"eval": {"num_generations": 2, "temperature": 1.0, "success_threshold": 0.9}}
    trainer = RLTrainer(make_config(ds, out / "ds", **sections), tiny(), counted_chars, ROWS, backend=backend,
                        eval_rows=eval_rows)
    result: dict[str, Any] = {"eval": trainer.evaluate_held_out(), "scored": list(SCORED_PROMPTS)}
    if backend.is_main:
        local = RLTrainer(make_config(None, out / "local", **sections), tiny(), counted_chars, ROWS,
                          eval_rows=eval_rows)
        result["local"] = local.evaluate_held_out()
    failing = RLTrainer(make_config(ds, out / "fails", **sections), tiny(), eval_fails_on_rank_1, ROWS,
                        backend=backend, eval_rows=eval_rows)
    try:
        failing.evaluate_held_out()
        result["raised"] = None
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        result["raised"], result["message"] = type(exc).__name__, str(exc)
    return result


def callback_stops_on_one_rank(out: Path) -> dict[str, Any]:
    """A TrainerCallback asks to stop on rank 1 only: both ranks stop after that step and save it together. Then a
    callback raising on rank 0 only: both ranks stop with a user error at that event."""
    from transformers import TrainerCallback

    class StopOnRank1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if os.environ.get("RANK") == "1" and state.global_step == 1:
                control.should_training_stop = True

    ds = str(RECIPES / "zero2.json")
    cfg = make_config(ds, out, trainer={"max_steps": 3, "save_steps": 0})
    trainer = RLTrainer(cfg, tiny(), distinct_chars, ROWS, backend=make_backend(DistributedConfig(deepspeed=ds)),
                        callbacks=[StopOnRank1()])
    history = trainer.train()
    result = {"steps": len(history), "global_step": trainer.callbacks.state.global_step,
              "checkpoints": sorted(p.name for p in out.glob("checkpoint-*"))}

    class LogFailsOnRank0(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                raise RuntimeError("the logging service is down")

    cfg = make_config(ds, out / "raises", trainer={"max_steps": 3, "save_steps": 0})
    trainer = RLTrainer(cfg, tiny(), distinct_chars, ROWS, backend=make_backend(DistributedConfig(deepspeed=ds)),
                        callbacks=[LogFailsOnRank0()])
    try:
        trainer.train()
        result["raised"] = None
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        result["raised"], result["message"] = type(exc).__name__, str(exc)
    return result


def make_trainer_sampler(out: Path) -> Any:
    """The prompt sampler a run of make_config would draw from (local trainer; nothing is launched)."""
    return RLTrainer(make_config(None, out / "probe"), tiny(), distinct_chars, ROWS).sampler


def zero3_equivalence(out: Path) -> dict[str, Any]:
    """ZeRO-3 with a full-copy value model (second engine, globally whitened GAE) and a KL reference (frozen
    ZeRO-3 engine)."""
    return equivalence(out, str(RECIPES / "zero3.json"),
                       algorithm={"use_value_model": True, "beta": 0.05, "loss_aggregation": "sequence-mean"})


def zero2_lora_equivalence(out: Path) -> dict[str, Any]:
    return equivalence(out, str(RECIPES / "zero2.json"), lora=True, steps=2, optimizer={"max_grad_norm": None},
                       algorithm={"use_value_model": True, "beta": 0.05})


def zero3_lora_equivalence(out: Path) -> dict[str, Any]:
    return equivalence(out, str(RECIPES / "zero3.json"), lora=True, steps=2, optimizer={"max_grad_norm": None},
                       algorithm={"use_value_model": True, "beta": 0.05})


def _resume_pair(out: Path, ds: str, steps: int, save_at: int, model_fn: Callable, **sections) -> dict[str, Any]:
    """An uninterrupted `steps`-step run that also saves at `save_at`, and a run resumed from that checkpoint."""
    backend = make_backend(DistributedConfig(deepspeed=ds))
    full_cfg = make_config(ds, out / "full", **sections)
    full_cfg.trainer.max_steps, full_cfg.trainer.save_steps = steps, save_at
    full, sums = run_with_checksums(RLTrainer(full_cfg, model_fn(), distinct_chars, ROWS, backend=backend))
    ckpt = out / "full" / f"checkpoint-{save_at}"
    resumed_cfg = make_config(ds, out / "resumed", **sections)
    resumed_cfg.trainer.max_steps, resumed_cfg.trainer.resume_from_checkpoint = steps, str(ckpt)
    resumed, resumed_sums = run_with_checksums(RLTrainer(resumed_cfg, model_fn(), distinct_chars, ROWS,
                                                         backend=backend))
    saved = None
    if backend.is_main and not (ckpt / "model" / "adapter_config.json").exists():  # the exported HF weights
        h = hashlib.sha256()
        for _, p in sorted(load_model(str(ckpt / "model")).named_parameters()):
            h.update(p.detach().float().numpy().tobytes())
        saved = h.hexdigest()
    return {"full": full, "resumed": resumed, "checksums": sums, "resumed_checksums": resumed_sums,
            "saved_model_checksum": saved,
            "checkpoint_files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())}


def zero3_resume(out: Path) -> dict[str, Any]:
    """ZeRO-3, block diffusion (KV-cached rollouts on gathered parameters): 3 steps == 2 steps + resume."""
    return _resume_pair(out, str(RECIPES / "zero3.json"), 3, 2, lambda: tiny(block=True), block=True)


def zero3_lora(out: Path) -> dict[str, Any]:
    """ZeRO-3 + LoRA policy + LoRA value adapter (one engine) + reference = adapter disabled; resume."""
    return _resume_pair(out, str(RECIPES / "zero3.json"), 2, 1, lambda: tiny(lora=True),
                        algorithm={"use_value_model": True, "beta": 0.05})


def zero2(out: Path) -> dict[str, Any]:
    """ZeRO-2, full fine-tuning, block diffusion, a KL reference (a plain copy on each rank)."""
    backend = make_backend(DistributedConfig(deepspeed=str(RECIPES / "zero2.json")))
    cfg = make_config(str(RECIPES / "zero2.json"), out, block=True, algorithm={"beta": 0.05})
    history, sums = run_with_checksums(RLTrainer(cfg, tiny(block=True), distinct_chars, ROWS, backend=backend))
    return {"full": history, "checksums": sums}


def zero2_lora(out: Path) -> dict[str, Any]:
    backend = make_backend(DistributedConfig(deepspeed=str(RECIPES / "zero2.json")))
    cfg = make_config(str(RECIPES / "zero2.json"), out, algorithm={"use_value_model": True, "beta": 0.05})
    history, sums = run_with_checksums(RLTrainer(cfg, tiny(lora=True), distinct_chars, ROWS, backend=backend))
    return {"full": history, "checksums": sums}


def zero3_offload(out: Path) -> dict[str, Any]:
    """The shipped offload config (params + optimizer on CPU), with torch AdamW instead of DeepSpeedCPUAdam so
    the test compiles nothing."""
    config = json.loads((RECIPES / "zero3_offload.json").read_text())
    config["zero_force_ds_cpu_optimizer"] = False
    for key in ("offload_optimizer", "offload_param"):
        config["zero_optimization"][key]["pin_memory"] = False
    path = out / "zero3_offload.json"
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
    backend = make_backend(DistributedConfig(deepspeed=None))  # the process group, to wait for the file
    backend.barrier()
    backend = make_backend(DistributedConfig(deepspeed=str(path)))
    cfg = make_config(str(path), out, trainer={"max_steps": 1})
    history, sums = run_with_checksums(RLTrainer(cfg, tiny(), distinct_chars, ROWS, backend=backend))
    return {"full": history, "checksums": sums}


def zero3_mini_batches(out: Path) -> dict[str, Any]:
    """ZeRO-3 with two optimizer steps per RL step (steps_per_generation = 2 x accumulation), a value model and
    the KL against the pre-update policy: the ranks must step together and agree bit for bit."""
    backend = make_backend(DistributedConfig(deepspeed=str(RECIPES / "zero3.json")))
    cfg = make_config(str(RECIPES / "zero3.json"), out, per_device=2, ga=1,
                      trainer={"steps_per_generation": 2},
                      algorithm={"use_value_model": True, "beta": 0.05, "kl_against": "old", "num_iterations": 2})
    trainer = RLTrainer(cfg, tiny(), distinct_chars, ROWS, backend=backend)
    history, sums = run_with_checksums(trainer)
    return {"full": history, "checksums": sums, "lr_steps": trainer.scheduler.last_epoch}


def plain_data_parallel(out: Path) -> dict[str, Any]:
    """The launcher without a JSON config: DeepSpeed stage 0 (plain data parallel)."""
    backend = make_backend(DistributedConfig(deepspeed=None))
    cfg = make_config(None, out, algorithm={"use_value_model": True})
    history, sums = run_with_checksums(RLTrainer(cfg, tiny(), distinct_chars, ROWS, backend=backend))
    return {"full": history, "checksums": sums}


SCENARIOS = {f.__name__: f for f in (
    zero2_equivalence, zero3_equivalence, zero2_lora_equivalence, zero3_lora_equivalence,
    zero2, zero2_lora, zero3_resume, zero3_lora, zero3_offload, plain_data_parallel, zero3_mini_batches,
    step_rewards_on_one_rank, reward_fails_on_one_rank, sharded_eval, callback_stops_on_one_rank,
)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    root = Path(args.out)
    for name in args.scenarios.split(","):
        target = root / f"{name}.rank{rank}.json"
        try:
            result = SCENARIOS[name](root / name)
        except Exception:  # noqa: BLE001 - reported to the test, then the launcher stops the other rank
            target.write_text(json.dumps({"error": traceback.format_exc()}))
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        target.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
