"""Turn a reward spec into a callable: built-in name, "pkg.module:function", "file.py:function", model dir.

Spec forms (also accepted by RewardSet):
  "math"                                  a built-in: math, code, sudoku, countdown, format, length
  "my_pkg.rewards:exact_match"            importable module : attribute
  "rewards/my_rewards.py:exact_match"     file path : attribute (relative to base_dir, default the cwd)
  "/models/my-rm"                         a directory with config.json: a learned reward model
  a callable                              used as is
  {"fn": <one of the above>, "name": "shown_in_metrics", "weight": 1.0, "kwargs": {...}}
    "path" is accepted as a synonym of "fn"; with neither, "name" is the spec. A dataclass with these
    fields (the recipe's tracerl.config.RewardSpec) is read the same way.
An attribute that is a class is instantiated with the kwargs; a function gets them bound (partial).
Every mistake raises RewardSpecError (a ValueError) whose message quotes the spec as written.
"""
from __future__ import annotations

import dataclasses
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

from .learned import LearnedReward, is_model_dir, is_reward_model
from .protocol import RewardSpecError

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
    """One reward as a recipe (`rewards:` entries) or a Python caller names it."""

    fn: Any = ""  # built-in name | pkg.module:function | path/file.py:function | reward-model directory | a callable
    name: str | None = None  # metrics name (rewards/<name>/mean); default: the function's / built-in's name
    weight: float = 1.0  # weight in the total reward
    kwargs: dict[str, Any] = field(default_factory=dict)  # options passed to the built-in / factory


def _from_dict(item: dict) -> RewardSpec:
    unknown = set(item) - _SPEC_KEYS
    if unknown:
        raise RewardSpecError(f"reward spec {item}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    if item.get("fn") and item.get("path"):
        raise RewardSpecError(f"reward spec {item}: give 'fn' or 'path', not both")
    # `or`, not dict.get defaults: a recipe dataclass carries fn="" when only a built-in name is given
    fn = item.get("fn") or item.get("path") or item.get("name")
    if not fn:
        raise RewardSpecError(f"reward spec {item}: needs 'fn' (or 'path', or a built-in 'name')")
    kwargs = item.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RewardSpecError(f"reward spec {item}: 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    weight = item.get("weight")
    return RewardSpec(fn=fn, name=item.get("name"), weight=1.0 if weight is None else weight, kwargs=dict(kwargs))


def _is_spec_object(item: Any) -> bool:
    """A recipe's spec dataclass (fields fn/name/weight/kwargs), not a user's callable dataclass reward."""
    return (dataclasses.is_dataclass(item) and not isinstance(item, type) and not callable(item)
            and any(f.name in ("fn", "path") for f in dataclasses.fields(item)))


def parse_spec(item: Any) -> RewardSpec:
    """A RewardSpec from a string, callable, (spec, weight) pair, dict, RewardSpec (a recipe's `rewards:` entry:
    with no fn, its name is the spec), or any dataclass with the same fields."""
    if isinstance(item, tuple) and len(item) == 2:
        spec = parse_spec(item[0])
        spec.weight = item[1]
        return spec
    if isinstance(item, RewardSpec) or _is_spec_object(item):
        item = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    if isinstance(item, dict):
        return _from_dict(item)
    if isinstance(item, str) or callable(item):
        return RewardSpec(fn=item)
    raise RewardSpecError(f"cannot read a reward spec from {type(item).__name__}: {item!r}")


def _bind(obj: Any, kwargs: dict, what: str) -> Callable:
    """A class is instantiated with the options (a built-in or a user's reward class); a function gets them
    bound with functools.partial."""
    if inspect.isclass(obj):
        try:
            return obj(**kwargs)
        except TypeError as e:
            params = [p for p in inspect.signature(obj.__init__).parameters if p != "self"]
            raise RewardSpecError(f"reward {what}: bad option(s) {sorted(kwargs)} ({e}); accepted: {params}"
                                  ) from None
        except ValueError as e:  # the reward's own option validation
            raise RewardSpecError(f"reward {what}: {e}") from None
        except Exception as e:  # a user's reward class failing in its own __init__
            raise RewardSpecError(f"reward {what}: creating it raised {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise RewardSpecError(f"reward {what} is a {type(obj).__name__}, not a function")
    if not kwargs:
        return obj
    bound = functools.partial(obj, **kwargs)
    bound.__name__ = getattr(obj, "__name__", what)  # type: ignore[attr-defined]
    return bound


def _attr(module: Any, attr: str, where: str, spec: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise RewardSpecError(f"reward '{spec}': no '{attr}' in {where} (callables there: {public[:20]})")
        obj = getattr(obj, part)
    return obj


def _from_file(path: str, attr: str, base_dir: str | None) -> Any:
    spec_text = f"{path}:{attr}"
    full = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))
    if not os.path.isfile(full):
        raise RewardSpecError(f"reward '{spec_text}': file not found: {full}")
    # a unique, stable module name: two files called rewards.py must not overwrite each other
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"tracerl_user_rewards.{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickle look modules up here
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # a bug in the user's file (or a script's argparse / sys.exit)
            del sys.modules[name]
            raise RewardSpecError(f"reward '{spec_text}': importing {full} failed: {type(e).__name__}: {e}") from e
    return _attr(sys.modules[name], attr, full, spec_text)


def load_reward(spec: Any, base_dir: str | None = None, **kwargs: Any) -> Callable:
    """The reward callable for `spec` (see the module docstring); kwargs are the reward's options."""
    if isinstance(spec, (dict, tuple, RewardSpec)) or _is_spec_object(spec):
        parsed = parse_spec(spec)
        fn = load_reward(parsed.fn, base_dir=base_dir, **{**parsed.kwargs, **kwargs})
        if parsed.name:
            if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
                fn = functools.partial(fn)  # rename a copy, never the user's function object
            fn.__name__ = parsed.name  # type: ignore[attr-defined]
        return fn
    if is_reward_model(spec):  # a loaded sequence-classification model, as TRL's reward_funcs take one
        try:
            return LearnedReward(spec, **kwargs)
        except (TypeError, ValueError, OSError) as e:
            raise RewardSpecError(f"reward model {type(spec).__name__}: {type(e).__name__}: {e}") from None
    if callable(spec):
        return _bind(spec, kwargs, getattr(spec, "__name__", repr(spec)))
    if not isinstance(spec, str) or not spec:
        raise RewardSpecError(f"reward spec must be a non-empty string, a callable or a dict, got {spec!r}")
    if spec in _BUILTINS:
        module, cls = _BUILTINS[spec]
        return _bind(getattr(importlib.import_module(f"{__package__}.{module}"), cls), kwargs, f"'{spec}'")
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") and attr:
        return _bind(_from_file(where, attr, base_dir), kwargs, f"'{spec}'")
    candidate = os.path.join(base_dir or os.getcwd(), os.path.expanduser(spec))
    if is_model_dir(candidate):
        try:
            return LearnedReward(candidate, **kwargs)
        except (TypeError, ValueError, OSError) as e:  # bad option, wrong head, unreadable checkpoint
            raise RewardSpecError(f"reward model '{spec}' ({candidate}): {type(e).__name__}: {e}") from None
    if where and attr and all(p.isidentifier() for p in where.split(".")):
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardSpecError(f"reward '{spec}': cannot import module '{where}': {e}") from None
        except (Exception, SystemExit) as e:  # the module exists but its own code fails on import
            raise RewardSpecError(f"reward '{spec}': importing module '{where}' failed: {type(e).__name__}: {e}"
                                  ) from e
        return _bind(_attr(module, attr, f"module {where}", spec), kwargs, f"'{spec}'")
    if os.sep in spec or spec.startswith((".", "~")):
        state = "has no config.json" if os.path.isdir(candidate) else "does not exist"
        raise RewardSpecError(f"reward '{spec}': {candidate} {state}; a reward-model directory needs config.json "
                              "(a reward file is given as 'path/file.py:function')")
    raise RewardSpecError(f"unknown reward '{spec}': expected a built-in ({', '.join(BUILTINS)}), "
                          "'pkg.module:function', 'path/to/file.py:function', or a reward-model directory "
                          "containing config.json")


def check_weight(name: str, weight: Any) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise RewardSpecError(f"reward '{name}': weight must be a number, got {weight!r}") from None
    if not math.isfinite(w):
        raise RewardSpecError(f"reward '{name}': weight must be finite, got {weight!r}")
    return w
