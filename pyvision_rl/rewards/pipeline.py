"""Score -> select for one batch of complete groups (the RewardService's logic, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.filters import select_for_training
from pyvision_rl.rewards.tool_reward import score_batch
from pyvision_rl.types import Trajectory


@dataclass
class ScoredBatch:
    """What scoring a batch gives: the survivors' indices, a summary per trajectory, and the counts."""

    survivors: list[int] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    judge: dict[str, int] = field(default_factory=dict)


def score_and_select(trajs: list[Trajectory], cfg: RewardConfig, judge: Any = None) -> ScoredBatch:
    """Verify and reward every trajectory, set its full-group `advantage` and `group_std`, and apply the
    filters (`select_for_training` with no target: ranking to the step size is the driver's, over chunks).

    Summaries (`pyvision_rl.metrics.trajectory_summary` plus the selection's inputs and outputs) cover all
    trajectories, dropped ones included, so rollout metrics describe what the policy did; the driver can
    run `select_for_training` over them and gets the same survivors and advantages.
    """
    from pyvision_rl.metrics import trajectory_summary

    judge_stats = score_batch(trajs, cfg, judge)
    drops: dict[str, int] = {}
    stats: list[tuple[float, float]] = []
    kept = select_for_training(trajs, 0, cfg.filters, drops=drops, stats=stats)
    summaries = []
    for t, (adv, std) in zip(trajs, stats, strict=True):
        t.advantage, t.group_std = adv, std
        summaries.append(
            {**trajectory_summary(t), "vision_ok": bool(t.vision_ok), "advantage": adv, "group_std": std}
        )
    return ScoredBatch(survivors=[i for i, _ in kept], summaries=summaries, drops=drops, judge=judge_stats)
