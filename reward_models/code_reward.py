"""`code` reward: run the completion's program against the sample's tests in the sandbox.

Reward = fraction of test cases passed (0.0 when no program can be extracted), None when the sample has no
tests. Test formats accepted in the tests column (default column name "tests"):
  - a list of assert strings, or one string of code with top-level asserts (each assert is one case; the
    other statements -- imports, helpers -- run before every case); a string without any top-level assert
    (e.g. HumanEval's `check(candidate)`) is a single case
  - stdin/stdout pairs: {"inputs": [...], "outputs": [...]} (APPS / TACO), or a list of
    {"input": ..., "output": ...} (LiveCodeBench "stdin" tests); lists of lines are joined with newlines
  - call-based: {"fn_name": "f", "inputs": [[args...], ...], "outputs": [...]} (APPS / TACO) calls f(*args)
    (or Solution().f(*args)) and compares the JSON-normalised result, also accepting [result] == output
  - {"test": code, "entry_point": "f"} (HumanEval): runs the test code, then check(f)
  - any of the above as a JSON string
Stdout is compared line by line ignoring trailing whitespace, else token by token with a float tolerance.
"""
from __future__ import annotations

import ast
import json
import re
import threading
from typing import Any

from .protocol import column, completion_text
from .sandbox import Program, Sandbox, SandboxConfig

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*)$", re.DOTALL | re.IGNORECASE)


def extract_program(text: str) -> str:
    """The last ```python block (```py, ```python3 too); else the last untagged block; else an unclosed
    trailing ```python block (a truncated generation); else the whole completion."""
    blocks = _FENCE.findall(text)
    tagged = [code for lang, code in blocks if lang.strip().lower() in ("python", "py", "python3")]
    if tagged:
        return tagged[-1]
    untagged = [code for lang, code in blocks if not lang.strip()]
    if untagged:
        return untagged[-1]
    tail = _OPEN_FENCE.search(text)
    return tail.group(1) if tail else text


def _lines(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _split_asserts(code: str) -> tuple[str, list[dict]]:
    """(setup, cases): each top-level assert is a case; everything else is setup run before each case."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "", [{"code": code}]
    asserts = [n for n in tree.body if isinstance(n, ast.Assert)]
    if not asserts:
        return "", [{"code": code}]
    setup = [ast.get_source_segment(code, n) for n in tree.body if not isinstance(n, ast.Assert)]
    return "\n".join(s for s in setup if s), [{"code": ast.get_source_segment(code, n)} for n in asserts]


_CALL_SETUP = '''
def __tracerl_call(name, args):
    fn = globals().get(name)
    if fn is None and "Solution" in globals():
        fn = getattr(globals()["Solution"](), name)
    return fn(*args)
def __tracerl_same(got, want):
    import json
    try:
        got = json.loads(json.dumps(got))
    except (TypeError, ValueError):
        pass
    return got == want or [got] == want
'''


def _call_cases(fn_name: str, inputs: list, outputs: list) -> tuple[str, list[dict]]:
    cases = []
    load = "__import__('json').loads({!r})"
    for args, want in zip(inputs, outputs):
        args = args if isinstance(args, list) else [args]
        call = f"__tracerl_call({fn_name!r}, {load.format(json.dumps(args))})"
        cases.append({"code": f"assert __tracerl_same({call}, {load.format(json.dumps(want))})"})
    return _CALL_SETUP, cases


def _parse_dict(tests: dict, fn_name: str | None) -> tuple[str, str, list[dict]]:
    if "test" in tests and "entry_point" in tests:
        return "assert", "", [{"code": f"{tests['test']}\ncheck({tests['entry_point']})"}]
    inputs = tests.get("inputs", tests.get("input"))
    outputs = tests.get("outputs", tests.get("output"))
    if inputs is None or outputs is None or len(inputs) != len(outputs):
        raise ValueError("stdin/stdout tests need 'inputs' and 'outputs' lists of the same length")
    name = tests.get("fn_name") or fn_name
    if name:
        setup, cases = _call_cases(name, list(inputs), list(outputs))
        return "assert", setup, cases
    return "stdio", "", [{"input": _lines(i), "expected": _lines(o)} for i, o in zip(inputs, outputs)]


def parse_tests(tests: Any, fn_name: str | None = None) -> tuple[str, str, list[dict]] | None:
    """(mode, setup, cases) for one sample's tests, or None when there are none. See module docstring."""
    if tests is None or (hasattr(tests, "__len__") and len(tests) == 0):
        return None
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped[:1] in ("{", "["):
            try:
                return parse_tests(json.loads(stripped), fn_name)
            except ValueError:
                pass
        setup, cases = _split_asserts(tests)
        return "assert", setup, cases
    if isinstance(tests, dict):
        return _parse_dict(tests, fn_name)
    tests = list(tests)
    if all(isinstance(t, str) for t in tests):
        return "assert", "", [{"code": t} for t in tests]
    if all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
        if any(t.get("testtype", "stdin") != "stdin" for t in tests):
            raise ValueError("functional (call-based) LiveCodeBench tests are not supported; use the "
                             "{'fn_name', 'inputs', 'outputs'} form")
        return "stdio", "", [{"input": _lines(t["input"]), "expected": _lines(t["output"])} for t in tests]
    raise ValueError(f"unrecognised tests format: {str(tests)[:200]}")


class CodeReward:
    """Fraction of a sample's tests its program passes, run in the sandbox (reward_models.sandbox).

    Options: tests_column ("tests"), timeout_s (per test case, 5), num_workers (parallel programs,
    default 2 x cores), max_program_chars (longer programs score 0), plus any SandboxConfig field
    (memory_mb, max_procs, ...). The sandbox pool starts on first use and is shared by all calls.
    """

    __name__ = "code"

    def __init__(self, tests_column: str = "tests", timeout_s: float = 5.0, num_workers: int | None = None,
                 max_program_chars: int = 100_000, **sandbox_options: Any) -> None:
        self.tests_column = tests_column
        self.config = SandboxConfig(timeout_s=timeout_s, **sandbox_options)
        self.num_workers = num_workers
        self.max_program_chars = max_program_chars
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.config, self.num_workers)
            return self._sandbox

    @property
    def required_columns(self) -> list[list[str]]:
        """The dataset columns it reads (each a list of alternatives), checked before a run starts."""
        return [[self.tests_column]]

    def programs(self, completions: list, kwargs: dict) -> tuple[list[float | None], dict[int, Program]]:
        """Initial rewards (None: no tests, 0.0: no usable program) and the programs to run, by index."""
        tests = column(kwargs, [self.tests_column], "code", len(completions))
        fn_names = kwargs.get("fn_name") or [None] * len(completions)
        rewards: list[float | None] = [None] * len(completions)
        todo: dict[int, Program] = {}
        for i, (completion, sample_tests) in enumerate(zip(completions, tests)):
            parsed = parse_tests(sample_tests, fn_names[i])
            if parsed is None:
                continue
            mode, setup, cases = parsed
            source = extract_program(completion_text(completion))
            rewards[i] = 0.0
            if source.strip() and len(source) <= self.max_program_chars:
                todo[i] = Program(source, mode, cases, setup)
        return rewards, todo

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        rewards, todo = self.programs(completions, kwargs)
        for i, result in zip(todo, self.sandbox.run_many(list(todo.values()))):
            rewards[i] = result.fraction
        return rewards

    def close(self) -> None:
        with self._lock:
            if self._sandbox is not None:
                self._sandbox.close()
                self._sandbox = None
