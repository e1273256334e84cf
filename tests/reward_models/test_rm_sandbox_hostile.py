"""Hostile programs in the code sandbox: each must fail safely, score 0 and leave the host untouched.

Safety order: every unbounded test (fork bomb, 10 GB allocation, 10 GB file) depends on a module-scoped
guard fixture that first proves the matching limit on a bounded program; if the guard does not hold, the
unbounded test fails without running.
Test hygiene: this file never calls shutil.rmtree. It removes exactly the files it created (os.remove) and
the temp directories it created (os.rmdir, which refuses a non-empty directory).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace

import pytest

from reward_models.sandbox import Program, Sandbox, SandboxConfig, active_layers, probe

UIDS = range(64000, 64256)  # SandboxConfig's default private uids
# timeout_s is generous: these programs finish in milliseconds, and a busy CI machine must not turn a
# limit's verdict into a timeout. Tests about timeouts set their own.
CONFIG = SandboxConfig(timeout_s=5.0, max_procs=16, memory_mb=512, file_size_mb=16, preload=("socket",))
FALLBACK = SandboxConfig(timeout_s=5.0, max_procs=16, memory_mb=512, file_size_mb=16, namespaces=False,
                         cgroups=False, preload=("socket",))

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux only")


def run(source: str, config: SandboxConfig = CONFIG, expected: str = "OK", stdin: str = ""):
    with Sandbox(config, num_workers=1) as sb:
        return sb.run(Program(source, "stdio", [{"input": stdin, "expected": expected}]))


def live_sandbox_processes() -> list[int]:
    """Pids of processes (not zombies) owned by a sandbox uid, anywhere on the host."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        uid = int(status["Uid"].split()[0])
        if uid in UIDS and not status["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def layers() -> set[str]:
    return set(probe(CONFIG)["layers"])


# --- guards on bounded programs --------------------------------------------------------------------
FORK_50 = """
import os, time
ok = failed = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(1.0)
        os._exit(0)
    ok += 1
print(ok, failed)
"""


def _fork_guard(config: SandboxConfig) -> tuple[int, int]:
    result = run(FORK_50, config)
    ok, failed = map(int, result.cases[0].stdout.split())
    return ok, failed


@pytest.fixture(scope="module")
def process_guard() -> None:
    ok, failed = _fork_guard(CONFIG)
    if not (ok <= 15 and failed >= 35):
        pytest.fail(f"process-count guard NOT proven ({ok} forks succeeded of 50, limit 16): "
                    "refusing to run the fork bomb")


@pytest.fixture(scope="module")
def memory_guard() -> None:
    result = run("x = bytearray(2 * 1024**3)\nprint('OK')")
    if result.cases[0].status == "pass" or "MemoryError" not in result.cases[0].stderr:
        pytest.fail(f"memory guard NOT proven ({result.cases[0]}): refusing to allocate 10 GB")


WRITE = """
written = 0
try:
    with open("big.bin", "wb") as f:
        for _ in range({mib}):
            f.write(b"x" * (1 << 20))
            f.flush()
            written += 1
except OSError as e:
    print("stopped", written, type(e).__name__)
"""


@pytest.fixture(scope="module")
def file_guard() -> None:
    result = run(WRITE.format(mib=200))
    out = result.cases[0].stdout.split()
    if not (out and out[0] == "stopped" and int(out[1]) <= 16):
        pytest.fail(f"file-size guard NOT proven ({result.cases[0]}): refusing to write 10 GB")


def test_fork_guard_bounded_50_forks_with_limit_16():
    ok, failed = _fork_guard(CONFIG)
    assert ok + failed == 50
    assert ok <= 15 and failed >= 35  # 16 processes at most, the program itself included


def test_fork_guard_holds_without_namespaces_and_cgroups():
    """The fallback (private uid + RLIMIT_NPROC) alone must also hold: CI may lack namespaces/cgroups."""
    ok, failed = _fork_guard(FALLBACK)
    assert ok <= 15 and failed >= 35


def test_fork_bomb(process_guard):
    t0 = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run(bomb, replace(CONFIG, timeout_s=1.5))  # exactly the limits the guard proved
    assert result.fraction == 0.0
    assert result.cases[0].status == "timeout"
    assert time.monotonic() - t0 < 20
    time.sleep(0.2)
    assert live_sandbox_processes() == []


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.monotonic()
    result = run("while True:\n    pass\n", SandboxConfig(timeout_s=1.0))
    assert result.cases[0].status == "timeout" and result.fraction == 0.0
    assert time.monotonic() - t0 < 10


def test_cpu_limit_kills_before_the_wall_clock():
    t0 = time.monotonic()
    result = run("x = 0\nwhile True:\n    x += 1\n", SandboxConfig(timeout_s=30.0, cpu_s=1.0))
    assert result.cases[0].status == "killed"  # SIGXCPU after 1 CPU second, long before the 30 s wall clock
    assert result.fraction == 0.0 and time.monotonic() - t0 < 25


def test_allocating_10_gb_fails(memory_guard):
    result = run("x = bytearray(10 * 1024**3)\nprint('OK')")
    assert result.fraction == 0.0
    assert "MemoryError" in result.cases[0].stderr


def test_touching_memory_gradually_stops_at_the_limit(memory_guard):
    src = "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(64 << 20))\nexcept MemoryError:\n" \
          "    print(len(chunks))\n"
    result = run(src, replace(CONFIG, timeout_s=20.0), expected="never")  # touching 512 MB is slow when busy
    assert result.cases[0].status == "fail", result.cases[0]
    assert int(result.cases[0].stdout) * 64 <= 512


def test_writing_a_10_gb_file_stops_at_the_file_size_limit(file_guard):
    before = shutil.disk_usage("/").used
    result = run(WRITE.format(mib=10 * 1024), expected="never")
    out = result.cases[0].stdout.split()
    assert out[0] == "stopped" and int(out[1]) <= 16
    assert result.fraction == 0.0
    assert shutil.disk_usage("/").used - before < 1 << 30  # other processes may write; 10 GB would show


ATTACK = """
import os
for path in {paths!r}:
    for attack in (os.remove, lambda p: open(p, "a").write("x"), lambda p: os.rename(p, p + ".moved"),
                   lambda p: os.chmod(p, 0o777)):
        try:
            attack(path)
            print("ATTACK SUCCEEDED", path)
        except Exception:
            pass
print("OK")
"""


@pytest.mark.parametrize("config", [CONFIG, FALLBACK], ids=["isolated", "fallback"])
def test_files_outside_the_work_dir_cannot_be_deleted_or_modified(config):
    closed = tempfile.mkdtemp(dir="/tmp", prefix="tracerl-canary-")
    open_dir = tempfile.mkdtemp(dir="/tmp", prefix="tracerl-canary-open-")
    os.chmod(closed, 0o755)
    os.chmod(open_dir, 0o777)  # world-writable, no sticky bit: only a read-only mount protects this one
    files = {"root_0644": os.path.join(closed, "canary.txt"),
             "world_dir": os.path.join(open_dir, "canary.txt"),
             "parent_cwd": os.path.join(os.getcwd(), f".tracerl-sandbox-canary-{os.getpid()}")}
    try:
        for path in files.values():
            with open(path, "x") as f:  # "x": never overwrite an existing file
                f.write("intact")
            os.chmod(path, 0o644)
        targets = dict(files)
        if config is FALLBACK:
            del targets["world_dir"]  # without a mount namespace nothing stops deletes in a 0777 directory
        result = run(ATTACK.format(paths=list(targets.values())), config)
        assert "ATTACK SUCCEEDED" not in result.cases[0].stdout
        for path in targets.values():
            with open(path) as f:
                assert f.read() == "intact"
            assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        for path in files.values():  # exactly the files this test created, nothing else
            for candidate in (path, path + ".moved"):
                if os.path.isfile(candidate) and not os.path.islink(candidate):
                    os.remove(candidate)
        for d in (closed, open_dir):  # rmdir: refuses to remove anything non-empty
            os.rmdir(d)


def test_environment_of_the_parent_is_not_visible(monkeypatch):
    monkeypatch.setenv("TRACERL_TEST_SECRET", "s3cr3t-value")
    src = """
import os
seen = [os.environ.get("TRACERL_TEST_SECRET")]
for pid in os.listdir("/proc"):
    try:
        seen.append(open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
    except Exception:
        pass
print("LEAK" if any(s and "s3cr3t" in s for s in seen) else "None")
"""
    for config in (CONFIG, FALLBACK):
        result = run(src, config, expected="None")
        assert result.cases[0].status == "pass", result.cases[0]
        assert "s3cr3t" not in result.cases[0].stdout


CONNECT = """
import socket
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"pwned")
    print("CONNECTED")
except Exception as e:
    print("blocked", type(e).__name__)
try:
    raw = __import__("_socket").socket(2, 1)
    raw.connect(("127.0.0.1", {port}))
    print("CONNECTED")
except Exception as e:
    print("blocked", type(e).__name__)
"""


@pytest.mark.parametrize("config", [CONFIG, FALLBACK, SandboxConfig(timeout_s=5.0, namespaces=False,
                                                                     cgroups=False, seccomp=False,
                                                                     preload=("socket",))],
                         ids=["netns", "seccomp", "python-block"])
def test_socket_to_localhost_is_blocked(config):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    try:
        result = run(CONNECT.format(port=server.getsockname()[1]), config, expected="CONNECTED")
        assert "CONNECTED" not in result.cases[0].stdout
        assert result.fraction == 0.0
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    finally:
        server.close()


BACKGROUND = """
import os, time
if os.fork() == 0:
    os.setsid()  # leave the case's process group
    if os.fork() == 0:
        while True:
            time.sleep(0.05)
    os._exit(0)
time.sleep(5)
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["isolated", "fallback"])
def test_background_process_does_not_outlive_the_run(namespaces):
    config = SandboxConfig(timeout_s=1.0, namespaces=namespaces, cgroups=namespaces)
    result = run(BACKGROUND, config)
    assert result.cases[0].status == "timeout"
    time.sleep(0.2)
    assert live_sandbox_processes() == []


def test_output_flood_is_cut():
    result = run("while True:\n    print('x' * 1000)\n", SandboxConfig(timeout_s=3.0, max_output_kb=64))
    assert result.cases[0].status == "output_limit"


def test_no_leftovers_after_runs():
    run("open('junk', 'w').write('x' * 1000)\nprint('OK')", FALLBACK)
    assert [e for e in os.listdir("/tmp") if e.startswith("tracerl-sandbox-6")] == []
    assert not [e for e in os.listdir("/tmp")
                if os.stat(os.path.join("/tmp", e), follow_symlinks=False).st_uid in UIDS]


def test_layers_reported(layers):
    assert "uid" in layers or os.geteuid() != 0
    assert active_layers({"namespaces": ["net"], "uid": 64000, "seccomp": True}) == {"netns", "uid", "seccomp"}


# ---- a program that attacks the harness's verdict or the run --------------------------------------------------
PEEK_EXPECTED = """
import sys
f = sys._getframe()
found = None
while f is not None:  # walk up into the harness's frames, looking for the case or the job
    for name in ("case", "job"):
        v = f.f_locals.get(name)
        if isinstance(v, dict):
            found = v.get("expected") or [c.get("expected") for c in v.get("cases", [])]
    f = f.f_back
print(found if isinstance(found, str) else (found or [None])[0])
"""


def test_a_stdio_program_cannot_read_its_expected_output():
    # the harness once held every case's expected output in the memory each test process is forked from
    with Sandbox(CONFIG, num_workers=1) as sb:
        result = sb.run(Program(PEEK_EXPECTED, "stdio", [{"input": "", "expected": "hidden-A"},
                                                         {"input": "", "expected": "hidden-B"}]))
    assert [c.status for c in result.cases] == ["fail", "fail"]
    assert "hidden" not in result.cases[0].stdout


INTERRUPT_THE_HARNESS = """
import os, signal
os.kill(1 if os.getpid() != 1 else os.getppid(), signal.SIGINT)  # the harness is pid 1 in its namespace
os.kill(os.getppid(), signal.SIGTERM)
print("OK")
"""

EXHAUST_PIDS = """
import os, time
if os.fork() == 0:
    os.setsid()  # out of the case's process group: survives the case
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)
print("OK")
"""


def test_a_program_cannot_stop_the_run_by_signalling_or_starving_the_harness(process_guard):
    with Sandbox(CONFIG, num_workers=1) as sb:
        result = sb.run(Program(INTERRUPT_THE_HARNESS, "stdio", [{"input": "", "expected": "OK"}] * 2))
        assert [c.status for c in result.cases] == ["pass", "pass"]  # the harness ignored both signals
        result = sb.run(Program(EXHAUST_PIDS, "stdio", [{"input": "", "expected": "OK"}] * 3))
    assert len(result.cases) == 3 and result.cases[0].status in ("pass", "timeout", "killed")
    assert all(c.status in ("pass", "killed", "timeout", "error") for c in result.cases)  # no SandboxError
    time.sleep(0.2)
    assert live_sandbox_processes() == []
