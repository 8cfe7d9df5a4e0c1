"""Tool reward, scoring, the four filters with their counts, and the group-std ranking."""

import math

from pyvision_rl.config import FilterConfig, RewardConfig
from pyvision_rl.rewards import (
    accumulative_tool_reward,
    filter_groups,
    group_std,
    rank_by_group_std,
    score_trajectory,
)
from pyvision_rl.types import EndReason, Trajectory


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


def test_accumulative_tool_reward():
    assert accumulative_tool_reward(1.0, 3) == 1.3
    assert accumulative_tool_reward(0.0, 3) == 0.0
    assert accumulative_tool_reward(0.8, 3) == 0.8  # MRA partial credit: no bonus
    assert accumulative_tool_reward(1.0, 5, c=0.1, cap=2) == 1.2
    assert accumulative_tool_reward(1.0, 0) == 1.0
    assert accumulative_tool_reward(math.nan, 4) == 0.0
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
    # per-row verifier override and options from extra
    mcq = traj(
        ground_truth="B",
        response_text="<answer>\n\\boxed{blue}\n</answer>",
        extra={"verifier": "mcq", "options": ["red", "blue"]},
    )
    assert score_trajectory(mcq, cfg).acc == 1.0


def test_group_std_edge_cases():
    assert group_std([]) == 0.0
    assert group_std([1.0]) == 0.0
    assert group_std([1.0, 1.0, 1.0]) == 0.0
    assert math.isclose(group_std([0.0, 1.0]), 0.5)
    assert math.isclose(group_std([math.nan, 1.0]), 0.5)  # NaN counts as 0


def test_filters_each_reason_counted():
    trajs = [
        traj("a", 1.1),
        traj("a", 0.0),  # kept group
        traj("b", 1.0),
        traj("b", 1.0),  # zero std
        traj("c", 1.0, end=EndReason.OVER_LENGTH),
        traj("c", 0.0),
        traj("c", 1.0),
        traj("d", 1.0, vision_ok=False),
        traj("d", 1.0, tool_images=0),
        traj("d", 0.0),
        traj("e", 1.0, end=EndReason.EXCEED_MAX_IMAGES),
        traj("e", 0.0, end=EndReason.ERROR_IN_ACTION),
        traj("e", 1.0, end=EndReason.EXCEED_MAX_TURNS),
    ]
    kept, drops = filter_groups(trajs, FilterConfig())
    assert [t.group_id for t in kept] == ["a", "a", "c", "c", "e", "e"]
    assert drops == {
        "overlength": 1,
        "vision_mismatch": 1,
        "end_reason": 1,
        "no_tool_image": 1,
        "zero_std": 3,
    }
    assert len(kept) + sum(drops.values()) == len(trajs)


def test_filters_switch_off_and_lone_survivor():
    trajs = [
        traj("a", 1.0, tool_images=0),
        traj("a", 0.0, tool_images=0),
        traj("b", 1.0),
        traj("b", 0.0, vision_ok=False),
    ]
    kept, drops = filter_groups(trajs, FilterConfig())
    assert (
        kept == []
        and drops["no_tool_image"] == 2
        and drops["vision_mismatch"] == 1
        and drops["zero_std"] == 1
    )
    off = FilterConfig(
        require_tool_image=False,
        drop_vision_mismatch=False,
        drop_zero_std=False,
        drop_overlength=False,
        allowed_end_reasons=[],
    )
    kept, drops = filter_groups(trajs + [traj("c", 1.0, end=EndReason.OVER_LENGTH)], off)
    assert len(kept) == 5 and sum(drops.values()) == 0


def test_rank_by_group_std():
    g1 = [traj("1", 1.0), traj("1", 0.0)]  # std 0.5
    g2 = [traj("2", 0.2), traj("2", 0.0), traj("2", 0.1)]  # small std
    g3 = [traj("3", 1.3), traj("3", 0.0)]  # std 0.65
    g4 = [traj("4", 0.0)]  # lone, std 0
    assert rank_by_group_std([g1, g2, g3, g4], 0) == [g3, g1, g2, g4]
    assert rank_by_group_std([g1, g2, g3, g4], 4) == [g3, g1]
    # a group that would overflow is skipped, a smaller one below it fills the rest
    assert rank_by_group_std([g1, g2, g3, g4], 5) == [g3, g1, g4]
    assert rank_by_group_std([], 8) == []

    class Summary:
        def __init__(self, std, size):
            self.std, self.size = std, size

    s = [Summary(0.1, 2), Summary(float("nan"), 2), Summary(0.9, 2)]
    assert rank_by_group_std(s, 4) == [s[2], s[0]]
