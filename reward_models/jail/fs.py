"""File-system containment: a private, size-limited, read-only-everywhere-else view of the host.

Standard library only (see jail/__init__.py). Used only inside a fresh mount namespace: every mount is
first made private (nothing propagates back to the host), then the run's work directory and /dev/shm get
small tmpfs mounts and every other mount is bind-remounted read-only. MS_REMOUNT is always combined with
MS_BIND, which changes the per-mount flag of *this namespace's copy* only -- never the host's superblock.
"""
from __future__ import annotations

import os
import shutil

import linuxsys as ls

_KEEP = {"nosuid": ls.MS_NOSUID, "nodev": ls.MS_NODEV, "noexec": ls.MS_NOEXEC, "noatime": ls.MS_NOATIME,
         "nodiratime": ls.MS_NODIRATIME, "relatime": ls.MS_RELATIME}


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return path.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def _mountinfo() -> list[tuple[str, int]]:
    """(mountpoint, flags to preserve on remount) for every mount visible to this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _KEEP.get(opt, 0)
            out.append((_unescape(fields[4]), flags))
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def contain(workdir: str, uid: int | None, disk_bytes: int, host_mnt_ns: str, new_proc: bool) -> dict:
    """Set up the private view; returns which parts worked. Refuses to run in the host's mount namespace."""
    if os.readlink("/proc/self/ns/mnt") == host_mnt_ns:
        raise RuntimeError("refusing to remount: not in a private mount namespace")
    ls.mount(None, "/", None, ls.MS_REC | ls.MS_PRIVATE)
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    ls.mount("tmpfs", workdir, "tmpfs", ls.MS_NOSUID | ls.MS_NODEV, f"size={disk_bytes},mode=0700{owner}")
    rw = [workdir]
    if os.path.isdir("/dev/shm"):
        ls.mount("tmpfs", "/dev/shm", "tmpfs", ls.MS_NOSUID | ls.MS_NODEV | ls.MS_NOEXEC, "size=16m,mode=1777")
        rw.append("/dev/shm")
    info = {"private_proc": False}
    if new_proc:  # a /proc that shows only this PID namespace (no host command lines)
        try:
            ls.mount("proc", "/proc", "proc", ls.MS_NOSUID | ls.MS_NODEV | ls.MS_NOEXEC)
            info["private_proc"] = True
        except OSError:
            pass
    failed = []
    for mountpoint, keep in _mountinfo():
        if any(_under(mountpoint, p) for p in rw) or _under(mountpoint, "/proc"):
            continue
        try:
            ls.mount(None, mountpoint, None, ls.MS_BIND | ls.MS_REMOUNT | ls.MS_RDONLY | keep)
        except OSError:
            failed.append(mountpoint)
    info["readonly_root"] = "/" not in failed
    info["readonly_failed"] = failed[:20]
    return info


def remove_owned_files(uid: int) -> None:
    """Fallback without a mount namespace: delete what `uid` left in the world-writable temp directories.

    Only entries *owned by the sandbox uid* are touched (never anything of root or another user), and only
    directly inside /tmp, /var/tmp and /dev/shm. Safe because each sandbox uid is used by one run at a time.
    """
    if uid < 1000:
        raise ValueError(f"refusing to remove files of uid {uid}: not a sandbox uid")
    for base in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # fd-based: never follows symlinks out
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
