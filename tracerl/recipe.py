"""Recipes: a YAML file + dotted `key=value` overrides -> a typed, validated config (tracerl.config).

Everything a user can get wrong fails here, before any model loads, with the key path and (for a typo) the
nearest valid key: `trainer.max_step: unknown key (did you mean trainer.max_steps?)`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from tracerl import config as schema
from tracerl.choices import options
from tracerl.errors import UserError

# YAML 1.1 (PyYAML) reads 1e-5 as the text "1e-5" (it wants 1.0e-5); a number field takes that text as the number
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a second
    `trainer:` section would drop every key of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; not a key of its own
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); the second would "
                    "silently replace the first", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None, overrides: list[str] | None = None, kind: type = schema.RLConfig) -> Any:
    """Read a recipe (or start from defaults when path is None), apply overrides, build and validate `kind`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    seen: dict[str, str] = {}
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if key in seen:  # as Hydra does: the second would silently win, and the first was meant too
            raise UserError(f"override {key} is given twice ({seen[key]!r} and {item!r}); keep one")
        seen[key] = item
        apply_override(raw, item)
    config = build(kind, raw, prefix="")
    if isinstance(config, schema.RLConfig):
        from tracerl.estimators import resolve

        config.algorithm = resolve(config.algorithm)  # what the estimator fixes, filled in where left unset
    validate(config)
    return config


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file {path!r} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    except UnicodeDecodeError:  # a data file or checkpoint given where the recipe goes
        raise UserError(f"{path}: not a text file, so not a YAML recipe") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model:, rollout:, ...), got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value` (value parsed as YAML: 3, 1e-5, true, null, [a, b]) into the nested dict."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.path=value")
    key, _, text = item.partition("=")
    try:
        value: Any = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if "#" in text and "#" not in repr(value):  # YAML read `#...` as a comment and cut it: a prompt "#1 rule: ..."
        value = text  # became null, "{question} #1" a mapping; on a command line it is text

    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def build(kind: type, raw: Any, prefix: str) -> Any:
    """Recursively turn a dict into dataclass `kind`, checking keys and types; errors name the key path."""
    if raw is None and prefix:  # `rollout:` with every key under it commented out reads as null: the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{prefix or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(kind)
    names = [f.name for f in dataclasses.fields(kind)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {_path(prefix, near[0])}?)" if near else f" (valid keys: {', '.join(names)})"
        raise UserError(f"{_path(prefix, key)}: unknown key{hint}")
    values = {name: convert(hints[name], raw[name], _path(prefix, name)) for name in names if name in raw}
    return kind(**values)


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check/convert one value against a type hint (dataclass, Optional, Literal choices, list, dict, scalars)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value in args:
            return value
        raise UserError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args:  # `list[str] | str` keeps a string a string ("all-linear")
            return value
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, path)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[-1] if len(errors) == 1 else f"{path}: {value!r} is not a valid {_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # data.eval_files=other.csv means [other.csv]: a one-file list needs no brackets
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a list, got {value!r}")
        return [convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(tp, value, path)


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `x > 0` check and would train on NaN
                raise UserError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{path}: expected {_name(tp)}, got {value!r}")


def validate(config: Any) -> None:
    """Value checks that need more than a type (ranges, impossible combinations): each section's own `validate`."""
    config.validate()


def walk(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a config."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _path(prefix, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, key)
        else:
            yield key, value


def help_texts(kind: type = schema.RLConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment written beside the field in tracerl/config.py (the field's documentation)."""
    out: dict[str, str] = {}
    comments = _field_comments(kind)
    for f in dataclasses.fields(kind):
        key = _path(prefix, f.name)
        tp = typing.get_type_hints(kind)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(help_texts(tp, key))
        else:
            out[key] = comments.get(f.name, "")
    return out


def _field_comments(kind: type) -> dict[str, str]:
    lines, start = inspect.getsourcelines(kind)
    tree = ast.parse("".join(lines))
    out = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = []
            row = node.lineno - 1
            if "#" in lines[row]:
                text.append(lines[row].split("#", 1)[1].strip())
            while row + 1 < len(lines) and lines[row + 1].strip().startswith("#"):
                row += 1
                text.append(lines[row].strip().lstrip("#").strip())
            out[node.target.id] = " ".join(text)
    return out


def dump(config: Any) -> str:
    """The resolved config as YAML (what `tracerl validate` prints)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=False)


def _path(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(options(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
