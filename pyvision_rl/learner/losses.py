"""GRPO advantages and the PPO policy loss (README, "Fidelity to PyVision-RL"), on plain torch tensors.

Advantages are per trajectory: r - mean(group) (Dr.GRPO; `std_norm=True` divides by the group's std, GRPO).
The loss is PPO's clipped surrogate with dual clip, averaged over model tokens only (token-mean over the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_advantages(
    rewards: Sequence[float] | torch.Tensor,
    group_ids: Sequence | torch.Tensor,
    std_norm: bool = False,
    eps: float = 1e-6,
    return_std: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantage of each trajectory, as the release computes it: reward minus its group's mean.

    The tensor form of `rewards.filters.group_stats` (the package's one definition, which the selection
    uses): `group_ids` a list, numpy array or tensor; with `std_norm`, divided by the group's unbiased std +
    `eps`; a group of one has mean 0 and std 1, as in the release; non-finite rewards count as 0.
    `return_std=True` also returns each trajectory's group std.
    """
    from pyvision_rl.rewards.filters import group_stats

    r = rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards
    adv, std = group_stats(r, group_ids, std_norm, eps)
    adv_t = torch.tensor(adv, dtype=torch.float32)
    return (adv_t, torch.tensor(std, dtype=torch.float32)) if return_std else adv_t


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, denom: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of `x` over the mask divided by `denom` (default: the number of masked tokens, at least 1)."""
    if denom is None:
        denom = mask.sum().clamp(min=1)
    return (x * mask).sum() / denom


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with dual clip, token-mean over `mask`.

    Shapes: `logp`, `old_logp`, `mask` are [B, T] (or [T]); `advantages` is [B] (broadcast over tokens) or
    the same shape as `logp`. Per token, with ratio ρ = exp(logp - old_logp) and advantage A:
    `l = max(-A ρ, -A clip(ρ, 1-clip_low, 1+clip_high))`, and for A < 0 with `dual_clip` > 1 also
    `l = min(l, -A · dual_clip)`. The loss is Σ l·mask / denom, `denom` defaulting to Σ mask (pass the
    global token count to get an exact token-mean across micro-batches and ranks).
    Metrics (masked means): clip_frac, dual_clip_frac, approx_kl (k3 of new to old), ratio_mean.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # exp overflow guard; such tokens are clipped anyway
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    if dual_clip and dual_clip > 1.0:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (clipped > pg3)
        per_token = torch.where(adv < 0, torch.minimum(clipped, pg3), clipped)
    else:
        dual = torch.zeros_like(mask, dtype=torch.bool)
        per_token = clipped
    loss = masked_mean(per_token, mask, denom)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        k3 = torch.exp(-log_ratio) - 1 + log_ratio  # KL(new || old) estimator, >= 0
        named = {"clip_frac": pg2 > pg1, "dual_clip_frac": dual, "approx_kl": k3, "ratio_mean": ratio}
        metrics = {k: float((x.to(mask.dtype) * mask).sum() / n) for k, x in named.items()}
    return loss, metrics


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, clamped to ±10."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
