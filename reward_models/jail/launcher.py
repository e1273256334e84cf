"""Sandbox launcher: runs programs for the trusted side (reward_models.sandbox), one job at a time.

Standard library only (see jail/__init__.py). Runs as the trusted side's user (root in CI). Per job:
  launcher (root)       take a private uid (flock), create the run's cgroups and work dir, enter a new PID
                        namespace, fork, wait with a deadline, then kill leftovers and remove cgroups/work dir
    init (pid 1 in the new PID namespace when available)
                        join the cgroups, enter network/mount/IPC/UTS namespaces, make the file system
                        read-only except a tmpfs work dir, set rlimits, import the modules the program needs,
                        drop to the sandbox uid, no_new_privs, seccomp, then run the harness (which forks one
                        child per test case)
Output lines: {"type": "uid"}, {"type": "setup", ...isolation...}, one per case, {"type": "exit", ...}.
`launcher.py --serve MODULES` is the fork server the trusted side uses (length-prefixed JSON jobs on stdin,
a {"type": "done"} line after each); `launcher.py < job.json` runs one job (debugging);
`launcher.py --cleanup UID` kills and removes whatever a killed launcher of that uid left behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

# -I leaves the script's folder off sys.path; this folder is part of the installed (trusted) package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cgroups  # noqa: E402
import fs  # noqa: E402
import harness  # noqa: E402
import linuxsys as ls  # noqa: E402

FATAL = 70  # exit status meaning "the sandbox itself failed" (not the program)
WORKDIR_PREFIX = "tracerl-sandbox-"
_NS = {"net": ls.CLONE_NEWNET, "mount": ls.CLONE_NEWNS, "pid": ls.CLONE_NEWPID, "ipc": ls.CLONE_NEWIPC,
       "uts": ls.CLONE_NEWUTS}


def _emit(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def _unshare(names: tuple[str, ...]) -> set[str]:
    """Enter as many of the named namespaces as this kernel/container allows; returns those entered.

    The launcher enters only the PID namespace (which applies to its children: the init becomes pid 1) and
    the init enters the others, so the launcher keeps the host's mounts for its cleanup.
    """
    flags = sum(_NS[n] for n in names)
    if os.geteuid() != 0 and "pid" in names:  # unprivileged: a user namespace grants the rest, if permitted
        uid, gid = os.getuid(), os.getgid()
        try:
            ls.unshare(ls.CLONE_NEWUSER | flags)
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            return set(names) | {"user"}
        except OSError:
            return set()
    try:
        ls.unshare(flags)
        return set(names)
    except OSError:
        got = set()
        for name in names:
            try:
                ls.unshare(_NS[name])
                got.add(name)
            except OSError:
                pass
        return got


def _preload(modules: list[str]) -> list[str]:
    """Import (as the launcher's user) the standard-library modules the program uses.

    Why: after the privilege drop the sandbox uid may be unable to read the interpreter's library (here it
    lives under /root); the forked test processes inherit modules already in memory.
    """
    failed = []
    for name in modules:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a missing module fails the program later, with its own traceback
            failed.append(name)
    return failed


def _drop_privileges(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("privilege drop did not take effect")
    ls.prctl(ls.PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it: die with the launcher
    ls.prctl(ls.PR_SET_DUMPABLE, 0)  # no ptrace or /proc/<pid>/fd access to the harness from the cases
    ls.prctl(ls.PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, sudo) no longer grant anything


def _isolate(job: dict, ns: set[str], cg: dict, workdir: str, host_mnt_ns: str) -> dict:
    """The init's set-up, as root: everything before the privilege drop. Returns the isolation report."""
    opts = job["sandbox"]
    uid = opts["uid"]
    info: dict = {"type": "setup", "cgroups": sorted(cg)}
    if opts.get("lock_fd") is not None:
        os.close(opts["lock_fd"])  # the launcher alone keeps the uid lock
    cgroups.join(cg)
    # Orphans of the test processes come to us (and get reaped) rather than to the host's init.
    ls.prctl(ls.PR_SET_CHILD_SUBREAPER, 1)
    if opts["namespaces"] and os.geteuid() == 0:  # in a user namespace we are root here too
        ns = ns | _unshare(("net", "mount", "ipc", "uts"))
    info["namespaces"] = sorted(ns)
    info["pid1"] = os.getpid() == 1
    if "mount" in ns:
        info.update(fs.contain(workdir, uid, opts["disk_bytes"], host_mnt_ns, info["pid1"]))
    os.chdir(workdir)
    if uid is not None:  # RLIMIT_NPROC counts every process of the real uid, so only for a private uid
        resource.setrlimit(resource.RLIMIT_NPROC, (opts["max_procs"] + 1,) * 2)  # +1: this init process
    resource.setrlimit(resource.RLIMIT_NOFILE, (opts["open_files"],) * 2)
    info["preload_failed"] = _preload(job.get("preload", []))
    return info


def _init(job: dict, ns: set[str], cg: dict, workdir: str, host_mnt_ns: str) -> None:
    """Body of the sandbox's init process. Never returns."""
    opts = job["sandbox"]
    try:
        info = _isolate(job, ns, cg, workdir, host_mnt_ns)
        _drop_privileges(opts["uid"])
        info["uid"] = os.getuid()
        info["seccomp"] = False
        if opts["seccomp"]:
            try:
                ls.install_seccomp(allow_unix_sockets="net" in info["namespaces"])
                info["seccomp"] = True
            except OSError as e:
                info["seccomp_error"] = str(e)
        info["python_socket_block"] = "net" not in info["namespaces"] and not info["seccomp"]
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                           "LANG": "C.UTF-8"})
        _emit(info)
        harness.run_cases(job, 1, info["python_socket_block"], own_pid_namespace=info["pid1"])
        os._exit(0)
    except BaseException:  # noqa: BLE001 - any setup failure must be reported, never run the program anyway
        _emit({"type": "fatal", "error": traceback.format_exc(limit=5)})
        os._exit(FATAL)


def _wait(pid: int, timeout_s: float) -> tuple[int, bool]:
    """waitpid with a wall-clock deadline; on expiry SIGKILL the init (which ends its PID namespace)."""
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout_s)
    os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, not ready


def kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) as that uid): reaches programs that left every process group.

    Only used where no PID namespace contains the run; safe because the uid belongs to this run alone.
    """
    if uid < 1000:
        raise ValueError(f"refusing to kill the processes of uid {uid}: not a sandbox uid")
    for _ in range(3):  # a fork bomb may race the first pass
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _remove_workdir(path: str) -> None:
    """Remove a work dir this launcher made: only ever <tempdir>/tracerl-sandbox-*, checked, never a symlink."""
    parent, name = os.path.split(os.path.abspath(path))
    if parent != os.path.abspath(tempfile.gettempdir()) or not name.startswith(WORKDIR_PREFIX) \
            or os.path.islink(path):
        raise ValueError(f"refusing to remove {path}: not a sandbox work directory")
    shutil.rmtree(path, ignore_errors=True)


def cleanup(uid: int | None, cg: dict, ns: set[str], workdir: str | None) -> None:
    for d in cg.values():
        cgroups.cleanup_dir(d)
    if uid is not None and "pid" not in ns:
        kill_uid(uid)
    if uid is not None:  # a no-op when the init had its own mount namespace
        fs.remove_owned_files(uid)
    if workdir:
        _remove_workdir(workdir)


def _workdir_path(uid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"{WORKDIR_PREFIX}{uid}")


def _make_workdir(uid: int | None) -> str:
    if uid is None:
        return tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    path = _workdir_path(uid)
    os.mkdir(path, 0o700)
    os.chown(path, uid, uid)
    return path


def acquire_uid(lock_dir: str, base: int, count: int) -> tuple[int, int]:
    """A private uid for this run, exclusive across threads and processes: flock on <lock_dir>/<uid>.lock.

    The lock lives as long as this launcher, i.e. until its cleanup is done.
    """
    if base < 1000:
        raise ValueError(f"sandbox uids must be >= 1000, got {base}")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    start = int.from_bytes(os.urandom(2), "big") % count
    for _ in range(60000):  # ~10 minutes of 10 ms retries when every uid is busy
        for k in range(count):
            uid = base + (start + k) % count
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return uid, fd
            except OSError:
                os.close(fd)
        time.sleep(0.01)
    raise RuntimeError(f"no free sandbox uid in {base}..{base + count - 1}")


def run(job: dict) -> int:
    opts = job["sandbox"]
    uid = lock_fd = None
    if os.geteuid() == 0:  # as root, programs always run as a private unprivileged uid
        uid, lock_fd = acquire_uid(opts["lock_dir"], opts["uid_base"], opts["uid_count"])
        _emit({"type": "uid", "uid": uid})
        if os.path.exists(_workdir_path(uid)):  # the last holder of this uid was killed before its cleanup
            cleanup(uid, cgroups.run_dirs(uid), set(), _workdir_path(uid))
    opts["uid"], opts["lock_fd"] = uid, lock_fd
    workdir = _make_workdir(uid)
    cg = {}
    if uid is not None and opts["cgroups"]:
        cg = cgroups.create(uid, opts["max_procs"] + 1, opts["memory_cgroup_bytes"])
    host_mnt_ns = os.readlink("/proc/self/ns/mnt")
    ns = _unshare(("pid",)) if opts["namespaces"] else set()
    pid = os.fork()
    if pid == 0:
        _init(job, ns, cg, workdir, host_mnt_ns)
    status, timed_out = _wait(pid, opts["total_timeout_s"])
    cleanup(uid, cg, ns, workdir)
    _emit({"type": "exit", "timed_out": timed_out, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status)
           else None, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})
    return 0


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return b""
        buf.extend(chunk)
    return bytes(buf)


def _run_forked(job: dict) -> int:
    """One job in a fresh child of the server (single-threaded, so fork is safe); returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = FATAL
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the job pipe stays with the server
            code = run(job)
        except BaseException:  # noqa: BLE001
            _emit({"type": "fatal", "error": traceback.format_exc(limit=5)})
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def serve(preload: list[str]) -> int:
    """Fork server: read length-prefixed JSON jobs on stdin, run each in a forked child, then print done.

    Why: a fresh interpreter per program costs ~25 ms of CPU in start-up and imports; a fork costs ~1 ms.
    """
    _preload(preload)
    while True:
        header = _read_exact(0, 4)
        if not header:
            return 0
        job = json.loads(_read_exact(0, int.from_bytes(header, "big")))
        status = _run_forked(job)
        _emit({"type": "done", "status": status})


def main() -> int:
    if sys.argv[1:2] == ["--cleanup"]:
        uid = int(sys.argv[2])
        cleanup(uid, cgroups.run_dirs(uid), set(), _workdir_path(uid))
        return 0
    if sys.argv[1:2] == ["--serve"]:
        return serve([m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else [])
    try:  # one job on stdin (debugging: python -I -S launcher.py < job.json)
        job = json.loads(sys.stdin.buffer.read())
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        return run(job)
    except BaseException:  # noqa: BLE001
        _emit({"type": "fatal", "error": traceback.format_exc(limit=5)})
        return FATAL


if __name__ == "__main__":
    sys.exit(main())
