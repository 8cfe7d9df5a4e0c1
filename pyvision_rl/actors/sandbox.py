"""SandboxPool: a Ray actor around `KernelPool` (one persistent kernel per live trajectory).

An async actor: waiting for a free slot (`open` when `max_kernels` are live, or for a box to start)
awaits in a thread of its own executor and never blocks `execute`/`close` from other trajectories, which
run in a second executor so many trajectories execute concurrently (cells beyond `sandbox.max_running`
wait for a run slot there, before their timeout starts).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox.pool import KernelPool
from pyvision_rl.types import ExecResult


@ray.remote(num_cpus=0, max_concurrency=1000)
class SandboxPool:
    """Ray actor: `open(traj_id, images, videos)`, `execute(traj_id, code, timeout_s) -> ExecResult`,
    `close(traj_id)`, `metrics()`. Create with `SandboxPool.remote(cfg)` (a SandboxConfig or its dict)."""

    def __init__(self, cfg: SandboxConfig | dict | None = None) -> None:
        if isinstance(cfg, dict):
            cfg = SandboxConfig(**cfg)
        self.cfg = cfg or SandboxConfig()
        self.pool = KernelPool(self.cfg)
        # Opens may block waiting for a slot: they get their own threads so executes/closes never queue
        # behind them.
        self._open_exec = ThreadPoolExecutor(
            max_workers=max(4, self.cfg.max_kernels), thread_name_prefix="sbx-open"
        )
        self._run_exec = ThreadPoolExecutor(
            max_workers=self.cfg.max_kernels + 4, thread_name_prefix="sbx-exec"
        )

    async def open(
        self, traj_id: str, images: list[str] | None = None, videos: list[str] | None = None
    ) -> str | None:
        """Never raises: returns None, or what failed (the trajectory's cells then return it as a sandbox
        failure, `ExecResult.sandbox_error`)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._open_exec, self.pool.open, traj_id, images, videos
        )

    async def execute(self, traj_id: str, code: str, timeout_s: float | None = None) -> ExecResult:
        return await asyncio.get_running_loop().run_in_executor(
            self._run_exec, self.pool.execute, traj_id, code, timeout_s
        )

    async def close(self, traj_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._run_exec, self.pool.close, traj_id)

    async def metrics(self) -> dict[str, float]:
        return self.pool.metrics()

    async def backend(self) -> str:
        return self.pool.sandbox.name

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._run_exec, self.pool.shutdown)
