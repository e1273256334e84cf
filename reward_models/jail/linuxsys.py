"""ctypes wrappers for the Linux calls Python 3.11 lacks: unshare, mount, prctl and a seccomp filter.

Standard library only (see jail/__init__.py). Every function raises OSError on failure so the launcher can
record which isolation layer worked in this kernel/container and fall back to the next one.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
SECCOMP_MODE_FILTER = 2


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    rc = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(rc, f"mount {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    ul = ctypes.c_ulong
    _check(_libc.prctl(ctypes.c_int(option), ul(arg2), ul(arg3), ul(0), ul(0)), f"prctl({option})")


# --- seccomp -------------------------------------------------------------------------------------------
# Syscalls a test program never needs and that widen the kernel attack surface or escape the other layers
# (ptrace/process_vm_* read other processes; io_uring can open sockets behind the socket() filter).
_BLOCKED = (
    "ptrace mount umount2 pivot_root chroot unshare setns bpf perf_event_open userfaultfd keyctl add_key "
    "request_key process_vm_readv process_vm_writev kexec_load kexec_file_load init_module finit_module "
    "delete_module reboot swapon swapoff io_uring_setup io_uring_enter io_uring_register open_by_handle_at "
    "name_to_handle_at acct quotactl sethostname setdomainname fanotify_init"
).split()
_NR = {  # (audit arch, socket nr, {name: nr}); numbers from asm/unistd_64.h and asm-generic/unistd.h
    "x86_64": (0xC000003E, 41, dict(zip(_BLOCKED, (
        101, 165, 166, 155, 161, 272, 308, 321, 298, 323, 250, 248, 249, 310, 311, 246, 320, 175, 313, 176,
        169, 167, 168, 425, 426, 427, 304, 303, 163, 179, 170, 171, 300)))),
    "aarch64": (0xC00000B7, 198, dict(zip(_BLOCKED, (
        117, 40, 39, 41, 51, 97, 268, 280, 241, 282, 219, 217, 218, 270, 271, 104, 294, 105, 273, 106,
        142, 224, 225, 425, 426, 427, 265, 264, 89, 60, 161, 162, 262)))),
}
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_AF_UNIX = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp_program(allow_unix_sockets: bool) -> list[tuple[int, int, int, int]]:
    machine = platform.machine()
    if machine not in _NR:
        raise OSError(0, f"seccomp filter has no syscall table for {machine}")
    arch, socket_nr, table = _NR[machine]
    deny = (_RET_K, 0, 0, _RET_ERRNO | 1)  # EPERM
    blocked = sorted(table.values())
    # Layout: [arch check][load nr][x32 check][blocked...][socket check][load family][family check][ALLOW][DENY]
    n_head = 5
    s = n_head + len(blocked)  # index of the socket JEQ
    deny_at = s + 4
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, arch), deny, (_LD_W_ABS, 0, 0, 0)]
    # x86_64's x32 ABI reuses the table with bit 30 set; other arches never set it, so the check is harmless.
    prog.append((_JGE_K, deny_at - n_head, 0, 0x40000000))
    for i, nr in enumerate(blocked):
        prog.append((_JEQ_K, deny_at - (n_head + i + 1), 0, nr))
    family_ok = 0 if allow_unix_sockets else 1
    prog += [(_JEQ_K, 0, 2, socket_nr), (_LD_W_ABS, 0, 0, 16), (_JEQ_K, family_ok, 1, _AF_UNIX),
             (_RET_K, 0, 0, _RET_ALLOW), deny]
    return prog


def install_seccomp(allow_unix_sockets: bool) -> None:
    """Deny socket() (all families, or all but AF_UNIX) and the syscalls in _BLOCKED with EPERM.

    Needs no privilege once no_new_privs is set; applies to this process and everything it forks or execs.
    """
    prog = _seccomp_program(allow_unix_sockets)
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.addressof(buf))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
