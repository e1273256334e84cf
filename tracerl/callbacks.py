"""transformers / TRL callbacks on TraceRL's RL loop.

A `transformers.TrainerCallback` passed to `TraceRLTrainer(callbacks=...)` gets the events a transformers Trainer
sends, with the same arguments (args, state, control, model, processing_class, optimizer, lr_scheduler, and
`logs` / `metrics`), so early stopping, custom logging or checkpoint hooks written for TRL work unchanged. One RL
step (rollout, scoring, update) is one `global_step`, as `max_steps` counts them.

What a callback sets in `control` is acted on after the event, as transformers does: `should_training_stop` ends
the run after this step (its final checkpoint is written), `should_save` writes a checkpoint now, `should_evaluate`
runs the held-out eval now (when there is an eval set). Under the deepspeed launcher every rank runs its callbacks,
and a flag set on any rank holds on all of them (the ranks then stop, save or evaluate together).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from tracerl.data_parallel import stop_together
from tracerl.errors import UserError

EVENTS = ("on_init_end", "on_train_begin", "on_step_begin", "on_step_end", "on_evaluate", "on_log", "on_save",
          "on_train_end")
FLAGS = ("should_training_stop", "should_save", "should_evaluate")  # the ones the RL loop acts on


class Callbacks:
    """The callbacks of one run, its TrainerState and TrainerControl.

    context: the keyword arguments every event gets (model, processing_class, optimizer, lr_scheduler)."""

    def __init__(self, callbacks: Sequence[Any] | None, args: Any):
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise UserError(f"callbacks: expected a list of transformers.TrainerCallback, got "
                            f"{type(callbacks).__name__}")
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks or []:
            self.add(cb)
        self.args = args
        self.state = TrainerState()
        self.control = TrainerControl()
        self.context: dict[str, Any] = {}
        # a sum over the data-parallel ranks (the trainer's); the identity on one process
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    def new_run(self) -> None:
        """A fresh TrainerState (keeping which process this is) and TrainerControl: each train() starts with them,
        as in transformers, so a run stopped by a callback and resumed in the same process trains on."""
        self.state = TrainerState(is_world_process_zero=self.state.is_world_process_zero,
                                  is_local_process_zero=self.state.is_local_process_zero)
        self.control = TrainerControl()

    def add(self, callback: Any) -> None:
        """A TrainerCallback instance, or its class (instantiated without arguments, as transformers does)."""
        if isinstance(callback, type):
            if not issubclass(callback, TrainerCallback):
                raise UserError(f"callbacks: {callback.__name__} is not a transformers.TrainerCallback subclass")
            callback = callback()
        if not isinstance(callback, TrainerCallback):
            raise UserError(f"callbacks: expected transformers.TrainerCallback instances or classes, got "
                            f"{type(callback).__name__}")
        self.callbacks.append(callback)

    def pop(self, callback: Any) -> TrainerCallback | None:
        """Remove and return the callback (an instance, or the first of a class); None when absent."""
        for i, cb in enumerate(self.callbacks):
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                return self.callbacks.pop(i)
        return None

    def event(self, name: str, **kwargs: Any) -> TrainerControl:
        """Call `name` on every callback in order; a callback returning a TrainerControl replaces it (transformers'
        CallbackHandler, which also clears the one-shot flags at each step's start). A callback that raises stops
        the run naming it (exit code 2), on every rank at once: every rank calls every event at the same point, so
        the failure is summed over the ranks after each event (the others would otherwise wait in their next
        collective)."""
        if name == "on_step_begin":
            self.control.should_save = self.control.should_evaluate = self.control.should_log = False
        failure: UserError | None = None
        for cb in self.callbacks:
            try:
                result = getattr(cb, name)(self.args, self.state, self.control, **self.context, **kwargs)
            except Exception as exc:  # noqa: BLE001 - user code: reported naming the callback and event
                failure = UserError(f"callback {type(cb).__name__}.{name} at step {self.state.global_step} raised "
                                    f"{type(exc).__name__}: {exc}")
                failure.__cause__ = exc
                break
            if result is not None:
                self.control = result
        stop_together(self.all_reduce, failure, f"callback {name} at step {self.state.global_step}")
        return self.control

    def agree(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make the acted-on flags the same on every rank: set anywhere -> set everywhere (a sum over ranks; the
        identity on one process). Every rank must call this at the same point."""
        flags = torch.tensor([float(getattr(self.control, f)) for f in FLAGS], dtype=torch.float64)
        for f, v in zip(FLAGS, all_reduce(flags).tolist()):
            setattr(self.control, f, v > 0)

    def take(self, flag: str) -> bool:
        """Read a one-shot flag and clear it (should_save / should_evaluate, as transformers resets them)."""
        value = bool(getattr(self.control, flag))
        setattr(self.control, flag, False)
        return value
