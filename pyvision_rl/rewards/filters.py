"""Oversampling filters and the group-std ranking (DESIGN §1).

Filters, each switchable in `reward.filters` and each counted in the returned `drops`:
- `overlength`: OVER_LENGTH trajectories (`drop_overlength`);
- `vision_mismatch`: vision-token groups that don't match the image grids (`drop_vision_mismatch`);
- `end_reason`: end reasons outside `allowed_end_reasons`;
- `no_tool_image`: no tool call returned an image (`require_tool_image`, the anti-collapse filter);
- `zero_std`: groups whose rewards (tool bonus included) all tie (`drop_zero_std`).

The per-trajectory filters run first and the tie check sees the survivors: the learner's group advantage
is taken over the kept members, so a group whose kept members tie (or a lone survivor) carries no signal.
A trajectory failing several filters is counted once, under the first reason in the order above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from pyvision_rl.config import FilterConfig
from pyvision_rl.types import EndReason, Trajectory

DROP_REASONS = ("overlength", "vision_mismatch", "end_reason", "no_tool_image", "zero_std")


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(x) else 0.0


def group_std(rewards: Iterable[float]) -> float:
    """Population std of a group's rewards; NaN/inf rewards count as 0; a group of one has std 0."""
    r = [_finite(x) for x in rewards]
    if len(r) < 2:
        return 0.0
    m = sum(r) / len(r)
    return math.sqrt(sum((x - m) ** 2 for x in r) / len(r))


def group_by_id(trajs: Iterable[Trajectory]) -> dict[str, list[Trajectory]]:
    """Trajectories grouped by `group_id`, groups and members in first-seen order."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.group_id, []).append(t)
    return groups


def _end(t: Trajectory) -> str:
    return t.end_reason.value if isinstance(t.end_reason, EndReason) else str(t.end_reason)


def _has_tool_image(t: Trajectory) -> bool:
    return t.n_tool_images > 0 or any(im.source == "tool" for im in t.images)


def trajectory_drop_reason(t: Trajectory, cfg: FilterConfig) -> str | None:
    """The first per-trajectory filter that drops `t`, or None if it survives them all."""
    end = _end(t)
    if cfg.drop_overlength and end == EndReason.OVER_LENGTH.value:
        return "overlength"
    if cfg.drop_vision_mismatch and not t.vision_ok:
        return "vision_mismatch"
    if cfg.allowed_end_reasons and end not in cfg.allowed_end_reasons:
        return "end_reason"
    if cfg.require_tool_image and not _has_tool_image(t):
        return "no_tool_image"
    return None


def filter_groups(trajs: Sequence[Trajectory], cfg: FilterConfig) -> tuple[list[Trajectory], dict[str, int]]:
    """Apply the filters to scored trajectories; returns (kept, drops) with drops[reason] = trajectories.

    Kept trajectories stay grouped (contiguous, first-seen group order). Every reason appears in `drops`.
    """
    drops = dict.fromkeys(DROP_REASONS, 0)
    kept: list[Trajectory] = []
    for members in group_by_id(trajs).values():
        survivors = []
        for t in members:
            reason = trajectory_drop_reason(t, cfg)
            if reason is None:
                survivors.append(t)
            else:
                drops[reason] += 1
        if cfg.drop_zero_std and survivors and group_std(t.reward for t in survivors) <= 1e-12:
            drops["zero_std"] += len(survivors)
            continue
        kept.extend(survivors)
    return kept, drops


def _std_size(g: Any) -> tuple[float, int]:
    if hasattr(g, "std") and hasattr(g, "size"):  # a summary (e.g. actors.reward.GroupRef)
        return _finite(g.std), int(g.size)
    return group_std(t.reward for t in g), len(g)


def rank_by_group_std(groups: Sequence[Any], k: int) -> list[Any]:
    """Groups sorted by reward std (descending, stable), keeping whole groups up to `k` trajectories.

    `groups` holds lists of Trajectory or summaries with `.std` and `.size`. Groups are taken greedily; one
    that would overflow `k` is skipped and smaller ones further down may still fill the rest. `k <= 0`
    keeps all. Whole groups keep the advantage baseline the same as the one the filters saw.
    """
    order = sorted(range(len(groups)), key=lambda i: -_std_size(groups[i])[0])
    if k <= 0:
        return [groups[i] for i in order]
    out, total = [], 0
    for i in order:
        size = _std_size(groups[i])[1]
        if total + size <= k:
            out.append(groups[i])
            total += size
        if total == k:
            break
    return out
