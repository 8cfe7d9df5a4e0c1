"""Oversample -> filter -> rank: which scored trajectories a step trains on, with which advantage (README, "Fidelity to PyVision-RL").

The release's semantics (agents-x-project/PyVision-RL, `ray_trainer.fit` + `filter_fn_utils`), exactly:
1. every trajectory gets its GRPO advantage `r - mean(full group)` (divided by the group's std with
   `std_norm`) and its full group's unbiased reward std, *before* any filter (`group_stats`, the package's
   one definition; `learner.losses.group_advantages` is its tensor form);
2. filters, in this order, each switchable in `reward.filters` and counted in `drops`:
   `zero_std` (a group whose rewards all tie is dropped whole; a group of one is kept), `no_tool_image`
   (no tool call returned an image), `vision_mismatch` (vision-token groups != image grids), `end_reason`
   (end reasons outside `allowed_end_reasons`);
3. survivors keep their full-group advantage; if more than `target` survive, the `target` ones with the
   largest group std are kept (groups may split; ties keep generation order).

Ours on top: `SANDBOX_ERROR` trajectories (the sandbox failed, not the model) are never selected, are
counted under `sandbox_error`, and do not enter their group's mean or std (infrastructure noise is not a
sample of the policy).

`score_and_select` is the RewardService's whole job without Ray: score a batch of complete groups
(`verifiers.score_batch`), set each trajectory's advantage and group std, apply the filters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvision_rl.config import FilterConfig, RewardConfig
from pyvision_rl.rewards.verifiers import score_batch
from pyvision_rl.types import Trajectory

DROP_REASONS = ("sandbox_error", "zero_std", "no_tool_image", "vision_mismatch", "end_reason")
SANDBOX_ERROR = "SANDBOX_ERROR"


def _get(t: Any, key: str, default: Any = None) -> Any:
    return t.get(key, default) if isinstance(t, Mapping) else getattr(t, key, default)


def _end(t: Any) -> str:
    e = _get(t, "end_reason", "")
    return str(getattr(e, "value", e))


def group_stats(
    rewards: Sequence[float], group_ids: Sequence[Any], std_norm: bool = False, eps: float = 1e-6
) -> tuple[list[float], list[float]]:
    """(advantage, group std) per trajectory, as the release's `compute_grpo_outcome_advantage`.

    Advantage `r - mean(group)`, divided by `std + eps` with `std_norm`; the std is unbiased. A group of
    one has mean 0 and std 1 (its advantage is its reward). Non-finite rewards count as 0. `group_ids`
    may be a list, a numpy array or a tensor (elements compare by value).
    """
    ids = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
    r = [float(x) if x is not None and math.isfinite(x) else 0.0 for x in rewards]
    if len(ids) != len(r):
        raise ValueError(f"group_advantages: {len(r)} rewards but {len(ids)} group ids")
    members: dict[Any, list[float]] = {}
    for g, x in zip(ids, r, strict=True):
        members.setdefault(g, []).append(x)
    mean_std = {}
    for g, xs in members.items():
        if len(xs) == 1:
            mean_std[g] = (0.0, 1.0)
        else:
            m = sum(xs) / len(xs)
            mean_std[g] = (m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))
    adv, std = [], []
    for g, x in zip(ids, r, strict=True):
        m, sd = mean_std[g]
        adv.append((x - m) / (sd + eps) if std_norm else x - m)
        std.append(sd)
    return adv, std


def select_for_training(
    trajs: Sequence[Any],
    target: int,
    cfg: FilterConfig | None = None,
    std_norm: bool = False,
    drops: dict[str, int] | None = None,
    stats: list[tuple[float, float]] | None = None,
) -> list[tuple[int, float]]:
    """The trajectories a step trains on, as `[(index into trajs, advantage), ...]`, ranked.

    `trajs`: mappings or objects with `group_id, reward, n_tool_images, vision_ok, end_reason` (an EndReason
    or its name), complete groups, in generation order. `target <= 0` keeps every survivor (in generation
    order). `drops`, when given, is incremented per reason (DROP_REASONS); `stats`, when given, is filled
    with `(advantage, group_std)` for every trajectory, dropped ones included (0.0, 0.0 for sandbox errors).
    """
    cfg = cfg or FilterConfig()
    counts = dict.fromkeys(DROP_REASONS, 0)
    n = len(trajs)
    valid = [i for i in range(n) if _end(trajs[i]) != SANDBOX_ERROR]
    counts["sandbox_error"] = n - len(valid)
    gids = [_get(trajs[i], "group_id") for i in valid]
    rewards = [float(_get(trajs[i], "reward", 0.0)) for i in valid]
    adv, std = group_stats(rewards, gids, std_norm)
    adv_of = dict(zip(valid, adv, strict=True))
    std_of = dict(zip(valid, std, strict=True))
    if stats is not None:
        stats[:] = [(adv_of.get(i, 0.0), std_of.get(i, 0.0)) for i in range(n)]

    members: dict[Any, list[float]] = {}
    for g, r in zip(gids, rewards, strict=True):
        members.setdefault(g, []).append(r)
    tied = {g for g, rs in members.items() if len(rs) > 1 and max(rs) == min(rs)}  # population std == 0
    allowed = set(cfg.allowed_end_reasons)
    kept = []
    for i, g in zip(valid, gids, strict=True):
        t = trajs[i]
        if cfg.drop_zero_std and g in tied:
            counts["zero_std"] += 1
        elif cfg.require_tool_image and int(_get(t, "n_tool_images", 0)) <= 0:
            counts["no_tool_image"] += 1
        elif cfg.drop_vision_mismatch and not _get(t, "vision_ok", True):
            counts["vision_mismatch"] += 1
        elif allowed and _end(t) not in allowed:
            counts["end_reason"] += 1
        else:
            kept.append(i)
    if drops is not None:
        for k, v in counts.items():
            drops[k] = drops.get(k, 0) + v
    if target > 0:
        kept = sorted(kept, key=lambda i: -std_of[i])[:target]  # stable: ties keep generation order
    return [(i, adv_of[i]) for i in kept]


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
