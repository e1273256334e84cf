"""`format` and `length` rewards.

format: 1.0 if the completion has the required shape, else 0.0.
  - pattern="regex": re.fullmatch (or re.search with mode="search") on the stripped text, with re.DOTALL
  - tags=("think", "answer") (the default): each <tag>...</tag> appears exactly once, in this order;
    partial=True gives the fraction of tags present exactly once instead (order ignored)
length: a penalty or a target, on characters (unit="chars"), whitespace-separated words ("words") or
  tokens ("tokens", with `tokenizer=` a Hugging Face tokenizer or a path to one):
  - max_length=M: 0.0 up to M, then -(L - M) / M, floored at -1.0 (a soft overlong penalty)
  - target=T: 1 - |L - T| / T, floored at 0.0 (1.0 exactly at the target)
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from .protocol import completion_text


class FormatReward:
    __name__ = "format"

    def __init__(self, pattern: str | None = None, tags: Sequence[str] | None = None, mode: str = "fullmatch",
                 partial: bool = False) -> None:
        if pattern is not None and tags is not None:
            raise ValueError("format reward: give either pattern= or tags=, not both")
        if mode not in ("fullmatch", "search"):
            raise ValueError(f"format reward: mode must be 'fullmatch' or 'search', got {mode!r}")
        self.tags = None if pattern is not None else list(tags or ("think", "answer"))
        self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None
        self.mode, self.partial = mode, partial

    def _score(self, text: str) -> float:
        if self.pattern is not None:
            match = self.pattern.fullmatch if self.mode == "fullmatch" else self.pattern.search
            return 1.0 if match(text.strip()) else 0.0
        counts = [len(re.findall(rf"<{re.escape(t)}>.*?</{re.escape(t)}>", text, re.DOTALL)) for t in self.tags]
        if self.partial:
            return sum(c == 1 for c in counts) / len(self.tags)
        if any(c != 1 for c in counts):
            return 0.0
        ordered = ".*?".join(rf"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in self.tags)
        return 1.0 if re.search(ordered, text, re.DOTALL) else 0.0

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        return [self._score(completion_text(c)) for c in completions]


class LengthReward:
    __name__ = "length"

    def __init__(self, max_length: int | None = None, target: int | None = None, unit: str = "chars",
                 tokenizer: Any = None) -> None:
        if (max_length is None) == (target is None):
            raise ValueError("length reward: give exactly one of max_length= (penalty) or target=")
        if (max_length or target or 0) <= 0:
            raise ValueError("length reward: max_length / target must be positive")
        if unit not in ("chars", "words", "tokens"):
            raise ValueError(f"length reward: unit must be chars, words or tokens, got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("length reward: unit='tokens' needs tokenizer= (an object or a path)")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.max_length, self.target, self.unit, self.tokenizer = max_length, target, unit, tokenizer

    def measure(self, text: str) -> int:
        if self.unit == "chars":
            return len(text)
        if self.unit == "words":
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            n = self.measure(completion_text(c))
            if self.max_length is not None:
                over = n - self.max_length
                out.append(0.0 if over <= 0 else -min(1.0, over / self.max_length))
            else:
                out.append(max(0.0, 1.0 - abs(n - self.target) / self.target))
        return out
