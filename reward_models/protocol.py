"""The reward contract (TRL's) and helpers shared by the built-in rewards.

A reward is any callable `f(prompts, completions, **kwargs) -> list[float | None]`:
  prompts, completions  one entry per sample; plain strings, or TRL's conversational form
                        (a list of {"role", "content"} messages)
  kwargs                every other dataset column (one value per sample), plus `trajectory` (the batch's
                        per-step record, opaque) and `trainer_state` (step, epoch) when the trainer has them
  return                one float per sample, or None where the reward does not apply to that sample
`async def` rewards are awaited, concurrently with each other.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Protocol, Sequence, Union

Reward = Union[float, None]


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
