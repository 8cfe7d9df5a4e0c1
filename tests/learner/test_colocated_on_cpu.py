"""Colocated placement on a real Ray cluster that declares logical GPUs (no CUDA here): rank i and engine i
share a GPU bundle, the colocated weight sync makes every engine serve the learner's weights (then sends only
the trainable parameters), actors get the same NCCL settings, and the trainer sleeps the engines for the
learner step and wakes them before the sync. The CUDA IPC transport itself is in test_gpu.py."""

import os

import pytest
import torch
from helpers import make_trajs

ray = pytest.importorskip("ray")

from pyvision_rl.config import ConfigError, load_config  # noqa: E402


@pytest.fixture(scope="module")
def ray_gpus():
    ray.init(
        num_cpus=2,
        num_gpus=2,  # logical: Ray schedules and sets CUDA_VISIBLE_DEVICES, torch still runs on CPU
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "")}},
    )
    yield
    ray.shutdown()


def colocated(world: int, extra=()):
    return load_config(
        None,
        [
            "learner.placement=colocated",
            f"learner.world_size={world}",
            f"rollout.num_workers={world}",
            "learner.num_gpus_per_rank=0.5",
            "rollout.worker_num_gpus=0.5",
            "learner.zero_stage=2",
            "learner.lr=3e-3",
            "ray.learner_num_cpus=0.25",
            "rollout.worker_num_cpus=0.25",
            "sync.bucket_mb=1",
            *extra,
        ],
    )


@ray.remote(num_cpus=0)
class Engine:
    """A plain transformers model behind the engine contract (update_weights), reporting where it runs."""

    def __init__(self, model_dir):
        from pyvision_rl.models.loading import load_policy

        self.model, self.proc = load_policy(model_dir)
        self.version, self.received = 0, []

    def update_weights(self, named, version):
        from pyvision_rl.learner.weight_sync import load_named_tensors

        load_named_tensors(self.model, named)
        self.version = version
        self.received.append(len(named))

    def placement(self):
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def logprobs(self, trajs):
        from pyvision_rl.learner.batching import build_micro_batch
        from pyvision_rl.models.processing import suppressed_token_ids, token_logprobs

        mb = build_micro_batch(self.proc, trajs, [0.0] * len(trajs))
        sup = suppressed_token_ids(self.proc, self.model.get_input_embeddings().num_embeddings)
        with torch.no_grad():
            lp = token_logprobs(self.model, mb.inputs, sup, mask=mb.mask)
        return [lp[b][mb.mask[b] > 0] for b in range(len(trajs))], self.version, list(self.received)


def test_config_errors_name_the_settings():
    from pyvision_rl.actors.learner import colocated_placement

    with pytest.raises(ConfigError, match="rollout.num_workers"):
        colocated_placement(colocated(2, ["rollout.num_workers=1"]))
    with pytest.raises(ConfigError, match="<= 1"):
        colocated_placement(colocated(1, ["rollout.worker_num_gpus=0.75"]))
    with pytest.raises(ConfigError, match="max_staleness"):
        colocated_placement(colocated(1, ["trainer.max_staleness=1"]))


@pytest.mark.slow
def test_rank_and_engine_share_a_gpu_and_sync_by_rank(ray_gpus, tiny_model_dir, other_model_dir):
    from pyvision_rl.actors.learner import LearnerGroup, colocated_placement, in_bundle
    from pyvision_rl.actors.weight_sync import ColocatedSync

    cfg = colocated(2)
    pg = colocated_placement(cfg)
    engines = [Engine.options(num_gpus=0.5, **in_bundle(pg, i)).remote(other_model_dir) for i in range(2)]
    g = LearnerGroup(tiny_model_dir, cfg, placement_group=pg)
    try:
        assert isinstance(g.sync_backend, ColocatedSync)  # sync.backend=auto with a colocated placement
        ranks = ray.get([a.placement.remote() for a in g.actors])
        engs = ray.get([e.placement.remote() for e in engines])
        for r, e in zip(ranks, engs, strict=True):
            assert r["gpu_ids"] == e["gpu_ids"] and len(r["gpu_ids"]) == 1  # one GPU per pair...
            assert r["cuda_visible_devices"] == e["cuda_visible_devices"] and r["node"] == e["node"]
        assert ranks[0]["gpu_ids"] != ranks[1]["gpu_ids"]  # ...and a different one for each pair
        assert ranks[0]["nccl_cumem_enable"] == "0"

        trajs = make_trajs(g_processor(tiny_model_dir), n_groups=2, n=2, seed=9)
        refs = [ray.put(trajs[:2]), ray.put(trajs[2:])]
        g.train_step(refs)
        want = g.model_token_logprobs(refs)
        s1 = g.sync_weights(engines, 1)
        s2 = g.sync_weights(engines, 2)
        for e in engines:
            got, version, received = ray.get(e.logprobs.remote(trajs))
            assert version == 2
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got, strict=True))
            n_first = sum(received[: len(received) // 2])
            assert n_first > sum(received[len(received) // 2 :]) > 0  # 2nd sync: trainable only
        assert s1["bytes"] > s2["bytes"] > 0  # the frozen vision tower went once
    finally:
        g.shutdown()
        ray.util.remove_placement_group(pg)


def g_processor(model_dir):
    from pyvision_rl.models.loading import load_processor

    return load_processor(model_dir)


@pytest.mark.slow
def test_trainer_sleeps_engines_for_the_learner_step(ray_gpus, tiny_model_dir, tmp_path):
    from pyvision_rl.trainer import Trainer

    cfg = colocated(
        1,
        [
            f"run.output_dir={tmp_path}",
            f"model.path={tiny_model_dir}",
            "trainer.total_steps=1",
            "trainer.save_every=100",
            "trainer.eval_every=0",
            "rollout.n=2",
            "rollout.gen_batch_size=2",
            "trainer.train_batch_size=1",
            "rollout.max_new_tokens=16",
            "rollout.max_turns=1",
            "sandbox.backend=process",
            "sandbox.warm_kernels=0",
            "data.synthetic.n_train=8",
            "data.synthetic.n_eval=2",
            "logging.wandb=disabled",
            "logging.progress=false",
            "reward.filters.drop_zero_std=false",
            "reward.filters.require_tool_image=false",
        ],
    )
    tr = Trainer(cfg)
    events: list[str] = []

    class Recorded:
        """Driver-side view of a worker that logs sleep/wake; everything else (and pickling) is the handle."""

        def __init__(self, handle):
            self.__dict__["h"] = handle

        def __getattr__(self, name):
            if name in ("sleep", "wake"):
                events.append(name)
            return getattr(self.__dict__["h"], name)

        def __reduce__(self):
            return (lambda h: h, (self.__dict__["h"],))

    train, sync = tr.learners.train_step, tr.learners.sync_weights
    tr.learners.train_step = lambda refs: (events.append("train"), train(refs))[1]
    tr.learners.sync_weights = lambda engines, v=None: (events.append("sync"), sync(engines, v))[1]
    try:
        tr.workers = [Recorded(w) for w in tr.workers]
        m = tr.train_one_step()
        assert events == ["sleep", "train", "wake", "sync"]
        assert m["train/trajectories"] > 0 and m["version"] == 1
        # the engine serves the new version and still generates after waking
        assert ray.get(tr.workers[0].version.remote()) == 1
    finally:
        tr.workers = [getattr(w, "__dict__", {}).get("h", w) for w in tr.workers]
        tr.shutdown()
