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


@pytest.mark.parametrize(
    "gpus, overrides, backend, atol, rtol",
    [
        pytest.param(
            2,
            ["sync.backend=nccl", "learner.num_gpus_per_rank=1", "rollout.worker_num_gpus=1"],
            "NcclSync",
            1e-2,
            1e-5,
            id="nccl",
            marks=needs_two,
        ),
        pytest.param(  # one rank and the HF engine share one GPU (0.5 each); buckets cross by CUDA IPC handle
            1,
            ["learner.placement=colocated", "learner.num_gpus_per_rank=0.5", "rollout.worker_num_gpus=0.5"]
            + ["rollout.num_workers=1", "learner.zero_stage=3"],
            "ColocatedSync",
            0.0,
            0.0,
            id="colocated-cuda-ipc",
            marks=needs_cuda,
        ),
    ],
)
def test_weight_sync_makes_the_gpu_engine_match(
    tiny_model_dir, other_model_dir, gpus, overrides, backend, atol, rtol
):
    import ray

    from pyvision_rl.actors.learner import LearnerGroup, colocated_placement, in_bundle
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.config import load_config

    ray.init(num_gpus=gpus, include_dashboard=False, ignore_reinit_error=True)
    try:
        cfg = load_config(
            None, overrides + ["learner.world_size=1", "sandbox.backend=process", "sync.bucket_mb=1"]
        )
        pg = colocated_placement(cfg) if cfg.learner.placement == "colocated" else None
        worker = RolloutWorker.options(
            num_gpus=cfg.rollout.worker_num_gpus, **(in_bundle(pg, 0) if pg else {})
        ).remote(other_model_dir, cfg.model_dump(mode="json"), None)
        group = LearnerGroup(tiny_model_dir, cfg, placement_group=pg)
        assert type(group.sync_backend).__name__ == backend
        stats = group.sync_weights([worker], version=3)
        assert ray.get(worker.version.remote()) == 3 and stats["buckets"] >= 2 and stats["bytes"] > 0
        mine = group.state_dict_for_sync()
        # The engine now serves exactly the learner's weights.
        theirs = ray.get(
            worker.__ray_call__.remote(
                lambda self: {k: v.float().cpu() for k, v in self.engine.model.state_dict().items()}
            )
        )
        for name, t in mine.items():
            assert torch.allclose(theirs[name], t.float().cpu(), atol=atol, rtol=rtol), name
        group.shutdown()
    finally:
        ray.shutdown()
