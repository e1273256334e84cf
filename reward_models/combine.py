"""RewardSet: several rewards, weighted, run concurrently, validated, with metrics.

total[i] = sum over functions f of weight_f * r_f[i], skipping None (TRL's nansum); a sample where every
function returned None totals NaN ("no reward applies": the trainer leaves it out of its statistics), with
a warning. Each function's values are checked: one per completion (any iterable), each a finite real number or
None (NaN reads as None, as in TRL).
A function that raises, returns the wrong count or a bad value, or
exceeds `timeout_s` produces a RewardError naming the reward (and the sample, when one is at fault):
  on_error="raise"  raise it (default; never a silent wrong reward)
  on_error="zero"   score the affected samples 0, count them in `reward_errors/<name>`, log a warning
When a function raises on the batch, it is re-run one sample at a time to find the failing samples (their
neighbours keep the values of those single-sample calls; list columns are sliced and the trajectory cut to the
sample's row, other keyword arguments passed whole; each call's log_extra values are kept apart and land in the
sample's place). Without a timeout, sync rewards run one after another on the caller's thread (TRL's way: code
that needs the main thread works), the async ones meanwhile each on its own persistent event loop. With
`timeout_s`, sync rewards run each on its own daemon thread, all at once. A timed-out sync reward cannot be
killed: its thread is abandoned, and being a daemon thread it never keeps the process alive at exit; while
`MAX_ABANDONED` of a reward's abandoned calls are still running, the reward is not called again (that call counts
as timed out), so a reward that hangs on every call holds a bounded number of threads. What a reward changes for
the whole process (working directory, default dtype, grad mode, threads, global random generators) is put back
afterwards (ProcessState).

Every call gets private copies of its arguments: prompts, completions and the column values deep-copied, the
trajectory's tensors cloned (callables such as log_metric are passed as they are; a value that cannot be copied is
passed as it is). A reward that edits its arguments in place (`trajectory.response_ids.fill_(5)`,
`meta["n"] += 1` on a dict column) changes nothing the trainer, the dataset or the other rewards see.

TRL's `log_metric` / `log_extra` (reward_models.protocol.RewardLog): the caller's are passed through when it gives
them (the trainer does, and folds what they collect into the step's metrics); otherwise the RewardSet gives each
call its own, and RewardResult.metrics gets each logged metric's mean under its name, RewardResult.extra the
logged columns.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import dataclasses
import inspect
import logging
import math
import numbers
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .loader import check_weight, load_reward, parse_spec
from .protocol import RewardError, RewardLog, split_reward

Process = dict[int, tuple[list | None, list | None]]  # sample index -> (step rewards, token rewards)
# what a reward's call may raise that is the reward's failure: sys.exit() / exit() in a reward is one too (on a
# pool thread it would otherwise reach the trainer as SystemExit and end the run without a word)
_FAILURES = (Exception, SystemExit)
MAX_ABANDONED = 4  # per reward: timed-out calls still running before the reward is skipped (see the docstring)

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    total: torch.Tensor  # [N] float32: weighted sum over functions, None skipped; NaN where all were None
    per_function: torch.Tensor  # [N, F] float32: NaN where a function returned None
    names: list[str]
    weights: list[float]
    metrics: dict[str, float]  # rewards/<name>/mean, rewards/<name>/std, reward_errors/<name>
    errors: list[RewardError] = field(default_factory=list)
    # process rewards (ProcessReward returns), weighted and summed over functions; NaN where none was given
    step_rewards: torch.Tensor | None = None  # [N, S] float32, reward of each sample's own denoising step
    token_rewards: torch.Tensor | None = None  # [N, L] float32, reward of each response position
    extra: dict[str, list] = field(default_factory=dict)  # log_extra columns (when the RewardSet made the log)


@dataclass
class _Outcome:
    values: Any = None  # the batch call's raw return value
    per_sample: dict[int, Any] | None = None  # after a batch failure: index -> single-sample return value
    sample_errors: dict[int, BaseException] = field(default_factory=dict)
    batch_error: BaseException | None = None
    extras: dict[str, list] = field(default_factory=dict)  # what the batch call gave log_extra
    sample_extras: dict[int, dict[str, list]] = field(default_factory=dict)  # ... each single-sample call


def _accepted(fn: Any) -> set[str] | None:
    """Keyword names `fn` takes, or None if it takes **kwargs (TRL's convention)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _private(value: Any, memo: dict) -> Any:
    """A copy of one argument that the reward may edit freely (see the module docstring)."""
    if callable(value):  # log_metric / log_extra, models: deep-copying a bound method would copy its owner
        return value
    try:
        return copy.deepcopy(value, memo)
    except Exception:  # noqa: BLE001 - e.g. a tensor that refuses deepcopy: clone a dataclass's tensors by hand
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out = copy.copy(value)
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                if isinstance(v, torch.Tensor):
                    object.__setattr__(out, f.name, v.detach().clone())
            return out
        return value


def private_copies(kwargs: dict) -> dict:
    """Private copies of a call's keyword arguments (see the module docstring)."""
    memo: dict = {}  # one memo per call: values shared between arguments stay shared in the copies
    return {key: _private(value, memo) for key, value in kwargs.items()}


def _slice(columns: dict, i: int, n: int) -> dict:
    """Sample i's part of the keyword arguments: list columns and completion_ids cut to it, the trajectory to its
    row (so `trajectory.unmask_step[0]` is the sample's own, as `completions[0]` is); the rest passed whole."""
    out = {}
    for key, value in columns.items():
        sliceable = hasattr(value, "__len__") and hasattr(value, "__getitem__") and not isinstance(value, (str, dict))
        if sliceable and len(value) == n:
            value = value[i:i + 1]
        elif callable(getattr(value, "select", None)) and getattr(value, "num_sequences", None) == n:
            value = value.select([i])  # a tracerl.rollout.Trajectory
        out[key] = value
    return out


class ProcessState:
    """What a reward could change for the whole process and the run would then inherit. Saved before the rewards
    run and put back after, so that reward code cannot:
      - move the run's relative paths (output_dir, checkpoints, save_total_limit's pruning): the working directory;
      - change what training computes: torch's default dtype, grad mode (rewards run on the caller's thread when
        there is no timeout), its number of threads;
      - change the run's randomness (dropout, data order): the global torch, CUDA, Python and NumPy generators.
        The rewards draw from a stream of their own instead (RewardStreams), continued from call to call, so a
        reward's random choices differ between batches while training's stream is as if no reward had run.
    Changes other than the generators' are logged as warnings naming the rewards that ran. A reward call abandoned
    after a timeout (RewardSet timeout_s) keeps running on its thread, and what it changes after this restore is
    not undone."""

    def __init__(self) -> None:
        self.cwd = os.getcwd()
        self.dtype = torch.get_default_dtype()
        self.grad = torch.is_grad_enabled()
        self.threads = torch.get_num_threads()
        self.generators = RandomState.capture()

    @classmethod
    def save(cls) -> "ProcessState":
        return cls()

    def restore(self, names: list[str]) -> None:
        changed = []
        try:
            now = os.getcwd()
        except OSError:  # it moved into a directory and deleted it
            now = "<a deleted directory>"
        if now != self.cwd:
            changed.append(f"the working directory to {now} (restored to {self.cwd})")
            os.chdir(self.cwd)
        if torch.get_default_dtype() != self.dtype:
            changed.append(f"torch's default dtype to {torch.get_default_dtype()} (restored to {self.dtype})")
            torch.set_default_dtype(self.dtype)
        if torch.is_grad_enabled() != self.grad:
            changed.append(f"grad mode to {torch.is_grad_enabled()} (restored)")
            torch.set_grad_enabled(self.grad)
        if torch.get_num_threads() != self.threads:
            changed.append(f"torch's threads to {torch.get_num_threads()} (restored to {self.threads})")
            torch.set_num_threads(self.threads)
        self.generators.apply()
        if changed:
            logger.warning("a reward of %s changed %s", ", ".join(repr(name) for name in names), "; ".join(changed))


@dataclass
class RandomState:
    """The global torch (CPU and CUDA), Python and NumPy generators' states."""

    torch_rng: torch.Tensor
    cuda_rng: list | None
    python_rng: Any
    numpy_rng: Any

    @classmethod
    def capture(cls) -> "RandomState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        numpy_random = _numpy_random()
        return cls(torch.get_rng_state(), cuda, random.getstate(),
                   numpy_random.get_state() if numpy_random is not None else None)

    def apply(self) -> None:
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            _numpy_random().set_state(self.numpy_rng)


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


def _to_float(value: Any) -> float | None:
    """None stays None; a real number (bool, int, numpy scalar, 0-d tensor) becomes float; NaN becomes None (TRL
    reads None as NaN and skips both alike with nansum); else TypeError."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) or (hasattr(value, "__float__") and not isinstance(value, (str, bytes))):
        f = float(value)
        return None if math.isnan(f) else f
    raise TypeError(f"returned {type(value).__name__} {value!r}, expected a float or None")


def _as_list(raw: Any) -> Any:
    """A reward's return value as a list when it is any sequence or iterable of values (a tuple, tensor, numpy
    array, generator, map: TRL iterates whatever it gets); a str, bytes, dict or scalar is left as it is, to be
    refused."""
    if isinstance(raw, torch.Tensor) or hasattr(raw, "tolist"):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__iter__"):
        return raw
    return list(raw)


def _default_name(fn: Any) -> str:
    """The metrics name of an unnamed reward: its __name__ (a partial's function's), else its class name."""
    inner = getattr(fn, "func", fn)  # functools.partial has no __name__ of its own
    return getattr(fn, "__name__", None) or getattr(inner, "__name__", None) or type(fn).__name__


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class RewardSet:
    """Weighted rewards from specs (see reward_models.loader for the spec forms).

    >>> rs = RewardSet([{"fn": "format", "weight": 0.5}, "countdown"])
    >>> rs(["p"], ["<think>.</think><answer>3*5+1</answer>"], nums=[[3, 5, 1]], target=[16]).total
    tensor([1.5000])
    """

    def __init__(self, specs: Iterable[Any], on_error: str = "raise", timeout_s: float | None = None,
                 base_dir: str | None = None, locate_errors: bool = True) -> None:
        if callable(specs) or isinstance(specs, (str, dict)):  # a single reward
            specs = [specs]
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.on_error, self.timeout_s, self.locate_errors = on_error, timeout_s, locate_errors
        self.fns: list[Any] = []
        self.names: list[str] = []
        self.weights: list[float] = []
        for item in specs:
            spec = parse_spec(item)
            fn = load_reward(spec.fn, base_dir=base_dir, **spec.kwargs)
            name = spec.name or _default_name(fn)
            base, k = name, 1
            while name in self.names:  # metrics keys must be unique
                k += 1
                name = f"{base}_{k}"
            self.fns.append(fn)
            self.names.append(name)
            self.weights.append(check_weight(name, spec.weight))
        if not self.fns:
            raise ValueError("RewardSet needs at least one reward")
        self._accepts = [_accepted(fn) for fn in self.fns]
        self._async = [_is_async(fn) for fn in self.fns]
        self._abandoned: list[list[threading.Thread]] = [[] for _ in self.fns]  # timed-out sync calls
        # reward index -> (its event loop, the daemon thread running it)
        self._loops: dict[int, tuple[asyncio.AbstractEventLoop, threading.Thread]] = {}
        self._streams: RandomState | None = None  # the rewards' random generators between calls (ProcessState)

    # --- calling one function -----------------------------------------------------------------------
    def _kwargs(self, k: int, prompts: list, completions: list, columns: dict) -> dict:
        # each call gets its own copies: a reward that edits its arguments in place (completions[i] = c.strip(),
        # trajectory.response_ids.fill_(5), meta["n"] += 1) must not change what the other rewards, running at the
        # same time, the trainer and the dataset see
        kwargs = {"prompts": prompts, "completions": completions, **columns}
        accepts = self._accepts[k]
        if accepts is not None:
            kwargs = {key: v for key, v in kwargs.items() if key in accepts}
        return private_copies(kwargs)

    def _single(self, k: int, i: int, prompts: list, completions: list, columns: dict) -> dict:
        return self._kwargs(k, prompts[i:i + 1], completions[i:i + 1], _slice(columns, i, len(completions)))

    @staticmethod
    def _own_extra_log(kwargs: dict) -> RewardLog:
        """The call's log_extra collects into a log of its own, passed on only once the call's outcome is known: a
        batch call that logged and then raised, or a timed-out call logging later, must not leave columns that no
        longer line up with the samples."""
        buffer = RewardLog()
        if "log_extra" in kwargs:
            kwargs["log_extra"] = buffer.log_extra
        return buffer

    def _task_sync(self, k: int, prompts: list, completions: list, columns: dict) -> _Outcome:
        kwargs = self._kwargs(k, prompts, completions, columns)
        buffer = self._own_extra_log(kwargs)
        try:  # a lazy return value (generator, map) is read here: inside the timeout and the error location
            return _Outcome(values=_as_list(self.fns[k](**kwargs)), extras=buffer.extras())
        except _FAILURES as e:  # reported as a RewardError by the caller
            out = _Outcome(batch_error=e, per_sample={})
        if self.locate_errors and len(completions) > 1:
            for i in range(len(completions)):
                kwargs = self._single(k, i, prompts, completions, columns)
                buffer = self._own_extra_log(kwargs)
                try:
                    out.per_sample[i] = _as_list(self.fns[k](**kwargs))
                    out.sample_extras[i] = buffer.extras()
                except _FAILURES as e:
                    out.sample_errors[i] = e
        return out

    async def _task_async(self, k: int, prompts: list, completions: list, columns: dict) -> _Outcome:
        kwargs = self._kwargs(k, prompts, completions, columns)
        buffer = self._own_extra_log(kwargs)
        try:
            return _Outcome(values=_as_list(await self.fns[k](**kwargs)), extras=buffer.extras())
        except _FAILURES as e:
            out = _Outcome(batch_error=e, per_sample={})
        if self.locate_errors and len(completions) > 1:
            for i in range(len(completions)):
                kwargs = self._single(k, i, prompts, completions, columns)
                buffer = self._own_extra_log(kwargs)
                try:
                    out.per_sample[i] = _as_list(await self.fns[k](**kwargs))
                    out.sample_extras[i] = buffer.extras()
                except _FAILURES as e:
                    out.sample_errors[i] = e
        return out

    @staticmethod
    def _pass_on_extras(outcome: Any, log_extra: Any, n: int) -> None:
        """A finished call's log_extra columns to the batch's log; after single-sample re-runs each column gets
        one value per sample, None for a sample whose call failed or logged none."""
        if not isinstance(outcome, _Outcome):  # timed out, or not called
            return
        if outcome.batch_error is None:
            for column, values in outcome.extras.items():
                log_extra(column, values)
            return
        names = dict.fromkeys(c for extras in outcome.sample_extras.values() for c in extras)
        for column in names:
            values = []
            for i in range(n):
                got = outcome.sample_extras.get(i, {}).get(column)
                values.extend(got if got is not None and len(got) == 1 else [None])
            log_extra(column, values)

    def _event_loop(self, k: int) -> asyncio.AbstractEventLoop:
        """Each async reward has its own loop for the RewardSet's lifetime: async clients a reward caches stay
        usable, and one that blocks its loop (a sync sleep or request inside `async def`) delays only itself, so
        the timeout names it rather than every async reward that shared the loop."""
        if k not in self._loops:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"reward-{self.names[k]}-async", daemon=True)
            thread.start()
            self._loops[k] = (loop, thread)
        return self._loops[k][0]

    def _stop_event_loops(self) -> None:
        """Cancel what is still running (timed-out rewards) and let it unwind before closing each loop."""
        loops, self._loops = self._loops, {}

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for loop, _ in loops.values():
            try:
                asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - a reward that ignores cancellation or blocks its loop: stop regardless
                pass
            loop.call_soon_threadsafe(loop.stop)
        for loop, thread in loops.values():
            thread.join(timeout=5)
            if not loop.is_running():
                loop.close()

    def _submit(self, k: int, args: tuple, n: int) -> cf.Future:
        if self._async[k]:
            return asyncio.run_coroutine_threadsafe(self._task_async(k, *args), self._event_loop(k))
        future: cf.Future = cf.Future()
        if self.timeout_s is None:  # as TRL: on the caller's thread, where code that must run on the main thread
            future.set_result(self._task_sync(k, *args))  # (SIGALRM timeouts, Math-Verify's) works
            return future
        self._abandoned[k] = [t for t in self._abandoned[k] if t.is_alive()]
        if len(self._abandoned[k]) >= MAX_ABANDONED:  # bounded: do not start yet another thread that may hang
            future.set_result(RewardError(
                self.names[k], f"not called: {len(self._abandoned[k])} earlier calls that timed out (RewardSet "
                "timeout_s) are still running", batch_size=n))
            return future

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = self._task_sync(k, *args)
            except BaseException as e:  # noqa: BLE001 - whatever escapes _task_sync reaches the waiting caller
                future.set_exception(e)
            else:
                future.set_result(result)

        # a daemon thread, not a ThreadPoolExecutor's: those are joined at interpreter exit, so a reward that never
        # returns would keep the process alive after the run ended
        thread = threading.Thread(target=run, name=f"reward-{self.names[k]}", daemon=True)
        future.thread = thread  # type: ignore[attr-defined]
        thread.start()
        return future

    def _wait(self, k: int, future: cf.Future, deadline: float | None, n: int) -> _Outcome | RewardError:
        try:
            return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            future.cancel()  # cancels an async reward; a sync one cannot be stopped: its daemon thread is abandoned
            thread = getattr(future, "thread", None)
            if thread is not None:
                self._abandoned[k].append(thread)
            return RewardError(self.names[k], f"timed out after {self.timeout_s}s (RewardSet timeout_s)",
                               batch_size=n)

    # --- validation -------------------------------------------------------------------------------------
    def _check_values(self, k: int, raw: Any, n: int, offset: int = 0
                      ) -> tuple[list, dict[int, RewardError], Process]:
        """(values, {index: error}, process parts) for one return value covering samples offset .. offset + n - 1."""
        name = self.names[k]
        try:
            raw = _as_list(raw)
        except Exception as e:  # noqa: BLE001 - a generator that raises part-way: the reward's failure
            err = RewardError(name, f"raised {type(e).__name__} while its values were read: {e}",
                              offset if n == 1 else None, batch_size=None if n == 1 else n)
            return [None] * n, {offset + i: err for i in range(n)}, {}
        if not isinstance(raw, list) or len(raw) != n:
            got = f"{len(raw)} values" if isinstance(raw, list) else f"a {type(raw).__name__}"
            detail = f"returned {got}, expected a list of {n} floats or None (one per completion)"
            # a single-sample re-run names its sample; a batch call can only name the whole batch
            err = RewardError(name, detail, offset) if n == 1 else RewardError(name, detail, batch_size=n)
            return [None] * n, {offset + i: err for i in range(n)}, {}
        values, errors, process = [], {}, {}
        for i, v in enumerate(raw):
            try:
                outcome, steps, tokens = split_reward(v)
                f = _to_float(outcome)
                if f is not None and not math.isfinite(f):  # inf (NaN reads as None, as in TRL)
                    raise ValueError(f"returned {f}, which is not a finite number")
                values.append(f)
                if steps is not None or tokens is not None:
                    process[offset + i] = (steps, tokens)
            except Exception as e:  # noqa: BLE001 - 10**400 (OverflowError), a __float__ that raises: the reward's
                values.append(None)
                errors[offset + i] = RewardError(name, str(e) or type(e).__name__, offset + i)
        return values, errors, process

    def _values(self, k: int, outcome: _Outcome | RewardError, n: int
                ) -> tuple[list, dict[int, RewardError], Process]:
        name = self.names[k]
        if isinstance(outcome, RewardError):
            return [None] * n, {i: outcome for i in range(n)}, {}
        if outcome.batch_error is None:
            return self._check_values(k, outcome.values, n)
        e = outcome.batch_error
        if not outcome.sample_errors:  # not located (one sample, locating off, or only the batch fails)
            err = RewardError(name, f"raised {type(e).__name__}: {e}", 0 if n == 1 else None,
                              batch_size=None if n == 1 else n)
            return [None] * n, {i: err for i in range(n)}, {}
        values, errors, process = [None] * n, {}, {}
        for i in range(n):
            if i in outcome.sample_errors:
                s = outcome.sample_errors[i]
                errors[i] = RewardError(name, f"raised {type(s).__name__}: {s}", i)
            else:
                single, errs, proc = self._check_values(k, outcome.per_sample[i], 1, offset=i)
                values[i] = single[0]
                errors.update(errs)
                process.update(proc)
        return values, errors, process

    def _check_process(self, k: int, process: Process, trajectory: Any, errors: dict[int, RewardError]) -> None:
        """Step rewards must fit the sample's own steps and token rewards its response (when the trajectory is
        known); a misfit is the reward's error for that sample (raised, or zeroed with on_error=zero)."""
        steps_taken = getattr(trajectory, "unmask_step", None)
        for i, (steps, tokens) in list(process.items()):
            detail = None
            if steps is not None and steps_taken is not None and len(steps) > int(steps_taken[i].max()) + 1:
                detail = (f"returned {len(steps)} step rewards but the sample took {int(steps_taken[i].max()) + 1} "
                          "denoising steps")
            elif tokens is not None and steps_taken is not None and len(tokens) > steps_taken.shape[1]:
                detail = f"returned {len(tokens)} token rewards for a response of {steps_taken.shape[1]} tokens"
            if detail is not None:
                errors[i] = RewardError(self.names[k], detail, i)
                del process[i]

    # --- the batch --------------------------------------------------------------------------------------
    def __call__(self, prompts: list | None, completions: list, **columns: Any) -> RewardResult:
        """Score a batch; `columns` are the dataset columns plus trajectory / trainer_state / completion_ids /
        log_metric / log_extra (the RewardSet makes its own log_metric / log_extra when they are not given)."""
        completions = list(completions)
        n = len(completions)
        prompts = [None] * n if prompts is None else list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        own_log = None
        if "log_metric" not in columns or "log_extra" not in columns:
            own_log = RewardLog()
            columns = {"log_metric": own_log.log_metric, "log_extra": own_log.log_extra, **columns}
        # the calls' pristine source, private to this batch: every call (and a timed-out call still running after
        # this returns) copies from it, never from the caller's objects
        snapshot = private_copies({"prompts": prompts, "completions": completions, **columns})
        prompts, completions = snapshot.pop("prompts"), snapshot.pop("completions")
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        saved = ProcessState.save()
        if self._streams is not None:  # the rewards' own random stream, where their last call left it
            self._streams.apply()
        table, found, processes = [], [], []
        try:
            # the async rewards first, so that they run while the sync ones (on this thread, without a timeout) do
            order = sorted(range(len(self.fns)), key=lambda k: not self._async[k])
            futures = {k: self._submit(k, (prompts, completions, snapshot), n) for k in order}
            for k in range(len(self.fns)):
                outcome = self._wait(k, futures[k], deadline, n)
                self._pass_on_extras(outcome, columns["log_extra"], n)
                values, errors, process = self._values(k, outcome, n)
                self._check_process(k, process, snapshot.get("trajectory"), errors)
                table.append(values)
                found.append(errors)
                processes.append(process)
        finally:  # also when a reward is interrupted (KeyboardInterrupt is not a reward failure)
            self._streams = RandomState.capture()
            saved.restore(self.names)
        first = next((e for errs in found for e in errs.values()), None)
        if first is not None and self.on_error == "raise":
            others = sum(len(errs) for errs in found) - 1
            raise RewardError(first.reward, first.detail + (f" (and {others} more)" if others else ""),
                              first.index, first.batch_size)
        for k, errors in enumerate(found):
            for i in errors:
                table[k][i] = 0.0
                processes[k].pop(i, None)
            if errors:
                logger.warning("reward '%s': %d sample(s) scored 0 after errors; first: %s", self.names[k],
                               len(errors), next(iter(errors.values())))
        result = self._result(table, found, n, processes)
        if own_log is not None:
            result.metrics.update(own_log.metrics())
            result.extra = own_log.extras()
        return result

    def _process_table(self, processes: list[Process], n: int, part: int) -> torch.Tensor | None:
        """[N, width] weighted sum over functions of one process part (0: steps, 1: tokens); NaN = none given."""
        width = max((len(p[part]) for proc in processes for p in proc.values() if p[part] is not None), default=0)
        if not width:
            return None
        out = torch.full((n, width), math.nan, dtype=torch.float64)
        for k, proc in enumerate(processes):
            for i, parts in proc.items():
                for j, v in enumerate(parts[part] or []):
                    if v is not None:
                        out[i, j] = (0.0 if math.isnan(out[i, j]) else out[i, j]) + self.weights[k] * v
        return out.float()

    def _result(self, table: list[list], found: list[dict], n: int, processes: list[Process]) -> RewardResult:
        matrix = torch.tensor([[math.nan if v is None else v for v in col] for col in table],
                              dtype=torch.float64).T.reshape(n, len(self.fns))  # [N, F]
        weights = torch.tensor(self.weights, dtype=torch.float64)
        total = (matrix * weights).nansum(dim=1)  # [N]; a None contributes nothing (TRL's convention)
        no_reward = matrix.isnan().all(dim=1)  # [N]
        total[no_reward] = math.nan  # "nothing applies" must stay distinguishable from a reward of 0
        if no_reward.any():
            logger.warning("every reward returned None for sample(s) %s; their total is NaN",
                           no_reward.nonzero().flatten().tolist()[:10])
        metrics: dict[str, float] = {}
        for k, name in enumerate(self.names):
            valid = [v for v in table[k] if v is not None]
            mean = sum(valid) / len(valid) if valid else math.nan
            var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1) if len(valid) > 1 else 0.0
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = math.sqrt(var) if valid else math.nan
            metrics[f"reward_errors/{name}"] = float(len(found[k]))
        errors = [e for errs in found for e in errs.values()]
        return RewardResult(total=total.float(), per_function=matrix.float(), names=list(self.names),
                            weights=list(self.weights), metrics=metrics, errors=errors,
                            step_rewards=self._process_table(processes, n, 0),
                            token_rewards=self._process_table(processes, n, 1))

    def close(self) -> None:
        """Stop the event loops and any sandbox / verifier processes the rewards started (abandoned sync calls run
        on daemon threads, which never hold up the interpreter's exit)."""
        self._stop_event_loops()
        for fn in self.fns:
            if hasattr(fn, "close"):
                fn.close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
