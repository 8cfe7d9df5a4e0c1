"""KernelPool (queueing, per-trajectory kernels, metrics), the SandboxPool Ray actor, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from sandbox_helpers import sandbox_cfg, skip_reason

from pyvision_rl.sandbox.pool import KernelPool


@pytest.fixture(scope="module")
def pool():
    if skip_reason("process"):
        pytest.skip(skip_reason("process"))
    p = KernelPool(sandbox_cfg("process", max_kernels=2, warm_kernels=2))
    yield p
    p.shutdown()


def test_pool_kernels_are_per_trajectory_and_queue(pool):
    pool.open("a")
    pool.open("b")
    assert pool.execute("a", "x = 'A'").ok and pool.execute("b", "x = 'B'").ok
    assert pool.execute("a", "print(x)").stdout == "A\n"
    assert pool.execute("b", "print(x)").stdout == "B\n"
    # max_kernels=2: a third trajectory waits until one closes.
    opened = threading.Event()
    t = threading.Thread(target=lambda: (pool.open("c"), opened.set()))
    t.start()
    time.sleep(0.3)
    assert not opened.is_set() and pool.metrics()["sandbox/queue_depth"] == 1
    pool.close("a")
    assert opened.wait(30)
    t.join()
    assert pool.execute("c", "print('c')").stdout == "c\n"
    unknown = pool.execute("a", "print(1)")
    assert unknown.sandbox_error and "open first" in unknown.error
    # No slot within wait_s: open does not raise; the trajectory's cells report the sandbox failure.
    why = pool.open("d", wait_s=0.2)
    assert why and "sandbox.max_kernels=2" in why
    r = pool.execute("d", "print(1)")
    assert r.sandbox_error and r.error == why
    pool.close("d")
    r = pool.execute("b", "while True: pass", timeout_s=1.0)
    assert r.timed_out
    m = pool.metrics()
    assert m["sandbox/timeouts"] == 1 and m["sandbox/live_kernels"] == 2 and m["sandbox/executions"] >= 6
    assert 0 < m["sandbox/exec_p50_ms"] <= m["sandbox/exec_p99_ms"]
    pool.close("b")
    pool.close("c")
    assert pool.metrics()["sandbox/live_kernels"] == 0


def test_sandbox_pool_actor_runs_trajectories_concurrently(ray_local):
    if skip_reason("process"):
        pytest.skip(skip_reason("process"))
    from pyvision_rl.actors.sandbox import SandboxPool

    ray = ray_local
    actor = SandboxPool.remote(sandbox_cfg("process", max_kernels=4, warm_kernels=4).model_dump())
    ray.get([actor.open.remote(f"t{i}") for i in range(4)])
    # Four 1 s cells at once, each printing its wall-clock start and end: run concurrently, every cell
    # starts before any ends; run one after another, each would start after the previous one ended.
    cell = "import time; s = time.time(); time.sleep(1.0); print({}, s, time.time())"
    res = ray.get([actor.execute.remote(f"t{i}", cell.format(i)) for i in range(4)])
    rows = [r.stdout.split() for r in res]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert max(float(r[1]) for r in rows) < min(float(r[2]) for r in rows), rows
    m = ray.get(actor.metrics.remote())
    assert m["sandbox/live_kernels"] == 4 and m["sandbox/executions"] == 4
    ray.get([actor.close.remote(f"t{i}") for i in range(4)])
    ray.get(actor.shutdown.remote())


def test_cli_sandbox_run(tmp_path, test_image):
    if skip_reason("process"):
        pytest.skip(skip_reason("process"))
    code = tmp_path / "cell.py"
    code.write_text("print(image_clue_0.size)\nplt.imshow(image_clue_0); plt.show()\n")
    out = tmp_path / "imgs"
    r = subprocess.run(
        [sys.executable, "-m", "pyvision_rl.cli", "sandbox", "run", str(code), "--image", test_image,
         "--backend", "process", "--timeout", "20", "--save-images", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["stdout"] == "(200, 100)\n" and res["error"] is None and res["n_images"] == 1
    assert res["image_sizes"] == [[640, 480]] and (out / "image_0.png").exists()
    code.write_text("1/0\n")
    r = subprocess.run([sys.executable, "-m", "pyvision_rl.cli", "sandbox", "run", str(code), "--backend", "process"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "ZeroDivisionError" in json.loads(r.stdout)["error"]


def test_closing_a_trajectory_whose_open_waits_gives_the_slot_back():
    """A trajectory cancelled while its open waits for a kernel (the driver discarding a sub-batch) must
    not register a kernel afterwards that nobody closes: that leaked slots until the pool deadlocked."""
    if skip_reason("process"):
        pytest.skip(skip_reason("process"))
    p = KernelPool(sandbox_cfg("process", max_kernels=1, warm_kernels=1))
    try:
        assert p.open("holder") is None
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("waiter", p.open("waiter")))
        t.start()
        deadline = time.monotonic() + 10
        while p.metrics()["sandbox/queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.close("waiter")  # cancelled while queued
        t.join(10)
        assert not t.is_alive() and result["waiter"] is not None  # it gave up, not opened
        p.close("holder")
        assert p.live() == [] and p._reserved == 0
        assert p.open("next", wait_s=10) is None  # the slot is free again
        assert p.live() == ["next"]
    finally:
        p.shutdown()


def test_two_opens_of_one_trajectory_keep_one_kernel_and_one_slot():
    """A re-submitted trajectory racing its cancelled twin opens the same id twice at once: the pool keeps
    one kernel and frees the other's slot (dropping it leaked a slot per race)."""
    if skip_reason("process"):
        pytest.skip(skip_reason("process"))
    p = KernelPool(sandbox_cfg("process", max_kernels=2, warm_kernels=2))
    try:
        ts = [threading.Thread(target=p.open, args=("twin",)) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert p.live() == ["twin"] and p._reserved == 1
        p.close("twin")
        assert p._reserved == 0
    finally:
        p.shutdown()
