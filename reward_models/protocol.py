"""The reward contract (TRL's) and helpers shared by the built-in rewards.

A reward is any callable `f(prompts, completions, **kwargs) -> list[float | None]`, called as TRL 1.16's
GRPOTrainer calls it:
  prompts          one entry per sample, as the dataset holds it: a string, or TRL's conversational form (a list
                   of {"role", "content"} messages)
  completions      one entry per sample: a string for plain-text prompts; for conversational prompts (TRL's test:
                   the first prompt is a list whose first item is a dict with "role") a one-message list
                   [{"role": "assistant", "content": text}], exactly as TRL builds it, so `completion[0]["content"]`
                   works. The built-in rewards read both forms (completion_text), so they need no switch.
  completion_ids   each completion's token ids (list of ints), cut after its first EOS with the EOS kept, as TRL
  trainer_state    a transformers TrainerState (RewardTrainerState): global_step = the RL step, epoch = finished
                   passes over the prompts, max_steps; it also answers the keys TraceRL passed before,
                   state["step"] and state["epoch"]. Outside training (a standalone evaluation) global_step is -1.
  log_metric       log_metric(name, value): a scalar the step logs under `name` (averaged over the step's calls)
  log_extra        log_extra(column, values): an extra per-sample column, kept with the step's samples
  trajectory       the batch's per-step record (tracerl.rollout.Trajectory), TraceRL's own addition
  kwargs           every other dataset column (one value per sample)
  return           one float per sample, or None where the reward does not apply to that sample; or, for a
                   sample with process rewards, a ProcessReward (or a dict with its fields)
Every call gets its own copies of its arguments (RewardSet): a reward that edits them in place changes nothing
the trainer or the other rewards see. `async def` rewards are awaited, concurrently with each other.
"""
from __future__ import annotations

import math
import numbers
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol, Sequence, Union

# the keyword arguments the trainer adds to the dataset's columns (TRL's names, plus `trajectory`)
RESERVED_KWARGS = ("trajectory", "trainer_state", "completion_ids", "log_metric", "log_extra")


@dataclass(frozen=True)
class ProcessReward:
    """A sample's reward with a per-step or per-token part, returned in place of its float.

    outcome  the usual reward of the whole completion (None: this function gives no outcome for the sample)
    steps    one reward per denoising step of the sample, indexed like `trajectory.unmask_step[i]` (the sample's
             own steps, 0 = its first); None entries give nothing for that step; may stop before the last step
    tokens   one reward per response position j (`trajectory.response_ids[i, j]`); each lands on the step that
             committed token j (a step's reward is the sum of its tokens'); None entries give nothing
    A TRL function that returns one float per completion needs none of this and keeps working unchanged.
    """

    outcome: float | None = None
    steps: Sequence[float | None] | None = None
    tokens: Sequence[float | None] | None = None


Reward = Union[float, None, ProcessReward]
PROCESS_KEYS = ("outcome", "steps", "tokens")


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
        raise TypeError(f"{what} is {type(value).__name__} {value!r}, expected a float or None")
    try:
        f = float(value)
    except Exception as exc:  # noqa: BLE001 - 10**400 overflows, a user type's __float__ may raise anything
        raise ValueError(f"{what} is {type(value).__name__} {_short(value)}, which does not convert to a float "
                         f"({type(exc).__name__}: {exc})") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} is {f}, which is not a finite number")
    return f


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__
        return "<unprintable>"
    return text if len(text) <= 40 else text[:37] + "..."


def split_reward(value: Any) -> tuple[Any, list | None, list | None]:
    """(outcome, step rewards, token rewards) of one returned value; a plain float has no process part.

    The outcome is returned as given (the caller checks it); process entries are checked here: finite floats or
    None. Raises TypeError / ValueError naming what is wrong.
    """
    if isinstance(value, dict) and value and set(value) <= set(PROCESS_KEYS):
        value = ProcessReward(**value)
    if not isinstance(value, ProcessReward):
        return value, None, None
    parts = []
    for name in ("steps", "tokens"):
        seq = getattr(value, name)
        if seq is None:
            parts.append(None)
            continue
        if hasattr(seq, "tolist"):
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"ProcessReward.{name} is a {type(seq).__name__}, expected a list of floats or None")
        parts.append([_number(v, f"ProcessReward.{name}[{j}]") for j, v in enumerate(seq)])
    return value.outcome, parts[0], parts[1]


class RewardFn(Protocol):
    def __call__(self, prompts: list, completions: list,
                 **kwargs: Any) -> Union[Sequence[Reward], Awaitable[Sequence[Reward]]]: ...


class RewardError(RuntimeError):
    """A reward function misbehaved (raised, wrong length, NaN/inf, wrong type, timed out).

    `reward` is the reward's name; `index` the sample index when one sample is at fault; `batch_size` is set
    instead when the whole batch is at fault (a wrong number of values, a timeout, an error that could not be
    narrowed to single samples), and the message then says "all N samples".
    """

    def __init__(self, reward: str, message: str, index: int | None = None,
                 batch_size: int | None = None) -> None:
        if index is None and batch_size == 1:
            index, batch_size = 0, None
        if index is not None:
            where = f" at sample {index}"
        elif batch_size is not None:
            where = f" on all {batch_size} samples of the batch (indices 0..{batch_size - 1})"
        else:
            where = ""
        super().__init__(f"reward '{reward}'{where}: {message}")
        self.reward, self.index, self.batch_size, self.detail = reward, index, batch_size, message


class RewardSpecError(ValueError):
    """A reward spec that cannot be turned into a reward (unknown name, missing file/attribute, bad option).

    A ValueError, so a caller treating user mistakes as ValueErrors reports it as one; the message names
    the spec as the user wrote it.
    """


def content_text(content: Any) -> str:
    """A message's content: a string, or a list of parts such as {"type": "text", "text": ...}."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the concatenated contents of a conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return content_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(content_text(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def column(kwargs: dict, names: Sequence[str], reward: str, n: int) -> list:
    """The first present column among `names`, checked to hold one value per sample."""
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            values = list(kwargs[name])
            if len(values) != n:
                raise ValueError(f"column '{name}' has {len(values)} values for {n} completions")
            return values
    wanted = " or ".join(f"'{c}'" for c in names)
    raise ValueError(f"the {reward} reward needs a {wanted} column in the dataset (columns given: "
                     f"{sorted(k for k in kwargs if k not in RESERVED_KWARGS)})")


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def answer_span(text: str) -> str | None:
    """The content of the last <answer>...</answer> block, if any."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None


def is_conversational(prompts: Sequence[Any]) -> bool:
    """TRL's test (trl.data_utils.is_conversational on the first prompt): a list whose first item is a message."""
    first = prompts[0] if len(prompts) else None
    return isinstance(first, list) and bool(first) and isinstance(first[0], dict) and "role" in first[0]


def trl_completions(prompts: Sequence[Any], texts: Sequence[str]) -> list:
    """Completions in the form TRL 1.16 passes them: the texts, or for conversational prompts one assistant message
    each, [{"role": "assistant", "content": text}] (GRPOTrainer._generate without a response parser)."""
    if is_conversational(prompts):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return list(texts)


def _make_state_class() -> type:
    from transformers.trainer_callback import TrainerState

    class RewardTrainerState(TrainerState):
        """transformers' TrainerState (what TRL passes as `trainer_state`), also read as the mapping TraceRL passed
        before: state["step"] is global_step, state["epoch"] the epoch (as given); .get and `in` work too."""

        _KEYS = {"step": "global_step", "epoch": "epoch", "max_steps": "max_steps"}

        def __getitem__(self, key: str) -> Any:
            if key not in self._KEYS:
                raise KeyError(key)
            if key == "epoch" and getattr(self, "_epoch_given", None) is not None:
                return self._epoch_given
            return getattr(self, self._KEYS[key])

        def get(self, key: str, default: Any = None) -> Any:
            return self[key] if key in self._KEYS else default

        def __contains__(self, key: object) -> bool:
            return key in self._KEYS

        def keys(self) -> list[str]:
            return list(self._KEYS)

    RewardTrainerState.__module__, RewardTrainerState.__qualname__ = __name__, "RewardTrainerState"
    return RewardTrainerState


_STATE_CLASS: type | None = None


def __getattr__(name: str) -> Any:  # RewardTrainerState imports transformers' trainer only when first used
    global _STATE_CLASS
    if name == "RewardTrainerState":
        if _STATE_CLASS is None:
            _STATE_CLASS = _make_state_class()
        return _STATE_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer_state(step: int = -1, epoch: float = 0, max_steps: int = 0) -> Any:
    """The `trainer_state` rewards get: a transformers TrainerState with global_step = `step` (-1: not training),
    epoch, max_steps (0: unknown), readable as state["step"] / state["epoch"] as well."""
    cls = __getattr__("RewardTrainerState")
    state = cls(global_step=int(step), epoch=float(epoch), max_steps=int(max_steps))
    state._epoch_given = epoch
    return state


def as_trainer_state(value: Any) -> Any:
    """A TrainerState as is; a {"step", "epoch", "max_steps"} mapping (or None: not training) as a trainer_state."""
    if value is None:
        return trainer_state()
    if isinstance(value, dict):
        return trainer_state(value.get("step", -1), value.get("epoch", 0), value.get("max_steps", 0))
    return value


_TRAINER_METRICS = ("reward", "reward_std")  # the step's reward statistics (tracerl.data_parallel.reward_stats)


class RewardLog:
    """TRL's `log_metric` / `log_extra` for one scoring call (thread-safe: rewards run concurrently).

    log_metric(name, value)   a scalar; the step's metrics get `name` = the mean of the values logged under it
                              this step (TRL averages over the step too). A name in TraceRL's own reward metrics
                              (rewards/..., reward_errors/..., reward, reward_std) is kept as `reward_log/<name>`
                              rather than overwrite them; a name that is not a string or a value that is not a real
                              number raises in the reward, which makes it that reward's error
    log_extra(column, values) a per-sample column (TRL's completions-table column); the values are kept, in order,
                              in `extra[column]` (ScoredBatch.extra / RewardResult.extra)
    """

    def __init__(self) -> None:
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list] = defaultdict(list)
        self._lock = threading.Lock()

    def log_metric(self, name: str, value: float) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metric: the name must be a non-empty string, got {name!r}")
        if name in _TRAINER_METRICS or name.startswith(("rewards/", "reward_errors/")):
            name = f"reward_log/{name}"  # TRL logs it as given; here it would overwrite a reward's own statistics
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
            raise TypeError(f"log_metric({name!r}, ...): the value is {type(value).__name__} {value!r}, expected a "
                            "number")
        with self._lock:
            self._metrics[name].append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        if not isinstance(column, str) or not column:
            raise TypeError(f"log_extra: the column must be a non-empty string, got {column!r}")
        if hasattr(values, "tolist"):
            values = values.tolist()
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
            raise TypeError(f"log_extra({column!r}, ...): the values are a {type(values).__name__}, expected a list "
                            "with one value per sample")
        with self._lock:
            self.extra[column].extend(values)

    def metrics(self) -> dict[str, float]:
        """name -> mean of the values logged under it."""
        with self._lock:
            return {k: sum(v) / len(v) for k, v in self._metrics.items() if v}

    def extras(self) -> dict[str, list]:
        with self._lock:
            return {k: list(v) for k, v in self.extra.items()}
