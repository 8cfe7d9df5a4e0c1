"""GRPO advantages and the PPO policy loss (DESIGN §1), on plain torch tensors.

Advantages are per trajectory: r - mean(group) (Dr.GRPO; `std_norm=True` divides by the group's std, GRPO).
The loss is PPO's clipped surrogate with dual clip, averaged over model tokens only (token-mean over the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=dtype)


def group_advantages(
    rewards: Sequence[float] | torch.Tensor,
    group_ids: Sequence | torch.Tensor,
    std_norm: bool = False,
    eps: float = 1e-6,
    return_std: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantage of each trajectory, as the release computes it: reward minus its group's mean.

    `group_ids`: a list, numpy array or tensor of ids (hashables; tensor/array elements compare by value).
    With `std_norm`, divided by the group's unbiased std + `eps` (GRPO; off: Dr.GRPO, the paper's setting).
    A group of one has mean 0 and std 1, as in the release (`compute_grpo_outcome_advantage`), so its
    advantage is its reward. Non-finite rewards count as 0. `return_std=True` also returns each
    trajectory's group std (unbiased), the number the selection ranks groups by.
    """
    r = _as_tensor(rewards)
    r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
    ids = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
    if len(ids) != r.numel():
        raise ValueError(f"group_advantages: {r.numel()} rewards but {len(ids)} group ids")
    index: dict = {}
    gidx = torch.tensor([index.setdefault(g, len(index)) for g in ids], dtype=torch.long)
    n_groups = len(index)
    counts = torch.zeros(n_groups).index_add_(0, gidx, torch.ones_like(r))
    mean = torch.zeros(n_groups).index_add_(0, gidx, r) / counts.clamp(min=1)
    mean = torch.where(counts > 1, mean, torch.zeros_like(mean))
    sq = torch.zeros(n_groups).index_add_(0, gidx, (r - mean[gidx]) ** 2)
    std = torch.where(counts > 1, torch.sqrt(sq / (counts - 1).clamp(min=1)), torch.ones_like(mean))
    adv = r - mean[gidx]
    if std_norm:
        adv = adv / (std[gidx] + eps)
    return (adv, std[gidx]) if return_std else adv


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
    Metrics: clip_frac, dual_clip_frac, approx_kl (k3 of new to old), ratio_mean, ratio_max (masked).
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
        metrics = {
            "clip_frac": float(((pg2 > pg1).to(mask.dtype) * mask).sum() / n),
            "dual_clip_frac": float((dual.to(mask.dtype) * mask).sum() / n),
            "approx_kl": float((k3 * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "ratio_max": float(torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max())
            if mask.any()
            else 1.0,
        }
    return loss, metrics


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, clamped to ±10."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
