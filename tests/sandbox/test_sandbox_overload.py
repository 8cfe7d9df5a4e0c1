"""Overload without loss: cells wait for a run slot before their timeout starts, opens wait their turn
for a box start, and failures of the sandbox itself (not of the model's code) come back as
`ExecResult.sandbox_error` results saying what failed, never as exceptions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sandbox_helpers import BACKENDS, sandbox_cfg, skip_reason

from pyvision_rl.sandbox import make_sandbox
from pyvision_rl.sandbox.base import KernelDied, KernelTimeout
from pyvision_rl.sandbox.pool import KernelPool

REPO = Path(__file__).resolve().parents[2]


def _need(backend: str) -> None:
    reason = skip_reason(backend)
    if reason:
        pytest.skip(reason)


def test_waiting_for_a_run_slot_is_not_charged_to_the_timeout():
    _need("process")
    pool = KernelPool(sandbox_cfg("process", max_kernels=2, warm_kernels=2, max_running=1))
    try:
        pool.open("a")
        pool.open("b")
        # Two 0.7 s cells, timeout 1.0 s, one run slot: run back to back they take 1.4 s, so the second
        # would time out if its wait counted.
        out: dict = {}
        ts = [threading.Thread(target=lambda t=t: out.setdefault(t, pool.execute(t, "import time; time.sleep(0.7); print('ok')", 1.0)))
              for t in ("a", "b")]  # fmt: skip
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert time.monotonic() - t0 >= 1.3  # really one after the other
        assert all(r.ok and r.stdout == "ok\n" for r in out.values()), out
        m = pool.metrics()
        assert m["sandbox/exec_wait_p99_ms"] >= 500 and m["sandbox/timeouts"] == 0
    finally:
        pool.shutdown()


def test_a_burst_of_opens_waits_for_start_slots():
    _need("process")
    pool = KernelPool(sandbox_cfg("process", max_kernels=8, warm_kernels=0, max_starting=1))
    results, depth = [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            depth.append(pool.metrics()["sandbox/start_queue_depth"])
            time.sleep(0.02)

    def traj(i):
        assert pool.open(f"t{i}") is None
        results.append(pool.execute(f"t{i}", f"print({i})"))
        pool.close(f"t{i}")

    w = threading.Thread(target=watch)
    w.start()
    try:
        ts = [threading.Thread(target=traj, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        stop.set()
        w.join()
        m = pool.metrics()
        pool.shutdown()
    assert sorted(r.stdout for r in results) == [f"{i}\n" for i in range(8)]
    assert max(depth) >= 1  # openers queued behind the single start slot
    assert m["sandbox/box_start_failures"] == 0 and m["sandbox/open_failures"] == 0


def test_open_failures_are_sandbox_error_results(tmp_path):
    _need("process")
    sb = make_sandbox(sandbox_cfg("process", warm_kernels=0))
    pool = KernelPool(sb.cfg, sandbox=sb)
    try:
        missing = str(tmp_path / "nope.png")
        why = pool.open("bad", [missing])
        assert why and missing in why
        r = pool.execute("bad", "print(1)")
        assert r.sandbox_error and missing in r.error and not r.timed_out
        pool.close("bad")
        assert pool.metrics()["sandbox/live_kernels"] == 0  # the slot came back
        # A box start that fails is retried; only repeated failures are reported, with their causes.
        real, calls = sb._start_box, []

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise KernelTimeout("the kernel did not report ready within 60 s")
            return real()

        sb.pool._start_box = flaky
        assert pool.open("ok") is None and pool.execute("ok", "print(2)").stdout == "2\n"
        pool.close("ok")

        def broken():
            raise KernelDied("exit status 1")

        sb.pool._start_box = broken
        why = pool.open("down")
        assert why and "3 tries" in why and "exit status 1" in why
        r = pool.execute("down", "print(3)")
        assert r.sandbox_error and r.error == why
        assert pool.metrics()["sandbox/box_start_failures"] >= 4
    finally:
        pool.shutdown()


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"


def _kill_box(backend: str, box) -> None:
    """Kill one box from outside, as an OOM killer, a crashed engine or a lost node would."""
    if backend == "process":
        # Every process of the box at once (bubblewrap's inner init and the kernel die only through
        # PDEATHSIG otherwise, a moment later: a loaded machine could still answer the next cell).
        tree, i = [box.proc.pid], 0
        while i < len(tree):
            kids = Path(f"/proc/{tree[i]}/task/{tree[i]}/children")
            tree += [int(c) for c in kids.read_text().split()] if kids.exists() else []
            i += 1
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in tree:  # gone (or a zombie) before the next cell is sent
            while Path(f"/proc/{pid}").exists() and "State:\tZ" not in _status(pid):
                time.sleep(0.01)
    else:
        subprocess.run(["docker", "kill", box.id], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_killed_from_outside_is_a_sandbox_error_and_a_crash_is_not(backend):
    _need(backend)
    with make_sandbox(sandbox_cfg(backend, warm_kernels=1, reuse_kernels=True)) as sb, sb.open() as k:
        assert k.execute("x = 1").ok
        _kill_box(backend, k._box)
        r = k.execute("print(x)", timeout_s=10)
        assert r.sandbox_error and r.error.startswith("The sandbox failed"), r
        assert not r.timed_out
        after = k.execute("print('fresh' if 'x' not in globals() else 'old')", timeout_s=10)
        assert after.ok and after.stdout == "fresh\n"
        crash = k.execute("import os\nos._exit(3)", timeout_s=10)  # the model's own code
        assert crash.error and "The interpreter died" in crash.error and not crash.sandbox_error
        assert k.execute("print(1)", timeout_s=10).ok


@pytest.mark.slow
@pytest.mark.docker
def test_256_trajectories_at_once_lose_nothing(tmp_path):
    """The soak's burst phase: 256 trajectories open kernels at once through one SandboxPool actor
    (reuse mode) that admits them all; every image cell succeeds and nothing is left behind."""
    _need("docker")
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/soak.py"), "--trajectories", "0", "--burst", "256", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    burst = json.loads(out.read_text())["burst"]
    assert burst["lost_trajectories"] == 0, burst["lost_examples"]
    assert burst["cells"] == 768 and burst["sandbox_errors"] == 0
    assert burst["leaked_containers"] == burst["leaked_processes"] == burst["leaked_temp_dirs"] == 0
    assert burst["leaked_cgroups"] == 0 and burst["leaked_fds"] <= 0, burst["new_fd_kinds"]
    assert r.returncode == 0
