"""Runs a program against its test cases, one forked process per case, inside the sandbox.

Standard library only (see jail/__init__.py). The harness itself runs no untrusted code: each case forks a
child that redirects its file descriptors, applies the per-process limits and only then executes the
program. It reports one JSON line per case on fd 1, which the child does not hold. A forked child holds a copy
of the harness's memory, so nothing secret may be in it: stdio cases arrive without their expected output (the
trusted side, reward_models/sandbox.py, compares the full stdout the harness reports). Assert-style cases pass
only if the child writes a per-case random nonce to a private pipe after the asserts ran, so a crash or a plain
`os._exit(0)` cannot pass a case; but the nonce is in the child's memory, and a program that looks for it (two
lines of frame introspection) can fake a pass: a reward-integrity limit, not a host-safety one (docs/rewards.md).
The harness ignores SIGINT / SIGTERM (a program can signal it: same uid), survives a failed fork, and in its own
PID namespace kills everything a case left running before the next case starts.
"""
from __future__ import annotations

import builtins
import io
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback
import types

HEAD = 2000  # characters of stdout/stderr kept in a case report (diagnostics only)


# --- output comparison (also used by the trusted side's tests) -------------------------------------------
def _tokens_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)


def outputs_match(got: str, expected: str) -> bool:
    """Line-wise equality after trimming trailing whitespace; else token-wise with float tolerance 1e-6."""
    norm = lambda s: [ln.rstrip() for ln in s.strip().splitlines()]  # noqa: E731
    if norm(got) == norm(expected):
        return True
    g, e = got.split(), expected.split()
    return len(g) == len(e) and all(_tokens_equal(a, b) for a, b in zip(g, e))


# --- the child: limits, fds, then the untrusted program --------------------------------------------------
def _block_python_sockets() -> None:
    """Last-resort network block when neither a network namespace nor seccomp is available."""
    import _socket
    import socket

    def blocked(*_a, **_k):
        raise PermissionError("network access is disabled in the sandbox")

    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, blocked)


def _child_setup(fds: dict[str, int], limits: dict, block_sockets: bool) -> None:
    os.setpgid(0, 0)  # its own group, so a timeout kills the case's helpers too
    os.dup2(fds["stdin"], 0)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    keep = 3
    if "marker" in fds:
        os.dup2(fds["marker"], 3)
        keep = 4
    os.closerange(keep, 65536)  # close_range(2): cheap
    cpu = int(math.ceil(limits["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the harness ignores them; the program gets the defaults
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdin = sys.__stdin__ = open(0, "r", closefd=False, encoding="utf-8", errors="replace")
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False, encoding="utf-8", errors="replace")
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.argv = ["main.py"]
    builtins.exit = builtins.quit = sys.exit  # -S skips site.py, which defines these
    if block_sockets:
        _block_python_sockets()


def _child(job: dict, case: dict, fds: dict[str, int], nonce: bytes, block_sockets: bool) -> None:
    """Never returns. Exit codes: 0 ok, 1 uncaught exception, n from sys.exit(n)."""
    code = 1
    try:
        _child_setup(fds, job["limits"], block_sockets)
        name = "__main__" if job["mode"] == "stdio" else "solution"
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(compile(job["program"], "main.py", "exec"), module.__dict__)
        if job["mode"] == "assert":
            source = job.get("setup", "") + "\n" + case["code"]
            exec(compile(source, "test.py", "exec"), module.__dict__)
            os.write(3, nonce)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report anything the program raised
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - a closed pipe must not change the verdict
            pass
        os._exit(code & 0xFF)


# --- the harness side ------------------------------------------------------------------------------------
def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _collect(pid: int, out_r: int, marker_r: int | None, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Read stdout and marker until the child exits (and its pipe drains) or the deadline passes."""
    out, marker, why = bytearray(), bytearray(), ""
    pidfd = os.pidfd_open(pid)
    open_fds = {out_r: out} | ({marker_r: marker} if marker_r is not None else {})
    exited_at = None
    try:
        while open_fds:
            now = time.monotonic()
            if now >= deadline:
                why = "timeout"
                break
            # Once the child is gone, give leftover holders of its pipe 50 ms, then stop reading.
            if exited_at is not None and now - exited_at > 0.05:
                break
            wait = min(deadline - now, 0.05) if exited_at is not None else deadline - now
            ready, _, _ = select.select(list(open_fds) + [pidfd], [], [], wait)
            if pidfd in ready and exited_at is None:
                exited_at = time.monotonic()
                _killpg(pid)  # stragglers in the case's process group
            for fd in ready:
                if fd == pidfd:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    del open_fds[fd]
                    continue
                open_fds[fd].extend(chunk)
                if len(out) > cap:
                    why = "output_limit"
                    open_fds.clear()
                    break
    finally:
        os.close(pidfd)
    return bytes(out), bytes(marker), why


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _verdict(job: dict, status: int, marker: bytes, nonce: bytes, why: str) -> str:
    """pass | fail | error | killed | timeout | output_limit; "ran" for a stdio case that exited cleanly, whose
    output the trusted side compares (the expected output never enters the sandbox)."""
    if why:
        return why
    if os.WIFSIGNALED(status):
        return "killed"  # CPU limit (SIGXCPU/SIGKILL), memory cgroup OOM, or a signal it sent itself
    if os.WEXITSTATUS(status) != 0:
        return "error"
    if job["mode"] == "assert":
        return "pass" if marker == nonce else "fail"
    return "ran"


def _not_started(error: OSError) -> dict:
    """A case whose process could not be forked: the previous case's leftovers hold every allowed pid (the
    program's doing: it counts against the program, not the sandbox)."""
    return {"status": "killed", "exit": None, "signal": None, "seconds": 0.0, "stdout": "",
            "stderr": f"the test process could not start ({error.strerror}): too many processes left running"}


def run_case(job: dict, case: dict, block_sockets: bool) -> dict:
    limits = job["limits"]
    fds = {"stdin": _memfd("stdin", case.get("input", "").encode()), "stderr": _memfd("stderr")}
    out_r, fds["stdout"] = os.pipe()
    marker_r = None
    nonce = os.urandom(16).hex().encode()
    if job["mode"] == "assert":
        marker_r, fds["marker"] = os.pipe()
    t0 = time.monotonic()
    try:
        pid = os.fork()
    except OSError as error:  # EAGAIN: the pids limit
        for fd in (*fds.values(), out_r, *([marker_r] if marker_r is not None else [])):
            os.close(fd)
        return _not_started(error)
    if pid == 0:
        _child(job, case, fds, nonce, block_sockets)
    for key in ("stdin", "stdout", "marker"):
        if key in fds:
            os.close(fds[key])
    cap = max(limits["max_output_bytes"], 4 * int(case.get("expected_bytes", 0)))
    out, marker, why = _collect(pid, out_r, marker_r, t0 + limits["case_timeout_s"], cap)
    _killpg(pid)
    if why:  # timed out or flooded stdout: the child itself may still run (it could have left its group)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - t0
    os.close(out_r)
    if marker_r is not None:
        os.close(marker_r)
    os.lseek(fds["stderr"], 0, os.SEEK_SET)
    err = os.read(fds["stderr"], 1 << 20)
    os.close(fds["stderr"])
    verdict = _verdict(job, status, marker, nonce, why)
    return {
        "status": verdict,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "seconds": round(seconds, 4),
        # the whole output (up to the cap) when the trusted side has to compare it, else its head
        "stdout": (out if verdict == "ran" else out[:HEAD]).decode("utf-8", "replace"),
        "stderr": err[-HEAD:].decode("utf-8", "replace"),
    }


def _reap_orphans() -> None:
    """The harness is a subreaper (or pid 1): collect orphaned zombies so they free their pids."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_leftovers() -> None:
    """In the harness's own PID namespace (it is pid 1 there): SIGKILL every other process, i.e. whatever a case
    left running (a setsid'd daemon escapes its process group), so the next case starts with every pid free.
    Never outside one: kill(-1) would reach every process of the user."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def run_cases(job: dict, out_fd: int, block_sockets: bool, own_pid_namespace: bool = False) -> None:
    """Run every case in order, writing one JSON line per case to out_fd."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a program can signal the harness (same uid): not fatal
        signal.signal(sig, signal.SIG_IGN)
    out = io.open(out_fd, "w", closefd=False, encoding="utf-8")
    for i, case in enumerate(job["cases"]):
        report = run_case(job, case, block_sockets)
        report["case"] = i
        out.write(json.dumps(report) + "\n")
        out.flush()
        if own_pid_namespace and os.getpid() == 1:
            _kill_leftovers()
        _reap_orphans()
