"""`math` reward: 1.0 if the completion's final answer equals the `answer` column, else 0.0.

The predicted answer is the content of the last \\boxed{...} (nested braces handled), else the last
GSM8K-style `#### n`, else (with `pattern=`) the last match of a regex (its first group if it has one).
The gold answer is the `answer` column: a GSM8K solution ("... #### 72") is cut after `####`, a \\boxed{}
is unwrapped, anything else is used as is. Equality: normalised strings (whitespace, $, \\left/\\right,
\\text{}, thousands separators, trailing dot) or equal numbers first; otherwise Math-Verify
(`math_verify.parse` + `verify`, both wrapped in \\boxed{} so LaTeX and plain answers parse alike).

Math-Verify's timeouts use SIGALRM, which only works in a process's main thread, and some sympy inputs
never finish. Default isolation="process": Math-Verify runs in worker processes (their own main thread,
so its timeouts work) that the reward kills and restarts when an answer exceeds `timeout_s` (scored 0).
isolation="inline" calls it in the calling thread with its timeouts disabled (parsing_timeout=None,
timeout_seconds=None), safe in any thread but with no time bound beyond `max_answer_chars`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from .protocol import column, completion_text

logger = logging.getLogger(__name__)
WORKER = Path(__file__).resolve().parent / "math_worker.py"
_GSM8K = re.compile(r"####\s*([^\n#]+)")  # up to the end of the line or the next ####


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces; `\\boxed 5` gives "5"."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    if boxed < 0 and fbox < 0:
        return None
    i = boxed + len("\\boxed") if boxed > fbox else fbox + len("\\fbox")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # \boxed 5 (no braces): up to the next space or $
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the generation was cut off


def extract_answer(text: str, pattern: str | re.Pattern | None = None) -> str | None:
    if pattern is not None:
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.DOTALL)
        matches = list(regex.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0)).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm = _GSM8K.findall(text)
    return gsm[-1].strip() if gsm else None


def gold_answer(answer: Any) -> str:
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|!|,|;|:|displaystyle)", "", s)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _number(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def cheap_equal(pred: str, gold: str) -> bool:
    """Equality that needs no sympy: identical normalised strings, or equal exact numbers."""
    p, g = normalise(pred), normalise(gold)
    if p == g:
        return True
    x, y = _number(p), _number(g)
    return x is not None and x == y


class VerifierPool:
    """Math-Verify in `num_workers` worker processes; an answer taking over `timeout_s` is scored False and
    its worker is killed and restarted. Thread-safe (one batch at a time)."""

    def __init__(self, num_workers: int = 1, timeout_s: float = 5.0, cmd: list[str] | None = None) -> None:
        self.timeout_s = timeout_s
        self.cmd = cmd or [sys.executable, str(WORKER), str(timeout_s)]
        self.num_workers = num_workers
        self.workers: list[subprocess.Popen | None] = [None] * num_workers
        self.lock = threading.Lock()
        self.timeouts = 0
        self._warm: set[int] = set()  # pids of workers that have answered once (imports done)

    def _start(self, k: int) -> subprocess.Popen:
        if self.workers[k] is None or self.workers[k].poll() is not None:
            self.workers[k] = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self.workers[k]

    def _send(self, k: int, line: str) -> subprocess.Popen | None:
        """Write one request to worker k, restarting it once if it died since its last answer."""
        for _ in range(2):
            worker = self._start(k)
            try:
                worker.stdin.write(line)
                worker.stdin.flush()
                return worker
            except OSError:  # BrokenPipeError: the worker exited (killed, out of memory)
                self._kill(k)
        logger.warning("math reward: a Math-Verify worker could not be started; answer scored 0")
        return None

    def _kill(self, k: int) -> None:
        proc, self.workers[k] = self.workers[k], None
        if proc is not None:
            proc.kill()
            proc.wait()

    def verify_many(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """[(gold, pred)] -> [equal?], spread over the workers."""
        results = [False] * len(pairs)
        with self.lock:
            todo = list(range(len(pairs)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker -> (pair index, deadline)
            while todo or busy:
                for k in range(self.num_workers):
                    if k not in busy and todo:
                        i = todo.pop()
                        gold, pred = pairs[i]
                        worker = self._send(k, json.dumps({"gold": gold, "pred": pred}) + "\n")
                        if worker is None:
                            continue  # no worker would start: the answer stays unequal
                        startup = 0.0 if worker.pid in self._warm else 60.0  # first answer waits for imports
                        busy[k] = (i, time.monotonic() + self.timeout_s + startup)
                if busy:
                    self._collect(busy, results)
        return results

    def _collect(self, busy: dict[int, tuple[int, float]], results: list[bool]) -> None:
        fds = {self.workers[k].stdout.fileno(): k for k in busy}
        wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
        ready, _, _ = select.select(list(fds), [], [], wait)
        for fd in ready:
            k = fds[fd]
            line = self.workers[k].stdout.readline()
            i, _ = busy.pop(k)
            if line:
                results[i] = bool(json.loads(line)["ok"])
                self._warm.add(self.workers[k].pid)
            else:  # the worker died (e.g. out of memory): the answer counts as unequal
                self._kill(k)
        now = time.monotonic()
        for k, (i, deadline) in list(busy.items()):
            if now >= deadline:
                logger.warning("math reward: Math-Verify took over %.1fs on one answer; scored 0", self.timeout_s)
                self.timeouts += 1
                busy.pop(k)
                self._kill(k)

    def close(self) -> None:
        for k in range(self.num_workers):
            self._kill(k)


def _verify_inline(gold: str, pred: str) -> bool:
    from math_verify import parse, verify  # imported lazily: sympy takes ~2 s to import

    # it warns on every call that its timeouts are off; disabling them is the point of inline mode
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        return bool(verify(g, p, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - an answer Math-Verify cannot handle is not equal
        return False


class MathReward:
    """See the module docstring. Options: pattern, answer_column ("answer"), isolation ("process" |
    "inline"), timeout_s (5), num_workers (1), max_answer_chars (1000; longer answers get only the cheap
    comparison)."""

    __name__ = "math"

    def __init__(self, pattern: str | None = None, answer_column: str = "answer", isolation: str = "process",
                 timeout_s: float = 5.0, num_workers: int = 1, max_answer_chars: int = 1000) -> None:
        if isolation not in ("process", "inline"):
            raise ValueError(f"isolation must be 'process' or 'inline', got {isolation!r}")
        self.pattern = re.compile(pattern, re.DOTALL) if pattern else None
        self.answer_column, self.isolation = answer_column, isolation
        self.max_answer_chars = max_answer_chars
        # Without Math-Verify the cheap comparison (normalised strings, exact numbers) is the whole check.
        self.use_math_verify = importlib.util.find_spec("math_verify") is not None
        if not self.use_math_verify:
            logger.warning("math reward: math-verify is not installed; comparing normalised strings and exact "
                           "numbers only (pip install math-verify)")
        use_pool = isolation == "process" and self.use_math_verify
        self._pool = VerifierPool(num_workers, timeout_s) if use_pool else None

    @property
    def required_columns(self) -> list[list[str]]:
        """The dataset columns it reads (each a list of alternatives), checked before a run starts."""
        return [[self.answer_column]]

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        answers = column(kwargs, [self.answer_column], "math", len(completions))
        rewards: list[float | None] = [None] * len(completions)
        hard: dict[int, tuple[str, str]] = {}
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            if answer is None:
                continue
            pred = extract_answer(completion_text(completion), self.pattern)
            gold = gold_answer(answer)
            if pred is None:
                rewards[i] = 0.0
            elif cheap_equal(pred, gold):
                rewards[i] = 1.0
            elif not self.use_math_verify or max(len(pred), len(gold)) > self.max_answer_chars:
                rewards[i] = 0.0
            else:
                hard[i] = (f"\\boxed{{{gold}}}", f"\\boxed{{{pred}}}") if self._pool else (gold, pred)
        if self._pool is not None:
            verdicts = self._pool.verify_many(list(hard.values()))
        else:
            verdicts = [_verify_inline(g, p) for g, p in hard.values()]
        for i, ok in zip(hard, verdicts):
            rewards[i] = float(ok)
        return rewards

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
