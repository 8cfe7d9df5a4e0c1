"""Scoring: the verifier's accuracy and the accumulative tool reward R = R_acc + c · n_tool · 1{right}."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.verifiers import JUDGE, extract_answer, is_right, verifier_for, verify
from pyvision_rl.types import EndReason, Trajectory

log = logging.getLogger("pyvision_rl.reward")


def accumulative_tool_reward(
    acc: float, n_tool_calls: int, c: float = 0.1, cap: int = 0, right: bool | None = None
) -> float:
    """`acc + c * n_tool_calls` when the answer is right, else `acc`.

    `right` defaults to `acc == 1` (an MRA score is right from 0.5: pass `verifiers.is_right`).
    `n_tool_calls` counts successfully executed code turns; `cap` > 0 bounds it. A NaN accuracy counts as 0.
    """
    if acc is None or not math.isfinite(acc):
        acc, right = 0.0, False
    if right is None:
        right = acc >= 1.0 - 1e-9
    n = max(0, int(n_tool_calls))
    if cap > 0:
        n = min(n, cap)
    return float(acc + c * n) if right else float(acc)


def trajectory_kind(traj: Trajectory, cfg: RewardConfig) -> str:
    """The verifier kind for a trajectory: `traj.extra['verifier']` if set, else by its data_source."""
    kind = traj.extra.get("verifier") if traj.extra else None
    return kind or verifier_for(traj.data_source, cfg.default_verifier, cfg.verifiers)


def score_batch(trajs: Sequence[Trajectory], cfg: RewardConfig, judge: Any = None) -> dict[str, int]:
    """Set `acc` and `reward` on every trajectory; judged ones go to `judge` in one batched call.

    Only a trajectory that ended with an answer (DONE) can be right: in the others the text after the last
    model turn is an observation, and a program could print an `<answer>` block there. `traj.extra` (a copy
    of Task.extra: options, tolerances, the question) is handed to the verifier. `judge` has
    `judge_many([(question, answer, ground_truth, data_source)]) -> [score or None]`; None (the judge failed
    or its reply was unreadable) scores 0 and is counted. Returns `{"judged": n, "judge_failures": n}`.
    """
    pending: list[tuple[Trajectory, tuple[str, str, str, str]]] = []
    for t in trajs:
        t.acc, kind = 0.0, trajectory_kind(t, cfg)
        if t.end_reason == EndReason.DONE or t.end_reason == EndReason.DONE.value:
            if kind == JUDGE:
                answer = extract_answer(t.response_text, cfg.answer_format)
                if answer:
                    q = str((t.extra or {}).get("question", ""))
                    pending.append((t, (q, answer, str(t.ground_truth), t.data_source)))
            else:
                t.acc = verify(t.response_text, t.ground_truth, kind, t.extra, cfg.answer_format)
        _set_reward(t, kind, cfg)
    failures = 0
    if pending:
        if judge is None:
            raise RuntimeError(
                f"data_source '{pending[0][0].data_source}' is judged by an LLM but no judge is configured: set "
                "reward.judge.backend=http (with reward.judge.base_url and model) or =engine, or route the "
                "source to a rule verifier with reward.verifiers.<source>=mcq|numeric|mra|math|string."
            )
        scores = judge.judge_many([item for _, item in pending])
        for (t, _), s in zip(pending, scores, strict=True):
            if s is None:
                failures += 1
                t.extra["judge_failed"] = True
            t.acc = float(s or 0.0)
            _set_reward(t, JUDGE, cfg)
        if failures:
            log.warning("LLM judge failed on %d of %d answers (scored 0)", failures, len(pending))
    return {"judged": len(pending), "judge_failures": failures}


def _set_reward(t: Trajectory, kind: str, cfg: RewardConfig) -> None:
    t.reward = accumulative_tool_reward(
        t.acc, t.n_tool_calls, cfg.tool_bonus, cfg.tool_bonus_cap, is_right(kind, t.acc)
    )


def score_trajectory(traj: Trajectory, cfg: RewardConfig, judge: Any = None) -> Trajectory:
    """Score one trajectory (see `score_batch`); returns it."""
    score_batch([traj], cfg, judge)
    return traj
