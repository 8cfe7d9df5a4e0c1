"""The release's selection rule by rule (select_for_training), the tool reward and scoring."""

import math
import statistics

import pytest

from pyvision_rl.config import FilterConfig, RewardConfig
from pyvision_rl.rewards import accumulative_tool_reward, score_batch, score_trajectory, select_for_training
from pyvision_rl.types import EndReason, Trajectory

ANS = "<answer>\n\\boxed{{{}}}\n</answer>"


def row(gid, reward, end="DONE", images=1, vision_ok=True):
    return {
        "group_id": gid,
        "reward": reward,
        "n_tool_images": images,
        "vision_ok": vision_ok,
        "end_reason": end,
    }


def traj(gid="g", reward=0.0, end=EndReason.DONE, tool_images=1, vision_ok=True, **kw):
    return Trajectory(
        task_id=gid,
        group_id=gid,
        prompt_ids=[1, 2],
        reward=reward,
        end_reason=end,
        n_tool_images=tool_images,
        vision_ok=vision_ok,
        **kw,
    )


# ---------------------------------------------------------------- select_for_training, rule by rule


def test_advantage_is_over_the_full_group_before_the_filters():
    # group a: the 0.0 member has no tool image and is dropped, yet it stays in a's baseline
    trajs = [row("a", 1.0), row("a", 0.0, images=0), row("a", 1.0), row("a", 0.0)]
    sel = select_for_training(trajs, 0)
    assert [i for i, _ in sel] == [0, 2, 3]
    assert [a for _, a in sel] == pytest.approx([0.5, 0.5, -0.5])  # mean 0.5 over all four, not 2/3


def test_zero_std_uses_the_full_group_and_keeps_a_group_of_one():
    drops = {}
    trajs = [row("tie", 1.0), row("tie", 1.0), row("one", 0.7), row("ok", 1.0), row("ok", 0.0, images=0)]
    sel = select_for_training(trajs, 0, drops=drops)
    # "ok" ties among its survivors (1.0 alone) but not over the full group: the survivor is kept
    assert [i for i, _ in sel] == [2, 3]
    assert dict(sel)[2] == pytest.approx(0.7)  # a group of one: mean 0, as the release's GRPO
    assert drops["zero_std"] == 2 and drops["no_tool_image"] == 1


def test_filters_in_the_release_order_each_counted_once():
    trajs = [
        row("g", 1.0, images=0, vision_ok=False, end="OVER_LENGTH"),  # no tool image (first of its reasons)
        row("g", 0.0, vision_ok=False, end="OVER_LENGTH"),  # vision mismatch
        row("g", 0.5, end="OVER_LENGTH"),  # end reason
        row("g", 0.2, end="EXCEED_MAX_IMAGES"),  # end reason
        row("g", 0.3, end="EXCEED_MAX_TURNS"),
        row("g", 0.4, end="ERROR_IN_ACTION"),
        row("g", 0.6, end=EndReason.DONE),  # an EndReason works as well as its name
    ]
    drops = {}
    sel = select_for_training(trajs, 0, drops=drops)
    assert [i for i, _ in sel] == [4, 5, 6]
    assert drops == {
        "sandbox_error": 0,
        "zero_std": 0,
        "no_tool_image": 1,
        "vision_mismatch": 1,
        "end_reason": 2,
    }
    off = FilterConfig(require_tool_image=False, drop_vision_mismatch=False, allowed_end_reasons=[])
    assert len(select_for_training(trajs, 0, off)) == 7


def test_sandbox_errors_are_never_selected_and_stay_out_of_the_baseline():
    drops = {}
    trajs = [row("a", 1.0), row("a", 0.0, end="SANDBOX_ERROR"), row("a", 0.0)]
    sel = select_for_training(trajs, 0, FilterConfig(allowed_end_reasons=[]), drops=drops)
    assert [i for i, _ in sel] == [0, 2] and [a for _, a in sel] == pytest.approx([0.5, -0.5])
    assert drops["sandbox_error"] == 1


def test_ranking_keeps_target_trajectories_by_group_std_and_may_split_groups():
    low = [row("low", r) for r in (1.0, 0.9, 1.0, 0.9)]  # small std
    high = [row("high", r) for r in (1.0, 0.0, 0.0, 1.0)]
    mid = [row("mid", r) for r in (1.0, 0.5, 0.5, 0.5)]
    trajs = low + high + mid
    stats = []
    sel = select_for_training(trajs, 6, stats=stats)
    assert [i for i, _ in sel] == [4, 5, 6, 7, 8, 9]  # all of "high", then the first two of "mid"
    assert stats[4][1] == pytest.approx(statistics.stdev([1.0, 0.0, 0.0, 1.0]))  # unbiased, as the release
    assert [i for i, _ in select_for_training(trajs, 100)] == [4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3]
    # target <= 0: every survivor, in generation order
    assert [i for i, _ in select_for_training(trajs, 0)] == list(range(12))
    assert select_for_training([], 8) == []


def test_std_norm_divides_by_the_full_groups_unbiased_std():
    trajs = [row("a", 1.0), row("a", 0.0), row("a", 0.0, images=0)]
    sd = statistics.stdev([1.0, 0.0, 0.0])
    sel = select_for_training(trajs, 0, std_norm=True)
    assert [a for _, a in sel] == pytest.approx([(1 - 1 / 3) / sd, (-1 / 3) / sd], rel=1e-5)


def test_trajectories_as_objects():
    trajs = [traj("a", 1.0), traj("a", 0.0), traj("b", 1.0, end=EndReason.SANDBOX_ERROR), traj("b", 0.0)]
    assert select_for_training(trajs, 0) == [(0, 0.5), (1, -0.5), (3, 0.0)]


# ---------------------------------------------------------------- reward and scoring


def test_accumulative_tool_reward():
    assert accumulative_tool_reward(1.0, 3) == 1.3
    assert accumulative_tool_reward(0.0, 3) == 0.0
    assert accumulative_tool_reward(0.8, 3) == 0.8  # partial credit is not right by default
    assert accumulative_tool_reward(0.6, 2, right=True) == pytest.approx(0.8)  # MRA >= 0.5 is right
    assert accumulative_tool_reward(1.0, 5, c=0.1, cap=2) == 1.2
    assert accumulative_tool_reward(1.0, 0) == 1.0
    assert accumulative_tool_reward(math.nan, 4, right=True) == 0.0
    assert accumulative_tool_reward(1.0, -1) == 1.0


def test_score_trajectory_sets_acc_and_reward():
    cfg = RewardConfig()
    t = traj(
        data_source="synthetic_count",
        ground_truth="7",
        n_tool_calls=2,
        response_text="<code>\n```python\nprint(7)\n```\n</code>...<answer>\n\\boxed{7}\n</answer>",
    )
    score_trajectory(t, cfg)
    assert t.acc == 1.0 and math.isclose(t.reward, 1.2)
    wrong = traj(
        data_source="synthetic_count", ground_truth="8", n_tool_calls=2, response_text=t.response_text
    )
    assert score_trajectory(wrong, cfg).reward == 0.0
    # an answer printed by a program in the last observation does not count when the model never answered
    spoof = traj(
        data_source="synthetic_count",
        ground_truth="7",
        end=EndReason.EXCEED_MAX_TURNS,
        response_text=t.response_text,
    )
    assert score_trajectory(spoof, cfg).acc == 0.0
    # per-row verifier override and options from extra (Task.extra copied by the agent loop)
    mcq = traj(
        ground_truth="B",
        response_text=ANS.format("blue"),
        extra={"verifier": "mcq", "options": ["red", "blue"]},
    )
    assert score_trajectory(mcq, cfg).acc == 1.0
    tol = traj(
        data_source="synthetic_count",
        ground_truth="7",
        response_text=ANS.format("7.4"),
        extra={"tolerance": 0.5},
    )
    assert score_trajectory(tol, cfg).acc == 1.0


def test_mra_sources_get_the_tool_bonus_from_half_credit():
    cfg = RewardConfig()
    for ds in ("vsi_numerical", "arkit_rule_verifiable"):
        t = traj(data_source=ds, ground_truth="10", n_tool_calls=2, response_text=ANS.format("11.2"))
        score_trajectory(t, cfg)
        assert t.acc == pytest.approx(0.8) and t.reward == pytest.approx(1.0)
        low = traj(data_source=ds, ground_truth="10", n_tool_calls=2, response_text=ANS.format("14"))
        assert score_trajectory(low, cfg).reward == pytest.approx(0.2)  # MRA 0.2 < 0.5: no bonus


class _Judge:
    def __init__(self, replies):
        self.replies, self.seen = replies, []

    def judge_many(self, items):
        self.seen.extend(items)
        return [self.replies.pop(0) for _ in items]


def test_judged_sources_are_batched_and_a_failure_costs_only_that_trajectory():
    cfg = RewardConfig()
    ts = [
        traj(
            "a",
            data_source="vstar",
            ground_truth="red",
            n_tool_calls=1,
            response_text=ANS.format("Red"),
            extra={"question": "Colour?"},
        ),
        traj("b", data_source="hrbench-4k", ground_truth="B", response_text=ANS.format("B")),
        traj("c", data_source="some_new_source", ground_truth="x", response_text=ANS.format("x")),
        traj(
            "d", data_source="vstar", ground_truth="red", response_text="no answer"
        ),  # never reaches the judge
        traj("e", data_source="synthetic_count", ground_truth="3", response_text=ANS.format("3")),
    ]
    judge = _Judge([1.0, None, 0.0])
    stats = score_batch(ts, cfg, judge)
    assert stats == {"judged": 3, "judge_failures": 1}
    assert judge.seen[0] == ("Colour?", "Red", "red", "vstar")
    assert [t.acc for t in ts] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert ts[0].reward == pytest.approx(1.1) and ts[1].extra["judge_failed"] is True
    with pytest.raises(RuntimeError, match="reward.judge.backend"):
        score_batch([traj(data_source="vstar", ground_truth="red", response_text=ANS.format("red"))], cfg)
    routed = RewardConfig(verifiers={"vstar": "string"})
    assert (
        score_trajectory(
            traj(data_source="vstar", ground_truth="red", response_text=ANS.format("red")), routed
        ).acc
        == 1.0
    )
