"""KernelPool: one kernel per live trajectory, bounded concurrency with queueing, metrics. No Ray here:
`pyvision_rl.actors.sandbox.SandboxPool` wraps it."""

from __future__ import annotations

import threading
import time
from collections import deque

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox.base import Kernel, Sandbox, make_sandbox
from pyvision_rl.types import ExecResult


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


class KernelPool:
    """Kernels keyed by trajectory id. At most `cfg.max_kernels` are live; `open` waits (queues) for a
    free slot. `execute` never raises: an unknown trajectory, a timeout or a crash is an error result."""

    def __init__(self, cfg: SandboxConfig | None = None, sandbox: Sandbox | None = None) -> None:
        self.cfg = cfg or SandboxConfig()
        self.sandbox = sandbox or make_sandbox(self.cfg)
        self._kernels: dict[str, Kernel] = {}
        self._cond = threading.Condition()
        self._reserved = 0  # slots held by live or opening kernels
        self._waiting = 0
        self._lat: deque[float] = deque(maxlen=10_000)
        self._open_lat: deque[float] = deque(maxlen=10_000)
        self._n_exec = 0
        self._timeouts = 0
        self._crashes = 0
        self._errors = 0

    def open(self, traj_id: str, images: list[str] | None = None, videos: list[str] | None = None,
             wait_s: float | None = None) -> None:  # fmt: skip
        """Give `traj_id` a fresh kernel with its task files; waits for a slot when `max_kernels` are
        live (raises TimeoutError after `wait_s`). Re-opening a live id replaces its kernel.
        Raises SandboxError for unusable task files or a broken backend."""
        self.close(traj_id)
        t0 = time.monotonic()
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(lambda: self._reserved < self.cfg.max_kernels, timeout=wait_s)
                if not ok:
                    raise TimeoutError(f"no free sandbox kernel within {wait_s} s (sandbox.max_kernels="
                                       f"{self.cfg.max_kernels})")  # fmt: skip
                self._reserved += 1
            finally:
                self._waiting -= 1
        try:
            kernel = self.sandbox.open(list(images or []), list(videos or []))
        except BaseException:
            with self._cond:
                self._reserved -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._kernels[traj_id] = kernel
        self._open_lat.append(time.monotonic() - t0)

    def execute(self, traj_id: str, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run one cell in the trajectory's kernel."""
        with self._cond:
            kernel = self._kernels.get(traj_id)
        if kernel is None:
            return ExecResult(error=f"No interpreter is open for trajectory {traj_id!r} (call open first).")
        res = kernel.execute(code, timeout_s)
        self._lat.append(res.duration_s)
        self._n_exec += 1
        if res.timed_out:
            self._timeouts += 1
        elif res.error and res.error.startswith("The interpreter died"):
            self._crashes += 1
        elif res.error:
            self._errors += 1
        return res

    def close(self, traj_id: str) -> None:
        """Discard the trajectory's kernel (no-op for an unknown id) and free its slot."""
        with self._cond:
            kernel = self._kernels.pop(traj_id, None)
        if kernel is None:
            return
        try:
            kernel.close()
        finally:
            with self._cond:
                self._reserved -= 1
                self._cond.notify()

    def live(self) -> list[str]:
        with self._cond:
            return list(self._kernels)

    def metrics(self) -> dict[str, float]:
        """Exec latency p50/p99 (ms), open latency, counts, queue depth, pool sizes."""
        lat = list(self._lat)
        olat = list(self._open_lat)
        with self._cond:
            live, waiting = len(self._kernels), self._waiting
        pool = getattr(self.sandbox, "pool", None)
        return {
            "sandbox/exec_p50_ms": 1000 * _pct(lat, 50),
            "sandbox/exec_p99_ms": 1000 * _pct(lat, 99),
            "sandbox/open_p50_ms": 1000 * _pct(olat, 50),
            "sandbox/open_p99_ms": 1000 * _pct(olat, 99),
            "sandbox/executions": float(self._n_exec),
            "sandbox/timeouts": float(self._timeouts),
            "sandbox/crashes": float(self._crashes),
            "sandbox/user_errors": float(self._errors),
            "sandbox/queue_depth": float(waiting),
            "sandbox/live_kernels": float(live),
            "sandbox/warm_ready": float(pool.ready_count() if pool else 0),
            "sandbox/max_kernels": float(self.cfg.max_kernels),
            "sandbox/boxes_reused": float(getattr(self.sandbox, "reused", 0)),
            "sandbox/boxes_recycled": float(getattr(self.sandbox, "recycled", 0)),
        }

    def shutdown(self) -> None:
        """Close every kernel and the sandbox."""
        for tid in self.live():
            self.close(tid)
        self.sandbox.close()
