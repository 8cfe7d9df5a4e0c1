"""Multi-node on one box: a Ray cluster of a head and two worker nodes (`ray.cluster_utils.Cluster`),
placed as in the KubeRay layout (cluster/kuberay/raycluster.yaml): the head runs only the driver
(num-cpus 0); rollout workers and the learner go to the "gpu" node (the only one with CPUs for them);
the SandboxPool and the RewardService to the "cpu" node, pinned by its `sandbox` resource. A node is
killed mid-run (its raylet, without warning) and a replacement joins, as KubeRay recreates a pod: the run
finishes, every group of every chunk used comes back, and the events are counted."""

from __future__ import annotations

import math

import pytest
from test_trainer import REPO, tiny_overrides

from pyvision_rl.config import load_config
from pyvision_rl.metrics import read_metrics

GPU_NODE = dict(num_cpus=2, resources={"gpu_node": 1})  # labelled "gpu"; CPU-only here (no GPU is mocked)
CPU_NODE = dict(num_cpus=0, resources={"sandbox": 32})


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {"gpu": c.add_node(**GPU_NODE), "cpu": c.add_node(**CPU_NODE)}
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def _run_killing(tmp_path, tiny_model_dir, cluster, kill: str) -> tuple[list[dict], dict, str]:
    """Two steps; the first scored group of step 1 kills node `kill` and starts its replacement."""
    from pyvision_rl.trainer import Trainer

    c, nodes = cluster
    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(tmp_path, tiny_model_dir, kill, steps=2)
        + [
            "rollout.worker_num_cpus=0.5",
            "ray.learner_num_cpus=0.5",
            "ray.sandbox_num_cpus=0",
            "ray.reward_num_cpus=0",
            "ray.sandbox_resources={sandbox: 1}",
            "ray.reward_resources={sandbox: 1}",
        ],
    )
    tr = Trainer(cfg)
    gpu_id, cpu_id = nodes["gpu"].node_id, nodes["cpu"].node_id
    # Placement as in the KubeRay layout.
    assert {_node_of(w) for w in tr.workers} == {_node_of(a) for a in tr.learners.actors} == {gpu_id}
    assert _node_of(tr.pools[0]) == _node_of(tr.rewards[0]) == cpu_id
    score, killed = tr._score, []

    def score_then_kill(sb, ref, *retry):
        score(sb, ref, *retry)
        if not killed:
            killed.append(kill)
            c.remove_node(nodes[kill], allow_graceful=False)  # the raylet and every worker on the node
            nodes[kill] = c.add_node(**(GPU_NODE if kill == "gpu" else CPU_NODE))

    tr._score = score_then_kill
    try:
        tr.fit()
        where = {"pool": _node_of(tr.pools[0]), "reward": _node_of(tr.rewards[0])}
        where["workers"] = {_node_of(w) for w in tr.workers}
        where["learners"] = {_node_of(a) for a in tr.learners.actors}
    finally:
        tr.shutdown()
    rows = read_metrics(cfg.run_dir())
    assert killed and [r["step"] for r in rows] == [1, 2]
    for r in rows:  # every group of every chunk used came back in full
        assert r["rollout/count"] == r["chunks_used"] * 4 * 4
        assert r["filter/trajectories_trained"] > 0 and math.isfinite(r["train/loss"])
    return rows, where, nodes[kill].node_id


@pytest.mark.slow
def test_killing_the_gpu_worker_node_mid_run(tmp_path, tiny_model_dir, cluster):
    """The node with the rollout worker and the learner dies: the worker restarts on the replacement
    node (groups it still held are rolled out again) and gets the weights; the learner group is rebuilt
    there and the step redone."""
    rows, where, new = _run_killing(tmp_path, tiny_model_dir, cluster, "gpu")
    ev = rows[-1]
    assert ev["events/worker_restarts"] >= 1  # its groups re-queued, or already safe in the driver's refs
    assert ev["events/learner_rebuilds"] == 1
    assert where["workers"] == where["learners"] == {new}


@pytest.mark.slow
def test_killing_the_node_of_the_only_sandbox_pool(tmp_path, tiny_model_dir, cluster):
    """The node with the only SandboxPool (and the RewardService) dies: both restart on the replacement;
    a trajectory whose sandbox went with it ends as SANDBOX_ERROR (never trained on, counted), and its
    group still comes back whole."""
    rows, where, new = _run_killing(tmp_path, tiny_model_dir, cluster, "cpu")
    assert rows[-1]["events/reward_restarts"] >= 1
    assert where["pool"] == where["reward"] == new
