"""RewardService on a real local Ray: refs in, refs to survivors out, a dead rollout reported, the judge actor."""

import pytest

ray = pytest.importorskip("ray")

from pyvision_rl.actors.reward import RewardService  # noqa: E402
from pyvision_rl.config import JudgeConfig, RewardConfig  # noqa: E402
from pyvision_rl.types import EndReason, Trajectory  # noqa: E402

ANS = "<answer>\n\\boxed{{{}}}\n</answer>"


def _t(gid, answer, tools=1):
    return Trajectory(
        task_id=gid,
        group_id=gid,
        prompt_ids=[1],
        response_ids=[2, 3],
        loss_mask=[1, 0],
        end_reason=EndReason.DONE,
        response_text=ANS.format(answer),
        ground_truth="4",
        data_source="synthetic_count",
        n_tool_calls=tools,
        n_tool_images=tools,
    )


@ray.remote
def _rollout(trajs):
    return trajs


@ray.remote
def _dies():
    raise RuntimeError("worker lost")


def test_service_scores_refs_and_returns_survivor_refs(ray_local):
    svc = RewardService.remote(RewardConfig().model_dump(mode="json"), 2)
    part1 = _rollout.remote([_t("g1", "4", 2), _t("g1", "5"), _t("g2", "4"), _t("g2", "4")])
    part2 = _rollout.remote([_t("g3", "4", 0), _t("g3", "1", 1)])
    res = ray.get(svc.score.remote([part1, part2]))
    assert res["failed"] == []
    # g2 ties (dropped whole); g3 does not tie over its full group, so its member with an image survives
    assert [a[0] for a in res["accepted"]] == [0, 1, 5]
    i, std, ref = res["accepted"][0]
    assert isinstance(ref, ray.ObjectRef) and std == pytest.approx(0.8485, abs=1e-4)  # unbiased std of 1.2, 0
    (t0,) = ray.get(ref)
    assert t0.reward == pytest.approx(1.2) and t0.acc == 1.0 and t0.advantage == pytest.approx(0.6)
    (t5,) = ray.get(res["accepted"][2][2])
    assert (
        t5.advantage == pytest.approx(-0.5) and t5.reward == 0.0
    )  # g3: rewards 1.0 (no image: dropped, still in the mean) and 0.0
    s = res["summaries"]
    assert len(s) == 6 and s[5]["advantage"] == pytest.approx(-0.5) and s[5]["vision_ok"] is True
    assert res["drops"]["zero_std"] == 2 and res["drops"]["no_tool_image"] == 1
    assert res["incomplete_groups"] == 0 and res["judge"] == {"judged": 0, "judge_failures": 0}
    # the driver's selection over the summaries gives the same survivors and advantages
    from pyvision_rl.rewards import select_for_training

    assert select_for_training(s, 0) == [
        (0, pytest.approx(0.6)),
        (1, pytest.approx(-0.6)),
        (5, pytest.approx(-0.5)),
    ]

    bad = ray.get(svc.score.remote([_dies.remote()]))
    assert bad["failed"] == [0] and "worker lost" in bad["error"]


def test_in_cluster_judge_actor_on_the_tiny_model(ray_local, tiny_model_dir):
    """reward.judge.backend=engine: the service starts the JudgeActor (HF engine on CPU) and sends it the
    judged answers in one batch. The tiny model's verdicts are noise: only the plumbing is under test."""
    from pyvision_rl.actors.judge import JudgeActor  # noqa: F401 - importable without a GPU
    from pyvision_rl.actors.reward import JUDGE_ACTOR_NAME

    jc = JudgeConfig(backend="engine", model=str(tiny_model_dir), max_tokens=6, retries=1, timeout_s=300)
    svc = RewardService.remote(RewardConfig(judge=jc).model_dump(mode="json"), 2)
    trajs = [_t("j1", "red"), _t("j1", "blue"), _t("j2", "4")]
    for t in trajs[:2]:
        t.data_source, t.ground_truth, t.extra = "vstar", "red", {"question": "What colour is the cup?"}
    res = ray.get(svc.score.remote([_rollout.remote(trajs)]), timeout=600)
    assert res["failed"] == [] and res["judge"]["judged"] == 2
    accs = [s["acc"] for s in res["summaries"]]
    assert all(a in (0.0, 1.0) for a in accs[:2]) and accs[2] == 1.0  # j2 is rule-verified
    actor = ray.get_actor(JUDGE_ACTOR_NAME)
    verdicts = ray.get(actor.judge_many.remote([("q", "a", "a", "vstar")] * 3), timeout=600)
    assert len(verdicts) == 3 and all(v in (0.0, 1.0, None) for v in verdicts)
    ray.kill(actor)
