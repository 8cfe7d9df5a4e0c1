"""The accumulative tool reward (DESIGN §1): R = R_acc + c · n_tool · 1{R_acc = 1}."""

from __future__ import annotations

import math

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.verifiers import VERIFIERS, verifier_for, verify
from pyvision_rl.types import EndReason, Trajectory


def accumulative_tool_reward(acc: float, n_tool_calls: int, c: float = 0.1, cap: int = 0) -> float:
    """`acc + c * n_tool_calls` when the answer is fully right (acc == 1), else `acc`.

    `n_tool_calls` counts successfully executed code turns; `cap` > 0 bounds it (long runs otherwise reward
    calling the tool for its own sake). A NaN accuracy counts as 0.
    """
    if acc is None or not math.isfinite(acc):
        acc = 0.0
    n = max(0, int(n_tool_calls))
    if cap > 0:
        n = min(n, cap)
    return float(acc + c * n) if acc >= 1.0 - 1e-9 else float(acc)


def trajectory_kind(traj: Trajectory, cfg: RewardConfig) -> str:
    """The verifier kind for a trajectory: `traj.extra['verifier']` if set, else by its data_source."""
    kind = traj.extra.get("verifier") if traj.extra else None
    if kind is None:
        kind = verifier_for(traj.data_source, cfg.default_verifier)
    if kind == "llm_judge" and (not cfg.llm_judge or "llm_judge" not in VERIFIERS):
        kind = cfg.default_verifier  # the judge is opt-in (reward.llm_judge) and needs a registered engine
    return kind


def score_trajectory(traj: Trajectory, cfg: RewardConfig) -> Trajectory:
    """Set `traj.acc` (the verifier's score) and `traj.reward` (with the tool bonus); returns `traj`.

    Only a trajectory that ended with an answer (DONE) can be right: in the others the text after the last
    model turn is an observation, and a program could print an `<answer>` block there. `traj.extra` is
    handed to the verifier (options for multiple choice, tolerances), as the agent loop copies Task.extra.
    """
    acc = 0.0
    if traj.end_reason == EndReason.DONE or traj.end_reason == EndReason.DONE.value:
        acc = verify(traj.response_text, traj.ground_truth, trajectory_kind(traj, cfg), traj.extra)
    traj.acc = acc
    traj.reward = accumulative_tool_reward(acc, traj.n_tool_calls, cfg.tool_bonus, cfg.tool_bonus_cap)
    return traj
