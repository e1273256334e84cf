"""`countdown` reward: 1.0 if the completion's final equation reaches the target with the given numbers.

Columns: `nums` or `numbers` (a list of ints, or one string of them such as "30,100,93" or "[2, 3, 4]") and
`target` (an int, or a string of one); d1's evaluation file (`{"input": "30,100,93", "output": "23"}`) is
read through `input` / `output` when the usual columns are absent.
Rules: the equation uses + - * / and parentheses over integer literals (no unary minus, no decimals, no
other symbols); every literal must be one of the given numbers and each given number is used at most once
(a multiset check, so [2, 2, 3] allows two 2s); exact rational arithmetic (Fraction), so 7/2*2 == 7;
division by zero scores 0. It is parsed by a recursive-descent parser, never `eval`.
Extraction: the last <answer>...</answer> block if present, else the last line containing a digit; LaTeX
`$`, `\\times`, `\\div`, `\\cdot`, and the characters x-times/divide/minus-sign are normalised; the
equation is the longest run of equation characters ending the text left of the first `=`, so a prefix such
as "Answer:" is ignored; a right-hand side `= target` is allowed and must equal the target.
"""
from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Any

from .protocol import answer_span, column, completion_text

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_REPLACE = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "−": "-", "–": "-", "$": "",
            "\\(": "", "\\)": "", "\\left": "", "\\right": ""}
_EXPR_TAIL = re.compile(r"[\d\s+\-*/()]+$")
MAX_CHARS = 500


class ParseError(ValueError):
    pass


def tokenize(text: str) -> list[str | int]:
    tokens: list[str | int] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r}")
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ; factor := INT | '(' expr ')'"""

    def __init__(self, tokens: list[str | int]) -> None:
        self.tokens, self.pos, self.used = tokens, 0, []

    def peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | int:
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end of equation")
        self.pos += 1
        return token

    def expr(self, depth: int = 0) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = value + self.term(depth) if self.take() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            if op == "/" and rhs == 0:
                raise ZeroDivisionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > 50:
            raise ParseError("parentheses nested too deeply")
        token = self.take()
        if isinstance(token, int):
            self.used.append(token)
            return Fraction(token)
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ParseError("missing )")
            return value
        raise ParseError(f"unexpected {token!r}")


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """(value, integer literals used) of an arithmetic expression; ParseError / ZeroDivisionError if invalid."""
    parser = _Parser(tokenize(expression))
    value = parser.expr()
    if parser.peek() is not None:
        raise ParseError(f"unexpected {parser.peek()!r} after the equation")
    return value, parser.used


def extract_equation(text: str) -> str | None:
    span = answer_span(text)
    if span is None:
        lines = [ln for ln in text.splitlines() if re.search(r"\d", ln)]
        if not lines:
            return None
        span = lines[-1]
    for old, new in _REPLACE.items():
        span = span.replace(old, new)
    return span.strip().rstrip(".").strip()


def score(text: str, nums: list[int], target: int | float) -> float:
    equation = extract_equation(text)
    if not equation or len(equation) > MAX_CHARS:
        return 0.0
    lhs, *rhs = equation.split("=")
    tail = _EXPR_TAIL.search(lhs)
    if tail is None:
        return 0.0
    goal = Fraction(target)
    if any(not re.fullmatch(r"-?\d+", side.strip()) or Fraction(int(side)) != goal for side in rhs):
        return 0.0  # only "= target" may follow the equation
    try:
        value, used = evaluate(tail.group(0))
    except (ParseError, ZeroDivisionError):
        return 0.0
    if Counter(used) - Counter(int(n) for n in nums):  # some literal not given, or used too often
        return 0.0
    return 1.0 if value == goal else 0.0


def parse_numbers(value: Any, name: str) -> list[int]:
    """A list of ints, or one string of integers separated by commas / spaces, optionally in brackets."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts = [p for p in re.split(r"[,\s]+", text) if p]
        if parts and all(re.fullmatch(r"-?\d+", p) for p in parts):
            return [int(p) for p in parts]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())
                                                  for v in value):
        return [int(v) for v in value]
    raise ValueError(f"column '{name}' holds {value!r}; expected a list of integers or a string like \"30,100,93\"")


def parse_target(value: Any, name: str) -> int | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        return float(value) if "." in value else int(value)
    raise ValueError(f"column '{name}' holds {value!r}; expected a number (or a string of one, like \"23\")")


class CountdownReward:
    """See the module docstring. Options: nums_column (tries "nums", "numbers", then d1's "input"),
    target_column (tries "target", then d1's "output")."""

    __name__ = "countdown"

    def __init__(self, nums_column: str | None = None, target_column: str | None = None) -> None:
        self.nums_columns = [nums_column] if nums_column else ["nums", "numbers", "input"]
        self.target_columns = [target_column] if target_column else ["target", "output"]

    @property
    def required_columns(self) -> list[list[str]]:
        """The dataset columns it reads (each a list of alternatives), checked before a run starts."""
        return [self.nums_columns, self.target_columns]

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        nums = column(kwargs, self.nums_columns, "countdown", n)
        targets = column(kwargs, self.target_columns, "countdown", n)
        nums_name = next(c for c in self.nums_columns if kwargs.get(c) is not None)
        target_name = next(c for c in self.target_columns if kwargs.get(c) is not None)
        return [None if ns is None or t is None else
                score(completion_text(c), parse_numbers(ns, nums_name), parse_target(t, target_name))
                for c, ns, t in zip(completions, nums, targets)]
