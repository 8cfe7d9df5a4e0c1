"""Advantages and the PPO loss against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from pyvision_rl.learner.losses import group_advantages, kl_k3, policy_loss


def test_group_advantages_by_hand():
    r = [1.0, 0.0, 1.3, 0.5, 0.5, 2.0]
    g = ["a", "a", "a", "b", "b", "c"]
    adv, std = group_advantages(r, g, return_std=True)
    # group a mean = 2.3/3; group b ties -> 0; a lone c has mean 0 and std 1 as in the release -> its reward
    m = 2.3 / 3
    assert adv.tolist() == pytest.approx([1 - m, -m, 1.3 - m, 0.0, 0.0, 2.0], abs=1e-6)
    sa = math.sqrt(((1 - m) ** 2 + m**2 + (1.3 - m) ** 2) / 2)  # unbiased
    assert std.tolist() == pytest.approx([sa, sa, sa, 0.0, 0.0, 1.0], rel=1e-5)
    adv_n = group_advantages(r, g, std_norm=True)
    assert adv_n[:3].tolist() == pytest.approx([(1 - m) / sa, -m / sa, (1.3 - m) / sa], rel=1e-4)
    assert adv_n[3:].tolist() == pytest.approx([0.0, 0.0, 2.0 / (1 + 1e-6)])
    assert group_advantages([float("nan"), 1.0], [0, 0]).tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([1.0], [0, 1])


def test_group_ids_as_tensor_array_or_list_agree():
    """A tensor of ids used to make every 0-d tensor its own group (all advantages 0, silently)."""
    r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    ids = [0, 0, 1, 1, 2, 2]
    want = group_advantages(r, ids).tolist()
    assert want == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])
    assert group_advantages(torch.tensor(r), torch.tensor(ids)).tolist() == pytest.approx(want)
    assert group_advantages(np.array(r), np.array(ids)).tolist() == pytest.approx(want)
    assert group_advantages(r, np.array(["a", "a", "b", "b", "c", "c"])).tolist() == pytest.approx(want)


def test_policy_loss_by_hand():
    # 4 tokens, one sequence with A=+1 and one with A=-1; last token of seq 2 masked out.
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 4.0]]))  # ratios
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.2, 3.0)
    # seq1 tok1: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped)
    # seq1 tok2: ratio 0.9: max(-0.9, -0.9) = -0.9
    # seq2 tok1: ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped); dual clip min(0.8, 3) = 0.8
    expected = (-1.2 - 0.9 + 0.8) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 3)
    assert m["dual_clip_frac"] == 0.0
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)


def test_dual_clip_and_gradient():
    # A=-1 and ratio 5: clipped term = max(5, 1.2) = 5 -> dual clip caps at 3 (no gradient through ratio)
    logp = torch.log(torch.tensor([[5.0]])).requires_grad_()
    loss, m = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(3.0) and m["dual_clip_frac"] == 1.0
    loss.backward()
    assert logp.grad.abs().item() == 0.0
    # off: unbounded
    loss_off, _ = policy_loss(
        logp.detach(), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=0
    )
    assert loss_off.item() == pytest.approx(5.0)
    # unclipped region: d loss / d logp = -A * ratio / n_tokens
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2))
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -1.0])


def test_global_denominator_and_token_advantages():
    logp = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0]])
    loss, _ = policy_loss(logp, logp, adv, torch.ones(1, 3), denom=6.0)
    assert loss.item() == pytest.approx(-(1 + 2 + 3) / 6)


def test_kl_k3():
    assert kl_k3(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    d = math.log(2.0)  # ref - logp
    assert kl_k3(torch.tensor([0.0]), torch.tensor([d])).item() == pytest.approx(2 - d - 1)
