"""GPU code paths: DeepSpeed on CUDA in bf16 and the NCCL weight sync into a GPU engine.

Marked `gpu`: they skip on CPU-only machines (run them with `make test-gpu` where CUDA is available).
The CPU suite covers the same logic through gloo and the object store.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_trajs

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL needs distinct GPUs for the learner and the engine (2+)",
)


@needs_cuda
def test_deepspeed_step_on_cuda_bf16(tiny_model_dir):
    from pyvision_rl.config import LearnerConfig, ModelConfig
    from pyvision_rl.learner.engine import PolicyLearner

    learner = PolicyLearner(tiny_model_dir, LearnerConfig(lr=1e-3, zero_stage=2), ModelConfig(dtype="auto"))
    try:
        p = next(q for q in learner.model.parameters() if q.requires_grad)
        assert p.is_cuda and learner.dtype == torch.bfloat16
        trajs = make_trajs(learner.processor, n_groups=2, n=4, seed=0)
        before = p.detach().float().clone()
        m = learner.train_step(trajs)
        assert torch.isfinite(torch.tensor(m["loss"]))
        assert not torch.equal(before, p.detach().float())  # the update really happened on the GPU
    finally:
        learner.close()


@needs_two
def test_nccl_sync_makes_the_gpu_engine_match(tiny_model_dir, other_model_dir):
    import ray

    from pyvision_rl.actors.learner import LearnerGroup
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.config import load_config

    ray.init(num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        cfg = load_config(
            None,
            [
                "learner.num_gpus_per_rank=1",
                "sync.backend=nccl",
                "rollout.worker_num_gpus=1",
                "sandbox.backend=process",
                "learner.world_size=1",
            ],
        )
        group = LearnerGroup(tiny_model_dir, cfg)
        worker = RolloutWorker.options(num_gpus=1).remote(other_model_dir, cfg.model_dump(mode="json"), None)
        stats = group.sync_weights([worker], version=3)
        assert ray.get(worker.version.remote()) == 3 and stats
        mine = group.state_dict_for_sync()
        # The engine now serves exactly the learner's weights.
        theirs = ray.get(
            worker.__ray_call__.remote(
                lambda self: {k: v.float().cpu() for k, v in self.engine.model.state_dict().items()}
            )
        )
        for name, t in mine.items():
            assert torch.allclose(theirs[name], t.float().cpu(), atol=1e-2), name
        group.shutdown()
    finally:
        ray.shutdown()


@needs_cuda
def test_colocated_cuda_ipc_sync_on_one_gpu(tiny_model_dir, other_model_dir):
    """Learner rank and HF engine share one GPU (0.5 each); the bucket crosses by CUDA IPC handle."""
    import ray

    from pyvision_rl.actors.learner import LearnerGroup, colocated_placement, in_bundle
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.config import load_config

    ray.init(num_gpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        cfg = load_config(
            None,
            [
                "learner.placement=colocated",
                "learner.num_gpus_per_rank=0.5",
                "rollout.worker_num_gpus=0.5",
                "rollout.num_workers=1",
                "learner.world_size=1",
                "learner.zero_stage=3",
                "sandbox.backend=process",
                "sync.bucket_mb=1",
            ],
        )
        pg = colocated_placement(cfg)
        worker = RolloutWorker.options(num_gpus=0.5, **in_bundle(pg, 0)).remote(
            other_model_dir, cfg.model_dump(mode="json"), None
        )
        group = LearnerGroup(tiny_model_dir, cfg, placement_group=pg)
        assert type(group.sync_backend).__name__ == "ColocatedSync"
        stats = group.sync_weights([worker], version=4)
        assert ray.get(worker.version.remote()) == 4 and stats["buckets"] >= 2
        mine = group.state_dict_for_sync()
        theirs = ray.get(
            worker.__ray_call__.remote(
                lambda self: {k: v.float().cpu() for k, v in self.engine.model.state_dict().items()}
            )
        )
        for name, t in mine.items():
            assert torch.equal(theirs[name], t.float().cpu()), name
        group.shutdown()
    finally:
        ray.shutdown()
