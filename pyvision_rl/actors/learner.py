"""Learner actors: W ranks of `learner.engine.PolicyLearner`, and the LearnerGroup the driver talks to.

The driver passes ObjectRefs (one per accepted group, from the RewardService); each rank takes
`refs[rank::W]` and fetches only those, so trajectories never pass through the driver.

Placement (`learner.placement`): 'split' gives each rank its own `num_gpus_per_rank`; 'colocated' puts rank i
in bundle i ({GPU: 1}) of one placement group that the driver also schedules RolloutWorker i into
(`colocated_placement`), so a rank and an engine share each GPU with fractional GPU requests, as the
release's hybrid engine does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ray

from pyvision_rl.actors.weight_sync import make_sync_backend
from pyvision_rl.config import Config, ConfigError
from pyvision_rl.learner.batching import shard_for_rank
from pyvision_rl.learner.weight_sync import pack_bucket

log = logging.getLogger("pyvision_rl.learner")


@ray.remote
class Learner:
    """One learner rank. Construct cheaply, then `setup(master_addr, master_port)` on all ranks at once."""

    def __init__(self, model_path: str, cfg: dict, rank: int, world_size: int) -> None:
        self.model_path = model_path
        self.cfg = Config.model_validate(cfg)
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self._sync_pg = None

    def address(self) -> tuple[str, int]:
        from pyvision_rl.actors.weight_sync import free_address

        return free_address()

    def setup(self, master_addr: str, master_port: int) -> bool:
        from pyvision_rl.learner.engine import PolicyLearner

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        if self.cfg.learner.num_gpus_per_rank > 0:
            os.environ.setdefault("LOCAL_RANK", "0")  # Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU
        if self.cfg.run.deterministic:  # the same kernels and reduction orders every run (README)
            import torch

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.manual_seed(self.cfg.run.seed + self.rank)
        self.learner = PolicyLearner(
            self.model_path,
            self.cfg.learner,
            self.cfg.model,
            self.rank,
            self.world_size,
            temperature=self.cfg.rollout.temperature,
            device=None if self.cfg.learner.num_gpus_per_rank > 0 else "cpu",
        )
        return True

    def _fetch(self, refs: Sequence) -> list:
        mine = shard_for_rank(list(refs), self.rank, self.world_size)
        groups = ray.get(mine) if mine else []
        return [t for g in groups for t in (g if isinstance(g, list) else [g])]

    def train_step(self, refs: Sequence) -> dict[str, float]:
        return self.learner.train_step(self._fetch(refs))

    def sft_step(self, refs: Sequence, lr: float | None = None) -> dict[str, float]:
        return self.learner.sft_step(self._fetch(refs), lr)

    def eval_loss(self, refs: Sequence) -> float:
        return self.learner.eval_loss(self._fetch(refs))

    def save(self, path: str) -> bool:
        self.learner.save(path)
        return True

    def load(self, path: str) -> bool:
        self.learner.load(path)
        return True

    def model_token_logprobs(self, refs: Sequence) -> list:
        """Log-probs of the model tokens of ALL trajectories behind `refs` (every rank runs the same forwards)."""
        groups = ray.get(list(refs))
        trajs = [t for g in groups for t in (g if isinstance(g, list) else [g])]
        return self.learner.model_token_logprobs(trajs)

    def state_dict_for_sync(self) -> dict | None:
        """Full parameters on CPU from rank 0 (others return None); small models, tests and debugging."""
        sd = self.learner.state_dict_for_sync()
        return sd if self.rank == 0 else None

    def param_metadata(self, trainable_only: bool = False) -> list:
        return self.learner.param_metadata(trainable_only)

    def placement(self) -> dict[str, Any]:
        """Where this rank runs: node, GPU ids Ray assigned, CUDA_VISIBLE_DEVICES (placement tests)."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "nccl_cumem_enable": os.environ.get("NCCL_CUMEM_ENABLE"),
        }

    # ---- weight sync (see pyvision_rl.actors.weight_sync)
    def publish_weights(self, bucket_mb: int, trainable_only: bool = False) -> list | None:
        """All ranks gather (ZeRO-3); rank 0 puts packed buckets in the object store and returns the refs."""
        refs = []
        for bucket in self.learner.iter_weight_buckets(bucket_mb, trainable_only=trainable_only):
            if self.rank == 0:
                refs.append(ray.put(pack_bucket(bucket)))
        return refs if self.rank == 0 else None

    def weight_sync_address(self) -> tuple[str, int]:
        return self.address()

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str) -> bool:
        from pyvision_rl.actors.weight_sync import new_process_group

        self._sync_pg = new_process_group(addr, port, 0, world_size, backend)
        return True

    def broadcast_weights(self, bucket_mb: int, trainable_only: bool = False) -> int:
        """All ranks gather (ZeRO-3); rank 0 broadcasts each bucket to the engines over the sync group."""
        from pyvision_rl.actors.weight_sync import broadcast
        from pyvision_rl.learner.weight_sync import flatten_bucket

        n = 0
        device = str(self.learner.device)
        for bucket in self.learner.iter_weight_buckets(bucket_mb, device, trainable_only):
            if self.rank == 0:
                flat = flatten_bucket(bucket)
                broadcast(self._sync_pg, flat)
                n += flat.numel()
        return n

    def push_colocated(
        self, engine: Any, bucket_mb: int, trainable_only: bool, version: int
    ) -> tuple[int, int]:
        """All ranks gather (ZeRO-3); every rank hands each bucket to `engine`, the one on its own GPU
        (CUDA IPC handle; bytes by value on CPU), and waits for it before freeing the bucket."""
        from pyvision_rl.actors.weight_sync import _call_on, _get, colocated_payload, receive_colocated

        n = buckets = 0
        device = str(self.learner.device)
        for bucket in self.learner.iter_weight_buckets(bucket_mb, device, trainable_only):
            payload, meta, buffer = colocated_payload(bucket)
            n += _get([_call_on(engine, receive_colocated, payload, meta, version)])[0]
            buckets += 1
            del payload, buffer, bucket  # the engine has copied: the GPU buffer may go
        return n, buckets

    def shutdown(self) -> bool:
        if self.learner is not None:
            self.learner.close()
        return True


def colocated_placement(cfg: Config):
    """The placement group of a colocated run: bundle i = {GPU: 1, CPU: rank's + worker's CPUs} holds learner
    rank i and RolloutWorker i (each with its fractional GPU). Checks the config first (ConfigError)."""
    from ray.util.placement_group import placement_group

    lc, rc = cfg.learner, cfg.rollout
    problems = []
    if rc.num_workers != lc.world_size:
        problems.append(
            f"rollout.num_workers ({rc.num_workers}) must equal learner.world_size ({lc.world_size})"
        )
    if not (0 < lc.num_gpus_per_rank < 1 and 0 < rc.worker_num_gpus < 1):
        problems.append(
            f"learner.num_gpus_per_rank ({lc.num_gpus_per_rank:g}) and rollout.worker_num_gpus "
            f"({rc.worker_num_gpus:g}) must be fractions of one GPU (e.g. 0.5 each)"
        )
    elif lc.num_gpus_per_rank + rc.worker_num_gpus > 1 + 1e-9:
        problems.append("learner.num_gpus_per_rank + rollout.worker_num_gpus must be <= 1 (one GPU per pair)")
    if cfg.trainer.max_staleness != 0:
        problems.append(
            "trainer.max_staleness must be 0 (rollouts cannot run while the learner holds the GPU)"
        )
    if problems:
        raise ConfigError("learner.placement=colocated: " + "; ".join(problems) + ".")
    cpus = cfg.ray.learner_num_cpus + rc.worker_num_cpus
    pg = placement_group([{"GPU": 1.0, "CPU": cpus}] * lc.world_size, strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    return pg


def in_bundle(pg, i: int) -> dict[str, Any]:
    """Actor options that schedule into bundle `i` of `pg` (nothing when `pg` is None)."""
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}


class LearnerGroup:
    """W Learner actors (`learner.world_size`) with their process group, as the driver uses them.

    `LearnerGroup(model_path, cfg, placement_group=None)` (a colocated run passes `colocated_placement(cfg)`:
    rank i goes into bundle i); `train_step(refs) -> metrics`; `sft_step(refs, lr)`;
    `sync_weights(engines, version) -> stats`; `save(dir)`; `load(dir)`; `shutdown()`.
    """

    def __init__(self, model_path: str, cfg: Config, placement_group: Any = None) -> None:
        from pyvision_rl.actors.weight_sync import nccl_env

        self.cfg = cfg
        lc = cfg.learner
        W = lc.world_size
        cfg_dict = cfg.model_dump(mode="json")
        self.actors = [
            Learner.options(
                num_cpus=cfg.ray.learner_num_cpus,
                num_gpus=lc.num_gpus_per_rank,
                runtime_env={"env_vars": nccl_env()},
                **in_bundle(placement_group, r),
            ).remote(model_path, cfg_dict, r, W)
            for r in range(W)
        ]
        addr, port = ray.get(self.actors[0].address.remote())
        ray.get([a.setup.remote(addr, port) for a in self.actors])  # all ranks join together
        self.sync_backend = make_sync_backend(
            cfg.sync.backend,
            cfg.sync.bucket_mb,
            on_gpu=lc.num_gpus_per_rank > 0,
            colocated=lc.placement == "colocated",
        )
        self.version = 0

    def _all(self, method: str, *args) -> list:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        pending = refs
        while pending:  # a dead rank raises at once, not after the others time out in a collective with it
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)

    def train_step(self, refs: Sequence) -> dict[str, float]:
        """One RL step on the group refs (each rank fetches `refs[rank::W]`); metrics are already all-reduced."""
        return self._all("train_step", list(refs))[0]

    def sft_step(self, refs: Sequence, lr: float | None = None) -> dict[str, float]:
        return self._all("sft_step", list(refs), lr)[0]

    def eval_loss(self, refs: Sequence) -> float:
        return self._all("eval_loss", list(refs))[0]

    def model_token_logprobs(self, refs: Sequence) -> list:
        return self._all("model_token_logprobs", list(refs))[0]

    def state_dict_for_sync(self) -> dict:
        return self._all("state_dict_for_sync")[0]

    def sync_weights(self, engines: Sequence[Any], version: int | None = None) -> dict[str, float]:
        """Push the current weights to every engine as `version` (default: the last version + 1)."""
        self.version = self.version + 1 if version is None else int(version)
        stats = self.sync_backend.sync(self, list(engines), self.version)
        log.debug("weight sync v%d: %s", self.version, stats)
        return stats

    def save(self, path: str) -> None:
        """`path/model` (HF dir) from rank 0 and `path/learner` (DeepSpeed state) from every rank."""
        self._all("save", path)

    def load(self, path: str) -> None:
        self._all("load", path)

    def shutdown(self) -> None:
        """Barrier, leave the process group, and end the actors."""
        try:
            self._all("shutdown")
        finally:
            for a in self.actors:
                ray.kill(a)
