"""Advantages and the PPO loss against values computed by hand."""

import math

import pytest
import torch

from pyvision_rl.learner.losses import entropy_from_logits, group_advantages, kl_k3, policy_loss, sft_loss


def test_group_advantages_by_hand():
    r = [1.0, 0.0, 1.3, 0.5, 0.5, 2.0]
    g = ["a", "a", "a", "b", "b", "c"]
    adv = group_advantages(r, g)
    # group a mean = 2.3/3; group b ties -> 0; lone c -> 0
    m = 2.3 / 3
    assert adv.tolist() == pytest.approx([1 - m, -m, 1.3 - m, 0.0, 0.0, 0.0], abs=1e-6)
    adv_n = group_advantages(r, g, std_norm=True)
    std = math.sqrt(((1 - m) ** 2 + m**2 + (1.3 - m) ** 2) / 2)  # unbiased
    assert adv_n[:3].tolist() == pytest.approx([(1 - m) / std, -m / std, (1.3 - m) / std], rel=1e-4)
    assert adv_n[3:].tolist() == [0.0, 0.0, 0.0]
    assert group_advantages([float("nan"), 1.0], [0, 0]).tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([1.0], [0, 1])


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


def test_kl_entropy_sft():
    assert kl_k3(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    d = math.log(2.0)  # ref - logp
    assert kl_k3(torch.tensor([0.0]), torch.tensor([d])).item() == pytest.approx(2 - d - 1)
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert sft_loss(torch.tensor([[-1.0, -3.0]]), torch.tensor([[1, 0]])).item() == pytest.approx(1.0)
