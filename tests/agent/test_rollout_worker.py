"""RolloutWorker actors on real Ray (CPU) with SandboxPool actors (process backend) shared by two workers:
the tiny model through the HF engine, and the scripted expert (the SFT-data path) solving image and video
tasks through the real sandbox."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # ~45 s: Ray start, actor imports, kernels

from pyvision_rl.agent.protocol import ChatTokens  # noqa: E402
from pyvision_rl.config import Config  # noqa: E402
from pyvision_rl.types import EndReason  # noqa: E402


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from pyvision_rl.data import load_tasks
    from pyvision_rl.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("rw-data")
    train, _ = make_dataset(out, "mixed", 3, 0, seed=1)
    return load_tasks(train)


@pytest.fixture(scope="module")
def cfg():
    c = Config()
    c.sandbox.backend = "process"
    c.sandbox.warm_kernels = 2
    c.sandbox.timeout_s = 10.0
    c.rollout.prompt_template = "tiny_tool"
    c.rollout.max_new_tokens = 24
    c.rollout.max_total_len = 1024
    return c


@pytest.fixture(scope="module")
def pool(ray_local, cfg):
    from pyvision_rl.actors.sandbox import SandboxPool

    p = SandboxPool.remote(cfg.sandbox.model_dump(mode="json"))
    yield p
    ray.get(p.shutdown.remote())


def _valid(t, tokenizer):
    assert len(t.response_ids) == len(t.loss_mask) == len(t.rollout_logprobs)
    assert t.vision_ok and t.length <= 1024
    ct = ChatTokens(tokenizer)
    assert not any(tok in ct.vision_ids for tok, m in zip(t.response_ids, t.loss_mask, strict=True) if m)
    assert t.visual_tokens == ct.count_image_tokens(t.prompt_ids + t.response_ids)


def test_tiny_model_worker_rolls_out_image_and_video_groups(ray_local, cfg, pool, tasks, tiny_model_dir):
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.models import load_processor

    w = RolloutWorker.options(num_cpus=0.5).remote(str(tiny_model_dir), cfg.model_dump(mode="json"), [pool])
    assert ray.get(w.ping.remote())["engine"] == "HFEngine"
    ray.get(w.set_version.remote(4))
    groups = [(t, 2, f"g{i}") for i, t in enumerate(tasks)]
    stream = w.rollout.remote(groups, 4, 11)
    refs = list(stream)  # one ObjectRef per group, in the order the groups completed
    assert len(refs) == 3 and all(isinstance(r, ray.ObjectRef) for r in refs)
    got = ray.get(refs)
    assert sorted([t.group_id for t in g] for g in got) == [["g0", "g0"], ["g1", "g1"], ["g2", "g2"]]
    trajs = [t for g in got for t in g]
    # the same seed gives the same tokens, whatever else the engine batched with them
    again = [t for r in w.rollout.remote(groups[:1], 4, 11) for t in ray.get(r)]
    first = next(g for g in got if g[0].group_id == "g0")
    assert [t.response_ids for t in again] == [t.response_ids for t in first]
    tok = load_processor(tiny_model_dir).tokenizer
    for t in trajs:
        _valid(t, tok)
        assert t.version == 4 and sum(t.loss_mask) > 0
        assert all(lp < 0 for lp, m in zip(t.rollout_logprobs, t.loss_mask, strict=True) if m)
        # a random tiny model writes neither code nor an answer: its turn is cut or malformed
        assert t.end_reason in (EndReason.ERROR_IN_ACTION, EndReason.OVER_LENGTH, EndReason.DONE)
    kinds = {t.extra["kind"] for t in trajs}
    assert kinds == {"image", "video"}
    # weights: push a modified state dict and see the version travel with the next trajectories
    from safetensors.torch import load_file

    sd = load_file(str(tiny_model_dir / "model.safetensors"))
    name = next(k for k in sd if k.endswith("lm_head.weight"))
    ray.get(w.update_weights.remote({name: (sd[name] * 0.5).numpy()}, 5))
    ((t,),) = [ray.get(r) for r in w.rollout.remote([(tasks[0], 1, "g9")], 5, 0)]
    assert t.version == 5 and ray.get(w.version.remote()) == 5
    ray.get(w.shutdown.remote())
    ray.kill(w, no_restart=True)
    # the streamed groups belong to the caller: they outlive the worker that produced them
    assert [g[0].group_id for g in ray.get(refs)] == [g[0].group_id for g in got]


def test_scripted_expert_workers_share_a_pool_and_solve_image_and_video_tasks(
    ray_local, cfg, pool, tasks, tiny_model_dir
):
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.data.synthetic import expert_turns

    turns = {t.id: expert_turns(t, use_tool=True) for t in tasks}

    def factory(c, path):  # built inside the actor
        from pyvision_rl.agent.scripted import ScriptedEngine
        from pyvision_rl.models import load_processor

        return ScriptedEngine.from_turns(load_processor(path).tokenizer, turns)

    c = cfg.model_copy(deep=True)
    c.rollout.max_new_tokens = 512
    workers = [
        RolloutWorker.options(num_cpus=0.5).remote(
            str(tiny_model_dir), c.model_dump(mode="json"), [pool], factory
        )
        for _ in range(2)
    ]
    before = ray.get(pool.metrics.remote())
    streams = [w.rollout.remote([(t, 2, f"w{k}-{t.id}") for t in tasks], 0, k) for k, w in enumerate(workers)]
    from pyvision_rl.models import load_processor

    tok = load_processor(tiny_model_dir).tokenizer
    for stream in streams:
        trajs = [t for r in stream for t in ray.get(r)]
        assert len(trajs) == 6
        for t in trajs:
            _valid(t, tok)
            task = next(x for x in tasks if x.id == t.task_id)
            assert t.end_reason == EndReason.DONE and t.final_answer == task.answer
            assert t.n_tool_calls == 1 and t.n_tool_images == 1 and t.visual_tokens > 0
        assert {t.extra["kind"] for t in trajs} == {"image", "video"}
    m = ray.get(pool.metrics.remote())
    # the one pool ran every trajectory's cell for both workers: 2 workers x 6 trajectories x 1 cell
    assert m["sandbox/executions"] - before["sandbox/executions"] == 12
    assert m["sandbox/sandbox_errors"] == before["sandbox/sandbox_errors"]
    for w in workers:
        ray.get(w.shutdown.remote())
        ray.kill(w)


def test_more_trajectories_than_the_pool_has_kernels(ray_local, cfg, tasks, tiny_model_dir):
    """Twelve tool trajectories through a pool of two kernels: each waits for a kernel in the pool (no
    deadlock, no waves), never more than two kernels are live, and every trajectory solves its task."""
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.actors.sandbox import SandboxPool
    from pyvision_rl.data.synthetic import expert_turns

    turns = {t.id: expert_turns(t, use_tool=True) for t in tasks}

    def factory(c, path):
        from pyvision_rl.agent.scripted import ScriptedEngine
        from pyvision_rl.models import load_processor

        return ScriptedEngine.from_turns(load_processor(path).tokenizer, turns)

    c = cfg.model_copy(deep=True)
    c.rollout.max_new_tokens = 512
    c.sandbox.max_kernels = 2
    small = SandboxPool.remote(c.sandbox.model_dump(mode="json"))
    w = RolloutWorker.options(num_cpus=0.5).remote(
        str(tiny_model_dir), c.model_dump(mode="json"), [small], factory
    )
    try:
        trajs = [t for r in w.rollout.remote([(t, 4, f"k-{t.id}") for t in tasks], 0, 0) for t in ray.get(r)]
        assert len(trajs) == 12
        assert all(t.end_reason == EndReason.DONE and t.n_tool_calls == 1 for t in trajs)
        m = ray.get(small.metrics.remote())
        assert m["sandbox/executions"] == 12 and m["sandbox/live_kernels"] <= 2
    finally:
        ray.get(w.shutdown.remote())
        ray.kill(w)
        ray.get(small.shutdown.remote())
