"""RewardService on a real local Ray: refs in, refs to surviving groups out, a dead rollout reported."""

import pytest

ray = pytest.importorskip("ray")

from pyvision_rl.actors.reward import RewardService  # noqa: E402
from pyvision_rl.config import RewardConfig  # noqa: E402
from pyvision_rl.types import EndReason, Trajectory  # noqa: E402

ANS = "<answer>\n\\boxed{{{}}}\n</answer>"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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


def test_service_scores_refs_and_returns_group_refs(ray_local):
    svc = RewardService.remote(RewardConfig().model_dump(mode="json"), 2)
    part1 = _rollout.remote([_t("g1", "4", 2), _t("g1", "5"), _t("g2", "4"), _t("g2", "4")])
    part2 = _rollout.remote([_t("g3", "4", 0), _t("g3", "1", 1)])
    res = ray.get(svc.score.remote([part1, part2]))
    assert res["failed"] == []
    assert [a[0] for a in res["accepted"]] == [
        "g1"
    ]  # g2 ties; g3 loses its image-less member, then ties alone
    gid, std, ref = res["accepted"][0]
    assert isinstance(ref, ray.ObjectRef) and std == pytest.approx(0.6)
    group = ray.get(ref)
    assert [t.reward for t in group] == pytest.approx([1.2, 0.0]) and group[0].acc == 1.0
    assert len(res["summaries"]) == 6 and res["drops"]["zero_std"] == 3 and res["drops"]["no_tool_image"] == 1
    assert res["incomplete_groups"] == 0

    bad = ray.get(svc.score.remote([_dies.remote()]))
    assert bad["failed"] == [0] and "worker lost" in bad["error"]
