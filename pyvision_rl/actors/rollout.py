"""RolloutWorker: an async Ray actor holding one GenerationEngine and the AgentLoop, executing code through
SandboxPool actors shared with other workers. All trajectories of all calls in flight on a worker are
coroutines on its event loop, batched together by its engine. `rollout` is a streaming generator: each
group goes to the object store the moment its last trajectory ends, as an ObjectRef owned by the caller
(the driver), so it outlives this worker and whatever service scores it.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray

from pyvision_rl.agent.loop import AgentLoop, LocalSandboxClient
from pyvision_rl.config import Config
from pyvision_rl.engines.base import GenerationEngine, NamedTensors
from pyvision_rl.types import ExecResult, Task, Trajectory

log = logging.getLogger(__name__)


class PoolSandboxClient:
    """SandboxClient over SandboxPool actor handles: a trajectory id always maps to the same pool (stable
    hash), so several RolloutWorkers can share pools. Each call awaits the pool's ObjectRef (no thread); an
    `open` waiting for a free kernel waits in the pool, never blocking other trajectories."""

    def __init__(self, pools: list[Any]):
        if not pools:
            raise ValueError("PoolSandboxClient needs at least one SandboxPool actor handle")
        self.pools = list(pools)

    def _pool(self, traj_id: str) -> Any:
        return self.pools[zlib.crc32(traj_id.encode()) % len(self.pools)]

    async def open(self, traj_id: str, images: list[str], videos: list[str]) -> None:
        await self._pool(traj_id).open.remote(traj_id, list(images), list(videos))

    async def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult:
        return await self._pool(traj_id).execute.remote(traj_id, code, timeout_s)

    async def close(self, traj_id: str) -> None:
        await self._pool(traj_id).close.remote(traj_id)


def make_engine(cfg: Config, policy_path: str) -> GenerationEngine:
    """The engine named by `rollout.engine` ('hf' or 'vllm') over the checkpoint at `policy_path`."""
    if cfg.rollout.engine == "vllm":
        from pyvision_rl.engines.vllm import VLLMEngine

        return VLLMEngine(
            policy_path,
            dtype=cfg.model.dtype,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size,
            enable_sleep_mode=cfg.rollout.vllm_enable_sleep_mode,
            max_model_len=cfg.rollout.max_total_len,
            max_images=max(cfg.rollout.max_images, 1),
            min_pixels=cfg.model.min_pixels,
            max_pixels=cfg.model.max_pixels,
            seed=cfg.run.seed,
            seeded_requests=cfg.run.deterministic,
        )
    import torch

    from pyvision_rl.engines.hf import HFEngine

    device = "cuda" if (cfg.rollout.worker_num_gpus > 0 and torch.cuda.is_available()) else "cpu"
    return HFEngine(
        policy_path,
        device=device,
        dtype=cfg.model.dtype,
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
    )


@ray.remote
class RolloutWorker:
    """Async Ray actor: engine + agent loop.

    `RolloutWorker.remote(policy_path, cfg, sandbox_pools)`: `cfg` is a Config or its dict; `sandbox_pools`
    are SandboxPool handles (empty: an in-process sandbox from `cfg.sandbox`). The processor is the
    engine's, else loaded from `policy_path` with `model.min_pixels/max_pixels`.
    """

    def __init__(
        self,
        policy_path: str,
        cfg: Config | dict,
        sandbox_pools: list[Any] | None = None,
        engine_factory: Callable[[Config, str], GenerationEngine] | None = None,
    ):
        self.cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
        # engine_factory: build another engine in the actor (e.g. a ScriptedEngine replaying expert turns
        # to produce SFT trajectories through the real sandbox).
        self.engine = (engine_factory or make_engine)(self.cfg, policy_path)
        self._own_sandbox = None
        if sandbox_pools:
            client: Any = PoolSandboxClient(sandbox_pools)
        else:
            from pyvision_rl.sandbox import make_sandbox

            self._own_sandbox = make_sandbox(self.cfg.sandbox)
            client = LocalSandboxClient(self._own_sandbox)
        processor = getattr(self.engine, "processor", None)
        if processor is None:
            from pyvision_rl.models.loading import load_processor

            processor = load_processor(
                policy_path, min_pixels=self.cfg.model.min_pixels, max_pixels=self.cfg.model.max_pixels
            )
        # No cap on live trajectories: one waiting for a kernel waits in the pool without holding up others.
        common = dict(exec_timeout_s=self.cfg.sandbox.timeout_s)
        self.loop = AgentLoop(self.engine, client, processor, self.cfg.rollout, **common)
        ev = self.cfg.eval
        self.eval_loop = AgentLoop(
            self.engine,
            client,
            processor,
            self.cfg.rollout,
            max_turns=ev.max_turns,
            temperature=ev.temperature,
            feed_errors=ev.feed_errors,
            **common,
        )

    @staticmethod
    def _expand(groups: list[tuple[Task, int, str]]) -> list[tuple[Task, str]]:
        return [(task, gid) for task, n, gid in groups for _ in range(int(n))]

    def _version(self, version: int | None) -> int:
        if version is not None and version != self.engine.version:
            # The trajectories carry the version the engine really serves, so staleness stays visible.
            log.warning(
                "rollout asked for weight version %s but the engine serves %s", version, self.engine.version
            )
        return self.engine.version

    async def rollout(
        self, groups: list[tuple[Task, int, str]], version: int | None = None, seed: int | None = None
    ) -> AsyncIterator[list[Trajectory]]:
        """n trajectories per (task, n, group_id), training sampling settings: a streaming generator that
        yields each group (a list of n trajectories) as it completes. `.remote()` returns an
        ObjectRefGenerator whose refs the caller owns."""
        async for group in self.loop.stream_groups(self._expand(groups), self._version(version), seed):
            yield group

    async def evaluate(
        self, groups: list[tuple[Task, int, str]], version: int | None = None, seed: int | None = None
    ) -> list[Trajectory]:
        """All groups at once, with the eval settings (eval.max_turns, eval.temperature, eval.feed_errors)."""
        return await self.eval_loop.run_async(self._expand(groups), self._version(version), seed)

    def update_weights(self, weights: NamedTensors, version: int) -> None:
        """Load new weights (a state dict / (name, tensor) pairs; may be a subset) into the engine."""
        self.engine.update_weights(weights, version)

    def set_version(self, version: int) -> None:
        """Declare the served weights to be `version` (after a resume from a checkpoint of that version)."""
        self.engine.version = int(version)

    def version(self) -> int:
        return int(self.engine.version)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": int(self.engine.version), "engine": type(self.engine).__name__}

    def shutdown(self) -> None:
        self.loop.close()
        self.eval_loop.close()
        self.engine.close()
        if self._own_sandbox is not None:
            self._own_sandbox.close()
