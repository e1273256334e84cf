"""The one module that knows about process groups and DeepSpeed. The trainer talks to a backend:

    backend = make_backend(config.distributed, local_rank)      # LocalBackend or DeepSpeedBackend
    trainer = RLTrainer(config, model, reward_fn, rows, backend=backend)

A backend turns modules + parameter groups into a *trainable* (`prepare`): something that runs a training forward
(`run`), accumulates a backward (`backward`), and takes one clipped optimizer step (`step`). LocalBackend does this
with plain torch (AdamW, clip_grad_norm_); DeepSpeedBackend with a DeepSpeed engine per trainable (ZeRO 0-3,
optional CPU offload). The backend also owns the collectives (all-gather of objects, all-reduce of tensors,
barrier), rollout-time parameter gathering under ZeRO-3, and engine checkpoints.

Contract with the trainer: every rank calls the collectives, `run`, `backward` and `step` the same number of
times in the same order (ZeRO reduces gradients and gathers parameters inside them). A loss handed to `backward`
is this rank's share of a globally normalised loss (the shares of all ranks sum to it).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from tracerl.config import DistributedConfig
from tracerl.ds_config import DEFAULT_CONFIG, EngineSpec, fill_config, offloads_optimizer, read_config, zero_stage
from tracerl.errors import UserError

ParamGroups = list[dict[str, Any]]  # torch optimizer parameter groups: {"params": [...], "lr": float}


# ---- single process ---------------------------------------------------------------------------------------------
class LocalTrainable:
    """Modules trained by a plain torch AdamW in this process."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float:
        """Clip (max_grad_norm None / 0 = only measure) and step; returns the pre-clip gradient norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = 0.0
        if params:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))
        self.optimizer.step()
        return norm


class LocalBackend:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1
    engine_checkpoints = False  # optimizer state goes into training_state.pt
    shared_base_in_one_engine = False  # a LoRA value adapter may have its own optimizer on the shared base
    device: torch.device | None = None  # None: leave modules where the caller put them

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, modules: dict[str, nn.Module], groups: ParamGroups, spec: EngineSpec,
                adamw: dict[str, Any]) -> LocalTrainable:
        return LocalTrainable(torch.optim.AdamW(groups, **adamw))

    def prepare_frozen(self, module: nn.Module, spec: EngineSpec) -> nn.Module:
        return module

    def generation(self, trainable: Any) -> ContextManager[None]:
        return nullcontext()

    def gathered(self, params: Sequence[nn.Parameter]) -> ContextManager[None]:
        return nullcontext()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass


# ---- DeepSpeed ----------------------------------------------------------------------------------------------------
class _Runner(nn.Module):
    """The module a DeepSpeed engine wraps: it owns the trained modules and runs any closure as its forward, so
    every training forward goes through `engine.forward`, which arms DeepSpeed's backward hooks (ZeRO's
    reduce-scatter bookkeeping) on whatever the closure returns."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class EngineTrainable:
    """Modules trained by one DeepSpeed engine (ZeRO stage from the JSON config)."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, world_size: int):
        self.engine = engine
        self.optimizer = optimizer  # the client optimizer: its param_groups carry the lr the scheduler sets
        self.world_size = world_size
        self.has_frozen = any(not p.requires_grad for p in engine.module.parameters())

    def run(self, fn: Callable[[], Any]) -> Any:
        return self.engine(fn)

    def zero_grad(self) -> None:
        """Nothing to do: engine.step() clears the gradients, and ZeRO-3 overwrites its partitioned gradient
        buffers on the first backward after a step instead of zeroing them (so that first backward must reach
        every trained parameter; see RLTrainer._epoch)."""

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate; `boundary` marks the last backward before `step` (ZeRO finalises its reduction there).
        DeepSpeed *averages* gradients over ranks while our per-rank losses are shares of one global sum, hence
        the world_size factor: the reduced gradient is then exactly the single-process gradient."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss * self.world_size)

    def step(self, max_grad_norm: float | None) -> float:
        """Clipping is the engine's (`gradient_clipping`, filled from optimizer.max_grad_norm)."""
        norm = None
        if not self.engine.zero_optimization():  # stage 0 keeps full gradients but does not record their norm
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, directory: Path, tag: str) -> None:
        """Collective: every rank writes its optimizer / parameter partitions."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=self.has_frozen)

    def load(self, directory: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=not self.has_frozen,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{directory / tag}: no DeepSpeed checkpoint to resume from")


def _unlink_shm_buffer(dist: Any) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>, 67 MB) and never removes it: every CPU run left 67 MB per rank in RAM-backed /dev/shm. Its
    shm_initialize (inside init_distributed) returns only after opening every rank's file, so once all ranks pass
    a barrier each can unlink its own; the mappings stay valid."""
    port = os.environ.get("MASTER_PORT")
    if port is None:
        return
    dist.barrier()
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{dist.get_rank()}"):
        try:
            path.unlink()
        except OSError:
            pass


class DeepSpeedBackend:
    """The `deepspeed` launcher's processes (or a single process with a DeepSpeed config)."""

    engine_checkpoints = True  # engine.save_checkpoint / load_checkpoint hold optimizer + partitioned state
    shared_base_in_one_engine = True  # two engines must not hook the same (partitioned) modules

    def __init__(self, ds_config: dict[str, Any], local_rank: int | None = None):
        _single_process_env()
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(os.environ.get("TRACERL_DEEPSPEED_LOG_LEVEL", "WARNING"))
        deepspeed.init_distributed()
        self._dist = dist
        local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(local_rank)  # before any model is loaded: "cuda" then means this rank's GPU
        else:
            _unlink_shm_buffer(dist)
        self.device = torch.device(accel.device_name(local_rank))
        self.bf16_capable = accel.device_name() == "cuda" and accel.is_bf16_supported()
        self.config = ds_config
        self.stage = zero_stage(ds_config)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._frozen_engines: list[Any] = []  # keep inference engines (and their ZeRO-3 hooks) alive

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _filled(self, spec: EngineSpec, with_optimizer: bool = True) -> dict[str, Any]:
        return fill_config(self.config, spec, self.world_size, self.bf16_capable, with_optimizer)

    def prepare(self, modules: dict[str, nn.Module], groups: ParamGroups, spec: EngineSpec,
                adamw: dict[str, Any]) -> EngineTrainable:
        import deepspeed

        config = self._filled(spec)
        runner = _Runner(modules)
        optimizer = _make_optimizer(groups, adamw, config)
        engine, *_ = deepspeed.initialize(model=runner, optimizer=optimizer, config=config)
        return EngineTrainable(engine, optimizer, self.world_size)

    def prepare_frozen(self, module: nn.Module, spec: EngineSpec) -> nn.Module:
        """A model that is only evaluated (the full-copy reference policy): partitioned by an optimizer-less
        engine under ZeRO-3; otherwise simply placed on this rank's device in the engines' dtype."""
        import deepspeed

        config = self._filled(spec, with_optimizer=False)
        if self.stage == 3:
            engine, *_ = deepspeed.initialize(model=module, config=config)
            self._frozen_engines.append(engine)
            return module
        module = module.to(self.device)
        return module.to(torch.bfloat16) if config.get("bf16", {}).get("enabled") else module

    def generation(self, trainable: EngineTrainable) -> ContextManager[None]:
        return _zero3_gathered_for_generation(trainable.engine) if self.stage == 3 else nullcontext()

    def gathered(self, params: Sequence[nn.Parameter]) -> ContextManager[None]:
        """Full parameters on every rank inside the block (ZeRO-3); collective."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    # ---- collectives (every rank must call them) ------------------------------------------------------------
    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX, "min": self._dist.ReduceOp.MIN}
        t = value.detach().to(self.device, copy=True)
        self._dist.all_reduce(t, op=ops[op])
        return t.to(value.device)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(value.double()).to(value.dtype) / self.world_size

    def barrier(self) -> None:
        self._dist.barrier()


def _make_optimizer(groups: ParamGroups, adamw: dict[str, Any], config: dict[str, Any]) -> torch.optim.Optimizer:
    """torch AdamW (no fused-kernel compile). With the optimizer offloaded to CPU, DeepSpeedCPUAdam (same AdamW
    math, a vectorised CPU kernel, JIT-compiled once) unless the config sets zero_force_ds_cpu_optimizer=false."""
    if offloads_optimizer(config) and config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **adamw)
    return torch.optim.AdamW(groups, **adamw)


@contextmanager
def _zero3_gathered_for_generation(engine: Any) -> Iterator[None]:
    """Rollouts run a data-dependent number of forwards per rank (dynamic unmasking, different prompts), but every
    ZeRO-3 forward all-gathers parameters collectively, so ranks would deadlock. Gather the full 16-bit
    parameters once and detach ZeRO's module hooks for the rollout (as TRL's unwrap_model_for_generation does);
    re-attach them afterwards. Costs one full copy of the policy per GPU while it lasts."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module, count=[0])


def _single_process_env() -> None:
    """`python -m tracerl ...` with a DeepSpeed config but no launcher: a world of one on a free local port."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


Backend = LocalBackend | DeepSpeedBackend


def make_backend(config: DistributedConfig, local_rank: int | None = None) -> Backend:
    """LocalBackend for one plain process; DeepSpeedBackend when `distributed.deepspeed` names a JSON config or
    the `deepspeed` launcher started several processes (WORLD_SIZE > 1; plain data parallel without a JSON).
    Call it before loading the model, and load onto `backend.device` (this rank's GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed is None and world <= 1:
        return LocalBackend()
    ds_config = read_config(config.deepspeed) if config.deepspeed else dict(DEFAULT_CONFIG)
    return DeepSpeedBackend(ds_config, local_rank)
