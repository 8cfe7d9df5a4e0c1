"""RewardService: scores trajectory lists that live in the object store and returns refs to survivors.

The driver hands over ObjectRefs (wrapped in a list so Ray does not resolve them on the driver); the
service fetches them itself, scores (judged sources through the LLM judge, `reward.judge`), sets each
trajectory's full-group advantage, applies the filters, and puts each surviving trajectory back as its own
object (the driver's ranking may split a group). Only small things go back to the driver: survivor
(index, group_std, ref) triples, per-trajectory summaries, drop and judge counts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from pyvision_rl.config import RewardConfig
from pyvision_rl.rewards.filters import score_and_select
from pyvision_rl.types import Trajectory

log = logging.getLogger("pyvision_rl.reward")

JUDGE_ACTOR_NAME = "pyvision-rl-judge"  # one in-cluster judge shared by every RewardService of a job


@ray.remote
class RewardService:
    """Ray actor wrapping `rewards.filters.score_and_select`.

    `reward_cfg` is `cfg.reward` as a dict (or a RewardConfig); `group_size` is rollout.n (groups smaller
    than it, e.g. after a partial rollout, are still scored and counted in `incomplete_groups`).
    `judge`: an object with `judge_many` (tests); by default it is built from `reward.judge`: an HTTP
    client, or a handle on the job's JudgeActor (started by the first service that needs it).
    """

    def __init__(self, reward_cfg: dict | RewardConfig, group_size: int = 0, judge: Any = None) -> None:
        self.cfg = (
            reward_cfg if isinstance(reward_cfg, RewardConfig) else RewardConfig.model_validate(reward_cfg)
        )
        self.group_size = group_size
        self.judge = judge if judge is not None else self._start_judge()

    def _start_judge(self) -> Any:
        jc = self.cfg.judge
        if jc.backend == "http":
            from pyvision_rl.rewards.judge import HTTPJudge

            return HTTPJudge(jc)
        if jc.backend == "engine":
            from pyvision_rl.actors.judge import JudgeActor, RemoteJudge

            actor = JudgeActor.options(
                name=JUDGE_ACTOR_NAME, get_if_exists=True, num_cpus=0, num_gpus=jc.num_gpus
            ).remote(jc.model_dump(mode="json"))
            return RemoteJudge(actor, jc.timeout_s * (jc.retries + 1) + 60)
        return None

    def ping(self) -> dict[str, Any]:
        """{"pid": this process's pid}: the driver's baseline for counting restarts (`score_group` reports it)."""
        return {"pid": os.getpid()}

    def score(self, refs: list) -> dict[str, Any]:
        """Score the trajectory lists behind `refs` (all members of a group must be in this call).

        Returns `{"accepted": [(index into summaries, group_std, ref to [traj])] for every survivor,
        "summaries": [dict], "drops": {reason: n}, "judge": {"judged", "judge_failures"},
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
        batch = score_and_select(trajs, self.cfg, self.judge)
        accepted = [(i, trajs[i].group_std, ray.put([trajs[i]])) for i in batch.survivors]
        sizes: dict[str, int] = {}
        for s in batch.summaries:
            sizes[s["group_id"]] = sizes.get(s["group_id"], 0) + 1
        incomplete = sum(1 for n in sizes.values() if self.group_size and n < self.group_size)
        return {
            "accepted": accepted,
            "summaries": batch.summaries,
            "drops": batch.drops,
            "judge": batch.judge,
            "incomplete_groups": incomplete,
            "failed": [],
            "error": "",
        }

    def score_group(self, refs: list, n: int) -> tuple:
        """Score one streamed group of `n` trajectories (`refs`: [its ObjectRef]); call it with
        `.options(num_returns=1 + n)`. Returns (report, t_0, ..., t_{n-1}).

        The report is `score`'s without refs: `accepted` as [(index in the group, group_std)], plus this
        process's `pid` (the driver counts restarts by it). `t_i` is `[trajectory i]` scored, with its
        advantage, when it survived the filters, else None: returns of a call the driver made, so the
        driver owns them and an accepted trajectory outlives this service.
        """
        none = (None,) * n
        try:
            trajs = list(ray.get(refs[0]))
        except Exception as e:  # RayActorError, RayTaskError, OwnerDiedError...
            return ({"failed": [0], "error": f"{type(e).__name__}: {e}"[:2000], "pid": os.getpid()}, *none)
        if len(trajs) != n:
            err = f"group of {len(trajs)} trajectories, expected {n}"
            return ({"failed": [0], "error": err, "pid": os.getpid()}, *none)
        batch = score_and_select(trajs, self.cfg, self.judge)
        report = {
            "accepted": [(i, trajs[i].group_std) for i in batch.survivors],
            "summaries": batch.summaries,
            "drops": batch.drops,
            "judge": batch.judge,
            "incomplete_groups": int(bool(self.group_size and n < self.group_size)),
            "failed": [],
            "error": "",
            "pid": os.getpid(),
        }
        keep = set(batch.survivors)
        return (report, *[[t] if i in keep else None for i, t in enumerate(trajs)])

    def summarize(self, refs: list) -> list[dict[str, Any]]:
        """Score (no filtering) the trajectories behind `refs` and return only their summaries: how the
        driver measures held-out accuracy without pulling trajectories through itself."""
        from pyvision_rl.metrics import trajectory_summary
        from pyvision_rl.rewards.verifiers import score_batch

        trajs = [t for ref in refs for t in ray.get(ref)]
        score_batch(trajs, self.cfg, self.judge)
        return [trajectory_summary(t) for t in trajs]
