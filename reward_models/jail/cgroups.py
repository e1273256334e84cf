"""Per-run cgroups: a pids limit (fork bombs) and a memory limit (RAM of all the run's processes together).

Standard library only (see jail/__init__.py). A run's cgroups are children of the launcher's *own* cgroups,
named after the run's sandbox uid (which the launcher holds an exclusive lock on), so the names are unique
and a crashed run's leftovers can be found and removed by name. Works with cgroup v1 (one hierarchy per
controller) and v2 (unified) where the controller is enabled for children; anything else is skipped and the
launcher reports it, so rlimits remain the only guard.
"""
from __future__ import annotations

import os
import signal
import time

PREFIX = "tracerl-sandbox-"


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root inside hierarchy, mountpoint, fstype, super options) for every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, rest = pre.split(), post.split()
            if rest and rest[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], rest[0], set(rest[2].split(",")) if len(rest) > 2 else set()))
    return out


def _own_dir(controller: str) -> str | None:
    """Directory of this process's cgroup for `controller`, or None if no writable hierarchy has it."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for root, mountpoint, fstype, opts in _mounts():
        for _, controllers, path in entries:
            v1 = fstype == "cgroup" and controller in controllers.split(",") and controller in opts
            v2 = fstype == "cgroup2" and controllers == ""
            if not (v1 or v2) or not path.startswith(root):
                continue
            d = os.path.join(mountpoint, path[len(root):].lstrip("/"))
            if v2:
                try:
                    with open(os.path.join(d, "cgroup.subtree_control")) as f:
                        if controller not in f.read().split():
                            continue
                except OSError:
                    continue
            if os.path.isdir(d) and os.access(d, os.W_OK):
                return d
    return None


def run_dirs(uid: int) -> dict[str, str]:
    """Paths (existing or not) of the per-run cgroups for `uid`, one per available controller."""
    dirs = {}
    for controller in ("pids", "memory"):
        own = _own_dir(controller)
        if own is not None:
            dirs[controller] = os.path.join(own, f"{PREFIX}{uid}")
    return dirs


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def create(uid: int, max_pids: int, memory_bytes: int) -> dict[str, str]:
    """Create the run's cgroups with their limits; returns {controller: dir} for those that worked."""
    made = {}
    for controller, d in run_dirs(uid).items():
        try:
            cleanup_dir(d)
            os.mkdir(d)
            if controller == "pids":
                _write(os.path.join(d, "pids.max"), str(max_pids))
            elif os.path.exists(os.path.join(d, "memory.limit_in_bytes")):  # v1
                _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
            else:  # v2
                _write(os.path.join(d, "memory.max"), str(memory_bytes))
                if os.path.exists(os.path.join(d, "memory.swap.max")):
                    _write(os.path.join(d, "memory.swap.max"), "0")
            made[controller] = d
        except OSError:
            cleanup_dir(d)
    return made


def join(dirs: dict[str, str]) -> None:
    """Move the calling process into every given cgroup ("0" means "myself", valid inside a PID namespace)."""
    for d in dirs.values():
        _write(os.path.join(d, "cgroup.procs"), "0")


def cleanup_dir(d: str) -> None:
    """SIGKILL everything left in cgroup `d`, then remove it (rmdir: only ever an empty cgroup directory)."""
    if not os.path.basename(d).startswith(PREFIX):
        raise ValueError(f"refusing to clean up {d}: not a sandbox cgroup")
    procs = os.path.join(d, "cgroup.procs")
    for _ in range(200):  # a fork bomb may still be forking: repeat until the group is empty
        try:
            with open(procs) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
    for _ in range(100):  # the kernel releases a group a moment after its last task is reaped
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
