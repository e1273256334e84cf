"""Turn a reward spec into a callable: built-in name, "pkg.module:function", "file.py:function", model dir.

Spec forms (also accepted by RewardSet):
  "math"                                  a built-in: math, code, sudoku, countdown, format, length
  "my_pkg.rewards:exact_match"            importable module : attribute
  "rewards/my_rewards.py:exact_match"     file path : attribute (relative to base_dir, default the cwd)
  "/models/my-rm"                         a directory with config.json: a learned reward model
  a callable                              used as is
  {"fn": <one of the above>, "name": "shown_in_metrics", "weight": 1.0, "kwargs": {...}}
    "path" is accepted as a synonym of "fn" (the recipe spelling); with neither, "name" is the spec.
An attribute that is a class is instantiated with the kwargs; a function gets them bound (partial).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .learned import LearnedReward, is_model_dir

_BUILTINS = {
    "math": ("math_reward", "MathReward"),
    "code": ("code_reward", "CodeReward"),
    "sudoku": ("sudoku", "SudokuReward"),
    "countdown": ("countdown", "CountdownReward"),
    "format": ("format_length", "FormatReward"),
    "length": ("format_length", "LengthReward"),
}
BUILTINS = tuple(_BUILTINS)
_SPEC_KEYS = {"fn", "path", "name", "weight", "kwargs"}


@dataclass
class RewardSpec:
    fn: Any  # str locator or a callable
    name: str | None = None  # metrics name; default: the function's __name__ / the built-in's name
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def parse_spec(item: Any) -> RewardSpec:
    """A RewardSpec from a string, callable, (spec, weight) pair, dict, or RewardSpec."""
    if isinstance(item, RewardSpec):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        spec = parse_spec(item[0])
        spec.weight = item[1]
        return spec
    if isinstance(item, dict):
        unknown = set(item) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"reward spec {item}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
        if "fn" in item and "path" in item:
            raise ValueError(f"reward spec {item}: give 'fn' or 'path', not both")
        fn = item.get("fn", item.get("path", item.get("name")))
        if fn is None:
            raise ValueError(f"reward spec {item}: needs 'fn' (or 'path', or a built-in 'name')")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"reward spec {item}: 'kwargs' must be a mapping")
        return RewardSpec(fn=fn, name=item.get("name"), weight=item.get("weight", 1.0), kwargs=dict(kwargs))
    if isinstance(item, str) or callable(item):
        return RewardSpec(fn=item)
    raise ValueError(f"cannot read a reward spec from {type(item).__name__}: {item!r}")


def _bind(obj: Any, kwargs: dict, what: str) -> Callable:
    if inspect.isclass(obj):
        try:
            return obj(**kwargs)
        except TypeError as e:
            params = [p for p in inspect.signature(obj.__init__).parameters if p != "self"]
            raise ValueError(f"reward {what}: bad option(s) {sorted(kwargs)} ({e}); accepted: {params}") from None
    if not callable(obj):
        raise ValueError(f"reward {what} is a {type(obj).__name__}, not a function")
    if not kwargs:
        return obj
    bound = functools.partial(obj, **kwargs)
    bound.__name__ = getattr(obj, "__name__", what)  # type: ignore[attr-defined]
    return bound


def _attr(module: Any, attr: str, where: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward '{attr}' not found in {where}")
        obj = getattr(obj, part)
    return obj


def _from_file(path: str, attr: str, base_dir: str | None) -> Any:
    full = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))
    if not os.path.isfile(full):
        raise ValueError(f"reward file not found: {full} (from '{path}:{attr}')")
    # a unique, stable module name: two files called rewards.py must not overwrite each other
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"tracerl_user_rewards.{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle look modules up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return _attr(sys.modules[name], attr, full)


def load_reward(spec: Any, base_dir: str | None = None, **kwargs: Any) -> Callable:
    """The reward callable for `spec` (see the module docstring); kwargs are the reward's options."""
    if isinstance(spec, (dict, tuple, RewardSpec)):
        parsed = parse_spec(spec)
        fn = load_reward(parsed.fn, base_dir=base_dir, **{**parsed.kwargs, **kwargs})
        if parsed.name:
            if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
                fn = functools.partial(fn)  # rename a copy, never the user's function object
            fn.__name__ = parsed.name  # type: ignore[attr-defined]
        return fn
    if callable(spec):
        return _bind(spec, kwargs, getattr(spec, "__name__", repr(spec)))
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward spec must be a non-empty string, a callable or a dict, got {spec!r}")
    if spec in _BUILTINS:
        module, cls = _BUILTINS[spec]
        return _bind(getattr(importlib.import_module(f"{__package__}.{module}"), cls), kwargs, f"'{spec}'")
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") and attr:
        return _bind(_from_file(where, attr, base_dir), kwargs, f"'{spec}'")
    candidate = os.path.join(base_dir or os.getcwd(), os.path.expanduser(spec))
    if is_model_dir(candidate):
        return LearnedReward(candidate, **kwargs)
    if where and attr and all(p.isidentifier() for p in where.split(".")):
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward '{spec}': cannot import module '{where}': {e}") from None
        return _bind(_attr(module, attr, f"module {where}"), kwargs, f"'{spec}'")
    raise ValueError(f"unknown reward '{spec}': expected a built-in ({', '.join(BUILTINS)}), "
                     "'pkg.module:function', 'path/to/file.py:function', or a reward-model directory "
                     "containing config.json")


def check_weight(name: str, weight: Any) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"reward '{name}': weight must be a number, got {weight!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"reward '{name}': weight must be finite, got {weight!r}")
    return w
