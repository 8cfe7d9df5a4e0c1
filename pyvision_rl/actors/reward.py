"""RewardService: scores trajectory lists that live in the object store and returns refs to survivors.

The driver hands over ObjectRefs (wrapped in a list so Ray does not resolve them on the driver); the
service fetches them itself, scores, filters and puts each surviving group back as its own object. Only
small things go back to the driver: (group_id, std, ref) triples, per-trajectory summaries, drop counts.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.pipeline import score_and_filter
from pyvision_rl.types import Trajectory

log = logging.getLogger("pyvision_rl.reward")


@ray.remote
class RewardService:
    """Ray actor wrapping `rewards.pipeline.score_and_filter`.

    `reward_cfg` is `cfg.reward` as a dict (or a RewardConfig); `group_size` is rollout.n (groups smaller
    than it, e.g. after a partial rollout, are still scored and counted in `incomplete_groups`).
    `judge`: an optional verifier (e.g. `LLMJudgeVerifier`) registered as kind `llm_judge` when
    `reward.llm_judge` is on.
    """

    def __init__(self, reward_cfg: dict | RewardConfig, group_size: int = 0, judge: Any = None) -> None:
        self.cfg = (
            reward_cfg if isinstance(reward_cfg, RewardConfig) else RewardConfig.model_validate(reward_cfg)
        )
        self.group_size = group_size
        if judge is not None and self.cfg.llm_judge:
            from pyvision_rl.rewards.verifiers import register_verifier

            register_verifier("llm_judge", judge)

    def ping(self) -> bool:
        return True

    def score(self, refs: list) -> dict[str, Any]:
        """Score the trajectory lists behind `refs` (all members of a group must be in this call).

        Returns `{"accepted": [(group_id, std, ref)], "summaries": [dict], "drops": {reason: n},
        "incomplete_groups": int, "failed": [indices of refs that could not be fetched], "error": str}`.
        A failed rollout (its worker died or raised) is reported in `failed` rather than raised, so the
        driver can re-queue exactly that sub-batch.
        """
        trajs: list[Trajectory] = []
        failed, errors = [], []
        for i, ref in enumerate(refs):
            try:
                got = ray.get(ref)
            except Exception as e:  # RayActorError, RayTaskError, OwnerDiedError...
                failed.append(i)
                errors.append(f"{type(e).__name__}: {e}")
                continue
            trajs.extend(got if isinstance(got, list) else [got])
        if failed:
            return {
                "accepted": [],
                "summaries": [],
                "drops": {},
                "failed": failed,
                "error": "; ".join(errors)[:2000],
            }
        batch = score_and_filter(trajs, self.cfg)
        accepted = [(g[0].group_id, std, ray.put(g)) for g, std in zip(batch.groups, batch.stds, strict=True)]
        sizes: dict[str, int] = {}
        for s in batch.summaries:
            sizes[s["group_id"]] = sizes.get(s["group_id"], 0) + 1
        incomplete = sum(1 for n in sizes.values() if self.group_size and n < self.group_size)
        return {
            "accepted": accepted,
            "summaries": batch.summaries,
            "drops": batch.drops,
            "incomplete_groups": incomplete,
            "failed": [],
            "error": "",
        }

    def summarize(self, refs: list) -> list[dict[str, Any]]:
        """Score (no filtering) the trajectories behind `refs` and return only their summaries: how the
        driver measures held-out accuracy without pulling trajectories through itself."""
        from pyvision_rl.metrics import trajectory_summary
        from pyvision_rl.rewards.tool_reward import score_trajectory

        out = []
        for ref in refs:
            for t in ray.get(ref):
                out.append(trajectory_summary(score_trajectory(t, self.cfg)))
        return out
