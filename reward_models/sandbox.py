"""Trusted side of the code sandbox: configuration, a worker pool and result parsing.

Each worker thread talks to its own fork server (`python -I -S reward_models/jail/launcher.py --serve`,
see that file for the isolation sequence). This module never forks a Python process itself (it is called
from threads); it starts the servers with subprocess (thread-safe: no preexec_fn) and reads JSON lines.
What the sandbox protects against, and what it does not: docs/rewards.md, "Code sandbox".
"""
from __future__ import annotations

import ast
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from reward_models.jail.harness import HEAD, outputs_match  # standard library only: safe on this side too

logger = logging.getLogger(__name__)
LAUNCHER = Path(__file__).resolve().parent / "jail" / "launcher.py"
# Imported before the privilege drop so the cases can use them even where the sandbox uid cannot read the
# interpreter's library; every standard-library module the program imports is added per program.
DEFAULT_PRELOAD = ("math", "collections", "itertools", "functools", "heapq", "bisect", "re", "string")
_NEVER_PRELOAD = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc",
                  "ensurepip", "venv", "lib2to3", "test", "__main__"}
LAYERS = ("uid", "netns", "pidns", "mountns", "readonly_root", "cgroup_pids", "cgroup_memory", "seccomp")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): the result would be meaningless, so nothing is scored."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program. Times in seconds; sizes in MiB unless named otherwise."""

    timeout_s: float = 5.0  # wall clock per test case
    total_timeout_s: float | None = None  # wall clock per program; None: timeout_s * cases + 2, at most 120
    # CPU seconds per test case (RLIMIT_CPU). None: timeout_s + 1, so a busy loop always ends as "timeout" on the
    # wall clock (equal limits raced: SIGXCPU could win and report "killed"); the CPU limit is the backstop for
    # programs that burn several cores at once.
    cpu_s: float | None = None
    memory_mb: int = 1024  # address space per process (RLIMIT_AS) and RAM of the whole run (memory cgroup)
    file_size_mb: int = 16  # largest file a program may write (RLIMIT_FSIZE)
    disk_mb: int = 64  # size of the tmpfs work directory (with a mount namespace)
    max_procs: int = 16  # processes + threads at once (pids cgroup and RLIMIT_NPROC of the private uid)
    max_output_kb: int = 1024  # stdout kept per case (at least 4x the expected output)
    open_files: int = 64  # RLIMIT_NOFILE
    uid_base: int = 64000  # private uids uid_base .. uid_base + uid_count - 1, one per running program
    uid_count: int = 256
    namespaces: bool = True  # network, PID, mount, IPC and UTS namespaces where the kernel allows
    cgroups: bool = True  # per-run pids and memory cgroups where /sys/fs/cgroup is writable
    seccomp: bool = True  # deny socket() (and a list of dangerous syscalls) in the kernel
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    require: tuple[str, ...] = ()  # layers from LAYERS that must be active, else SandboxError

    def __post_init__(self) -> None:
        unknown = set(self.require) - set(LAYERS)
        if unknown:
            raise ValueError(f"SandboxConfig.require: unknown layers {sorted(unknown)}; choose from {LAYERS}")
        if self.uid_base < 1000:
            raise ValueError(f"SandboxConfig.uid_base must be >= 1000 (an unprivileged uid), got {self.uid_base}")


@dataclass
class Program:
    """A program and its cases. mode "stdio": cases are {"input", "expected"}; "assert": {"code"}."""

    source: str
    mode: str
    cases: list[dict]
    setup: str = ""  # assert mode: code run after the program, before each case's asserts
    preload: tuple[str, ...] = ()  # more modules to import before the privilege drop (stdlib imports found
    #                                in the source are added automatically)


@dataclass
class CaseResult:
    status: str  # pass | fail | error | timeout | killed | output_limit | not_run
    exit: int | None = None
    signal: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""


@dataclass
class RunResult:
    cases: list[CaseResult]
    isolation: dict = field(default_factory=dict)
    timed_out: bool = False

    @property
    def passed(self) -> int:
        return sum(c.status == "pass" for c in self.cases)

    @property
    def fraction(self) -> float:
        return self.passed / len(self.cases) if self.cases else 0.0


def active_layers(setup: dict) -> set[str]:
    """Translate the launcher's setup report into LAYERS names."""
    ns = set(setup.get("namespaces", []))
    layers = {f"{n}ns" for n in ("net", "pid", "mount") if n in ns}
    layers |= {f"cgroup_{c}" for c in setup.get("cgroups", [])}
    if setup.get("uid", 0) != 0 and "user" not in ns:
        layers.add("uid")
    if setup.get("readonly_root"):
        layers.add("readonly_root")
    if setup.get("seccomp"):
        layers.add("seccomp")
    return layers


def stdlib_imports(*sources: str) -> tuple[str, ...]:
    """Standard-library modules the sources import (the sandbox imports them before dropping privileges)."""
    names: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return tuple(sorted(n for n in names if n.split(".")[0] in sys.stdlib_module_names
                        and n.split(".")[0] not in _NEVER_PRELOAD))


def _lock_dir() -> str:
    return "/run/tracerl-sandbox" if os.access("/run", os.W_OK) else \
        os.path.join(tempfile.gettempdir(), "tracerl-sandbox-locks")


def _job(program: Program, config: SandboxConfig) -> dict:
    n = len(program.cases)
    total = config.total_timeout_s or min(config.timeout_s * n + 2.0, 120.0)
    mib = 1 << 20
    code = [program.source, program.setup] + [c.get("code", "") for c in program.cases]
    # the expected output of a stdio case stays here: whatever enters the sandbox, the program can read
    cases = program.cases if program.mode != "stdio" else [
        {"input": c.get("input", ""), "expected_bytes": len(str(c.get("expected", "")).encode())}
        for c in program.cases]
    return {
        "program": program.source,
        "mode": program.mode,
        "cases": cases,
        "setup": program.setup,
        "preload": sorted(set(config.preload) | set(program.preload) | set(stdlib_imports(*code))),
        "limits": {
            "case_timeout_s": config.timeout_s,
            "cpu_s": config.cpu_s or config.timeout_s + 1.0,
            "memory_bytes": config.memory_mb * mib,
            "file_bytes": config.file_size_mb * mib,
            "max_output_bytes": config.max_output_kb * 1024,
        },
        "sandbox": {
            "uid_base": config.uid_base,
            "uid_count": config.uid_count,
            "lock_dir": _lock_dir(),
            "namespaces": config.namespaces,
            "cgroups": config.cgroups,
            "seccomp": config.seccomp,
            "disk_bytes": config.disk_mb * mib,
            "max_procs": config.max_procs,
            "open_files": config.open_files,
            # the run's RAM: its processes, plus the tmpfs work dir and /dev/shm, which are charged to it
            "memory_cgroup_bytes": (config.memory_mb + config.disk_mb + 16 + 64) * mib,
            "total_timeout_s": total,
        },
    }


def _parse(lines: list[dict], program: Program, backstop: bool) -> RunResult:
    n_cases = len(program.cases)
    fatal = [ln for ln in lines if ln.get("type") == "fatal"]
    setup = next((ln for ln in lines if ln.get("type") == "setup"), None)
    exit_line = next((ln for ln in lines if ln.get("type") == "exit"), None)
    if fatal or (setup is None and not backstop):
        detail = fatal[0]["error"] if fatal else "no set-up report"
        raise SandboxError(f"the sandbox launcher failed before running the program:\n{detail}")
    timed_out = backstop or bool(exit_line and exit_line.get("timed_out"))
    cases = [CaseResult("timeout" if timed_out else "not_run") for _ in range(n_cases)]
    for ln in lines:
        if ln.get("type") is None and "case" in ln and 0 <= ln["case"] < n_cases:
            i = ln["case"]
            status = ln["status"]
            if status == "ran":  # a stdio case that exited cleanly: its output is compared here, not inside
                status = "pass" if outputs_match(ln["stdout"], str(program.cases[i].get("expected", ""))) else "fail"
            cases[i] = CaseResult(status, ln["exit"], ln["signal"], ln["seconds"], ln["stdout"][:HEAD], ln["stderr"])
    if not timed_out and any(c.status == "not_run" for c in cases):
        # the set-up was reported, so the harness ran and then died mid-run: without a PID namespace the program
        # can kill it (same uid). Its cases count as killed; a run is never stopped by what a program did.
        logger.warning("the sandbox harness stopped without reporting every case (%s); the cases it did not "
                       "report count as killed", exit_line)
        cases = [CaseResult("killed", stderr="the sandbox harness was stopped during the run") if c.status ==
                 "not_run" else c for c in cases]
    return RunResult(cases=cases, isolation=setup or {}, timed_out=timed_out)


class _ForkServer:
    """One `launcher.py --serve` process, used by one thread at a time: jobs in, JSON lines out.

    Started with env={} (nothing from this process's environment, e.g. API keys, reaches a program) and in
    its own session, so a stuck run can be killed as a whole with killpg.
    """

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.cmd = [sys.executable, "-I", "-S", str(LAUNCHER)]
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd + ["--serve", ",".join(preload)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env={}, cwd="/",
                                     start_new_session=True, close_fds=True)
        self.buf = b""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")[-2000:]

    def run(self, job: dict, deadline_s: float) -> tuple[list[dict], bool]:
        """Send one job; collect its lines up to the server's "done". Returns (lines, killed_by_backstop)."""
        data = json.dumps(job).encode()
        try:
            self.proc.stdin.write(len(data).to_bytes(4, "big") + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise SandboxError(f"the sandbox server died:\n{self._stderr_text()}") from None
        lines: list[dict] = []
        deadline = time.monotonic() + deadline_s
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = json.loads(raw)
                if line.get("type") == "done":
                    return lines, False
                lines.append(line)
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                self._kill(lines)
                return lines, True
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SandboxError(f"the sandbox server exited unexpectedly:\n{self._stderr_text()}")
            self.buf += chunk

    def _kill(self, lines: list[dict]) -> None:
        """Backstop: the launcher enforces every deadline itself, so it is stuck. Kill it and clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        uid = next((ln["uid"] for ln in lines if ln.get("type") == "uid"), None)
        if uid is not None:
            subprocess.run(self.cmd + ["--cleanup", str(uid)], env={}, cwd="/", timeout=60, check=False)

    def close(self) -> None:
        if self.alive:
            self.proc.stdin.close()  # the server exits at end of input
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stderr.close()


class Sandbox:
    """Runs programs in parallel (`num_workers` at a time), each fully isolated. Thread-safe.

    >>> with Sandbox(SandboxConfig(timeout_s=2), num_workers=2) as sb:
    ...     sb.run(Program("print(int(input()) * 2)", "stdio", [{"input": "21", "expected": "42"}])).fraction
    1.0
    """

    _warned_layers: set = set()

    def __init__(self, config: SandboxConfig | None = None, num_workers: int | None = None) -> None:
        self.config = config or SandboxConfig()
        # Twice the cores: part of each run is waiting on the kernel (cgroup moves, process exit).
        self.num_workers = num_workers or 2 * (os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sandbox")
        self._local = threading.local()
        self._servers: list[_ForkServer] = []
        self._lock = threading.Lock()

    def _server(self) -> _ForkServer:
        server = getattr(self._local, "server", None)
        if server is None or not server.alive:
            server = _ForkServer(self.config.preload)
            with self._lock:
                self._servers.append(server)
            self._local.server = server
        return server

    def run(self, program: Program) -> RunResult:
        """Run one program against its cases (blocks; safe to call from many threads)."""
        if not program.cases:
            return RunResult(cases=[])
        job = _job(program, self.config)
        lines, backstop = self._server().run(job, job["sandbox"]["total_timeout_s"] + 10)
        result = _parse(lines, program, backstop)
        self._check_layers(result.isolation)
        return result

    def run_many(self, programs: Iterable[Program]) -> list[RunResult]:
        """Run programs on the pool; results in input order."""
        return list(self._executor.map(self.run, programs))

    def _check_layers(self, setup: dict) -> None:
        active = active_layers(setup)
        missing = [layer for layer in self.config.require if layer not in active]
        if missing:
            raise SandboxError(f"sandbox layers required by SandboxConfig.require are not active here: {missing}")
        wanted = {"uid", "netns", "pidns", "mountns", "readonly_root", "seccomp"}
        if self.config.cgroups:
            wanted |= {"cgroup_pids", "cgroup_memory"}
        if not self.config.namespaces:
            wanted -= {"netns", "pidns", "mountns", "readonly_root"}
        absent = tuple(sorted(wanted - active))
        if absent and absent not in Sandbox._warned_layers:
            Sandbox._warned_layers.add(absent)
            logger.warning("code sandbox: these isolation layers are not available here and are replaced by "
                           "fallbacks (see docs/rewards.md): %s", ", ".join(absent))

    def close(self, wait: bool = True) -> None:
        """Stop the pool and its fork servers (each exits when its job pipe closes)."""
        self._executor.shutdown(wait=wait)
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(wait=False)  # may run on a pool thread: never wait for the pool here
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def probe(config: SandboxConfig | None = None) -> dict:
    """Run a trivial program and report which isolation layers work in this container."""
    with Sandbox(config, num_workers=1) as sb:
        result = sb.run(Program("print(1)", "stdio", [{"input": "", "expected": "1"}]))
    return {"layers": sorted(active_layers(result.isolation)), "setup": result.isolation,
            "ok": result.fraction == 1.0}
