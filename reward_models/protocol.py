"""The reward contract (TRL's) and helpers shared by the built-in rewards.

A reward is any callable `f(prompts, completions, **kwargs) -> list[float | None]`:
  prompts, completions  one entry per sample; plain strings, or TRL's conversational form
                        (a list of {"role", "content"} messages)
  kwargs                every other dataset column (one value per sample), plus `trajectory` (the batch's
                        per-step record, opaque) and `trainer_state` (step, epoch) when the trainer has them
  return                one float per sample, or None where the reward does not apply to that sample; or, for
                        a sample with process rewards, a ProcessReward (or a dict with its fields)
`async def` rewards are awaited, concurrently with each other.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol, Sequence, Union


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
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{what} is {f}, which is not a finite number")
    return f


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
                     f"{sorted(k for k in kwargs if k not in ('trajectory', 'trainer_state'))})")


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def answer_span(text: str) -> str | None:
    """The content of the last <answer>...</answer> block, if any."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None
