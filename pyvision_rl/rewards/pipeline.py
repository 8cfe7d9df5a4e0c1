"""Score -> filter -> group summary for one batch of trajectories (the RewardService's logic, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.filters import filter_groups, group_by_id, group_std
from pyvision_rl.rewards.tool_reward import score_trajectory
from pyvision_rl.types import Trajectory


@dataclass
class ScoredBatch:
    """What scoring a batch gives: the surviving groups, a summary per trajectory, and the drop counts."""

    groups: list[list[Trajectory]] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)


def score_and_filter(trajs: list[Trajectory], cfg: RewardConfig) -> ScoredBatch:
    """Verify and reward every trajectory, apply `cfg.filters`, and group the survivors by group_id.

    Summaries (`pyvision_rl.metrics.trajectory_summary`) cover all trajectories, dropped ones included, so
    rollout metrics describe what the policy did, not what survived.
    """
    from pyvision_rl.metrics import trajectory_summary

    for t in trajs:
        score_trajectory(t, cfg)
    kept, drops = filter_groups(trajs, cfg.filters)
    groups = list(group_by_id(kept).values())
    return ScoredBatch(
        groups=groups,
        stds=[group_std(t.reward for t in g) for g in groups],
        summaries=[trajectory_summary(t) for t in trajs],
        drops=drops,
    )
