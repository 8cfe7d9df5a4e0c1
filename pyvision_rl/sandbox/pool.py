"""KernelPool: one kernel per live trajectory, bounded concurrency with queueing, metrics. No Ray here:
`pyvision_rl.actors.sandbox.SandboxPool` wraps it."""

from __future__ import annotations

import threading
import time
from collections import deque

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox import make_sandbox
from pyvision_rl.sandbox.base import Kernel, Sandbox
from pyvision_rl.types import ExecResult


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


class KernelPool:
    """Kernels keyed by trajectory id. At most `cfg.max_kernels` are live; `open` waits (queues) for a
    free slot. Neither `open` nor `execute` raises: a kernel that could not be opened (no box started,
    unusable task files, no slot within `wait_s`) makes the trajectory's cells sandbox-failure results
    (`ExecResult.sandbox_error`), as do an unknown trajectory and a box that failed; timeouts and the
    code's own errors are ordinary error results."""

    def __init__(self, cfg: SandboxConfig | None = None, sandbox: Sandbox | None = None) -> None:
        self.cfg = cfg or SandboxConfig()
        self.sandbox = sandbox or make_sandbox(self.cfg)
        self._kernels: dict[str, Kernel] = {}
        self._failed: dict[str, str] = {}  # trajectory id -> why its kernel could not be opened
        self._cond = threading.Condition()
        self._reserved = 0  # slots held by live or opening kernels
        self._waiting = 0
        # A trajectory may be closed (cancelled) while its open still waits or starts a box: the open then
        # gives its slot back instead of registering a kernel nobody will close.
        self._opening: set[str] = set()
        self._abandoned: set[str] = set()
        self._lat: deque[float] = deque(maxlen=10_000)
        self._open_lat: deque[float] = deque(maxlen=10_000)
        self._n_exec = 0
        self._timeouts = 0
        self._crashes = 0
        self._errors = 0
        self._sandbox_errors = 0
        self._open_failures = 0

    def open(self, traj_id: str, images: list[str] | None = None, videos: list[str] | None = None,
             wait_s: float | None = None) -> str | None:  # fmt: skip
        """Give `traj_id` a fresh kernel with its task files, waiting for a slot while `max_kernels` are
        live (at most `wait_s`). Re-opening a live id replaces its kernel. Returns None, or what failed
        (the trajectory's cells then return it as a sandbox failure)."""
        self.close(traj_id)
        t0 = time.monotonic()
        with self._cond:
            self._waiting += 1
            self._opening.add(traj_id)
            self._abandoned.discard(traj_id)
            try:
                ok = self._cond.wait_for(
                    lambda: traj_id in self._abandoned or self._reserved < self.cfg.max_kernels,
                    timeout=wait_s,
                )
                if traj_id in self._abandoned:
                    self._end_open(traj_id)
                    return "closed while waiting for a kernel"
                if ok:
                    self._reserved += 1
                else:
                    self._end_open(traj_id)
            finally:
                self._waiting -= 1
        if not ok:
            return self._open_failed(traj_id, f"no free kernel within {wait_s} s (sandbox.max_kernels="
                                              f"{self.cfg.max_kernels})")  # fmt: skip
        try:
            kernel = self.sandbox.open(list(images or []), list(videos or []))
        except Exception as e:  # noqa: BLE001 - reported through the trajectory's results
            with self._cond:
                self._end_open(traj_id)
                self._reserved -= 1
                self._cond.notify()
            return self._open_failed(traj_id, f"{type(e).__name__}: {e}")
        with self._cond:
            abandoned = self._end_open(traj_id)
            # Two opens of one id (a re-submitted trajectory racing its cancelled twin) keep the newer
            # kernel; the older one is released, never dropped with its slot still held.
            replaced = None if abandoned else self._kernels.get(traj_id)
            if not abandoned:
                self._kernels[traj_id] = kernel
        self._open_lat.append(time.monotonic() - t0)
        if replaced is not None:
            self._release(replaced)
        if abandoned:  # closed while its box started: nobody will close this kernel, so do it now
            self._release(kernel)
            return "closed while opening"
        return None

    def _end_open(self, traj_id: str) -> bool:
        """(`_cond` held) The open of `traj_id` is over; True when the trajectory was closed meanwhile."""
        self._opening.discard(traj_id)
        abandoned = traj_id in self._abandoned
        self._abandoned.discard(traj_id)
        return abandoned

    def _open_failed(self, traj_id: str, why: str) -> str:
        msg = f"The sandbox failed: no interpreter could be opened for this trajectory ({why})."
        with self._cond:
            self._failed[traj_id] = msg
            self._open_failures += 1
        return msg

    def execute(self, traj_id: str, code: str, timeout_s: float | None = None) -> ExecResult:
        """Run one cell in the trajectory's kernel."""
        with self._cond:
            kernel = self._kernels.get(traj_id)
            failed = self._failed.get(traj_id)
        if kernel is None:
            self._sandbox_errors += 1
            return ExecResult(
                error=failed
                or f"The sandbox failed: no interpreter is open for trajectory {traj_id!r} "
                "(call open first).",
                sandbox_error=True,
            )
        res = kernel.execute(code, timeout_s)
        self._lat.append(res.duration_s)
        self._n_exec += 1
        if res.sandbox_error:
            self._sandbox_errors += 1
        elif res.timed_out:
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
            self._failed.pop(traj_id, None)
            if kernel is None and traj_id in self._opening:
                self._abandoned.add(traj_id)  # its open gives the slot back
                self._cond.notify_all()
        if kernel is not None:
            self._release(kernel)

    def _release(self, kernel: Kernel) -> None:
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
        """Exec latency p50/p99 (ms, from a free run slot), open latency (including the wait for a kernel
        slot and a box), the waits themselves, counts, queue depths, pool sizes."""
        lat = list(self._lat)
        olat = list(self._open_lat)
        with self._cond:
            live, waiting = len(self._kernels), self._waiting
        sb = self.sandbox
        pool = getattr(sb, "pool", None)
        waits = list(getattr(sb, "run_waits", ()))
        return {
            "sandbox/exec_p50_ms": 1000 * _pct(lat, 50),
            "sandbox/exec_p99_ms": 1000 * _pct(lat, 99),
            "sandbox/exec_wait_p50_ms": 1000 * _pct(waits, 50),
            "sandbox/exec_wait_p99_ms": 1000 * _pct(waits, 99),
            "sandbox/open_p50_ms": 1000 * _pct(olat, 50),
            "sandbox/open_p99_ms": 1000 * _pct(olat, 99),
            "sandbox/executions": float(self._n_exec),
            "sandbox/timeouts": float(self._timeouts),
            "sandbox/crashes": float(self._crashes),
            "sandbox/user_errors": float(self._errors),
            "sandbox/sandbox_errors": float(self._sandbox_errors),
            "sandbox/open_failures": float(self._open_failures),
            "sandbox/box_start_failures": float(getattr(pool, "start_failures", 0)),
            "sandbox/queue_depth": float(waiting),
            "sandbox/start_queue_depth": float(getattr(pool, "waiting", 0)),
            "sandbox/exec_queue_depth": float(getattr(sb, "run_waiting", 0)),
            "sandbox/live_kernels": float(live),
            "sandbox/warm_ready": float(pool.ready_count() if pool else 0),
            "sandbox/max_kernels": float(self.cfg.max_kernels),
            "sandbox/boxes_reused": float(getattr(sb, "reused", 0)),
            "sandbox/boxes_recycled": float(getattr(sb, "recycled", 0)),
        }

    def shutdown(self) -> None:
        """Close every kernel and the sandbox."""
        for tid in self.live():
            self.close(tid)
        self.sandbox.close()
