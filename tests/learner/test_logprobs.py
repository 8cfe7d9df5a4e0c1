"""The chunked, model-token-only log-probs equal the straightforward full-logits computation (values, entropy
and gradients), apply the sampler's suppression mask, and gradient checkpointing leaves the frozen vision
tower out of backward."""

import pytest
import torch
from helpers import make_trajs

import pyvision_rl.models.processing as processing
from pyvision_rl.config import LearnerConfig, ModelConfig
from pyvision_rl.learner.batching import build_micro_batch
from pyvision_rl.learner.engine import _vision_module
from pyvision_rl.learner.losses import group_advantages, masked_mean, policy_loss
from pyvision_rl.models.loading import load_policy
from pyvision_rl.models.processing import suppressed_token_ids, token_logprobs


def full_logits_reference(model, inputs, suppress, temperature, mask):
    """The pre-chunking computation: (B, L, V) fp32 logits, masked, log-softmax everywhere."""
    logits = model(**inputs, use_cache=False).logits[:, :-1].float() / temperature
    logits = logits.index_fill(-1, suppress, -1e30)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, inputs["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * mask, ent * mask


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, proc = load_policy(tiny_model_dir)
    model.train()
    trajs = make_trajs(proc, n_groups=2, n=2, seed=7)
    adv = group_advantages([t.reward for t in trajs], [t.group_id for t in trajs])
    mb = build_micro_batch(proc, trajs, adv)
    sup = torch.tensor(suppressed_token_ids(proc, model.get_input_embeddings().num_embeddings))
    return model, proc, mb, sup


def _loss_and_grads(model, logp, ent, mb):
    pg, _ = policy_loss(logp, mb.rollout_logp, mb.advantages, mb.mask)
    loss = pg - 0.01 * masked_mean(ent, mb.mask)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_logits_with_gradients(setup, monkeypatch, temperature):
    model, _, mb, sup = setup
    ref_lp, ref_ent = full_logits_reference(model, mb.inputs, sup, temperature, mb.mask)
    ref_loss, ref_grads = _loss_and_grads(model, ref_lp, ref_ent, mb)
    # several chunks per micro-batch (the real chunk holds all of the tiny model's tokens)
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(processing, "LOGIT_CHUNK_ELEMS", 7 * vocab)
    lp, ent = token_logprobs(model, mb.inputs, sup, temperature, mask=mb.mask, entropy=True)
    assert mb.n_tokens > 3 * 7  # really chunked
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert (lp[mb.mask == 0] == 0).all()
    loss, grads = _loss_and_grads(model, lp, ent, mb)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], atol=1e-5, rtol=1e-4), n
    # and the entropy bonus really contributes a gradient of its own
    assert ref_ent[mb.mask > 0].min() > 0


def test_suppression_mask_is_the_samplers(setup):
    model, proc, mb, sup = setup
    with torch.no_grad():
        lp = token_logprobs(model, mb.inputs, sup)
        free = token_logprobs(model, mb.inputs)
    targets = mb.inputs["input_ids"][:, 1:]
    real = mb.inputs["attention_mask"][:, 1:] > 0
    banned = torch.isin(targets, sup) & real  # image pads, im_start: specials the sampler never emits
    assert banned.any() and (lp[banned] < -1e29).all()
    ok = real & ~banned
    # renormalised over the allowed tokens only: every allowed token is at least as likely as unmasked
    assert (lp[ok] >= free[ok] - 1e-6).all() and (lp[ok] > free[ok] + 1e-4).any()


def test_gradient_checkpointing_skips_the_frozen_vision_tower(tiny_model_dir):
    from pyvision_rl.learner.engine import PolicyLearner

    cfg = LearnerConfig(zero_stage=2, lr=3e-3, micro_batch_size=2)
    plain = PolicyLearner(tiny_model_dir, cfg, ModelConfig())
    ckpt = PolicyLearner(tiny_model_dir, cfg, ModelConfig(gradient_checkpointing=True))
    seen = []
    _vision_module(ckpt.model).register_forward_hook(lambda m, i, o: seen.append(_req_grad(o)))
    trajs = make_trajs(plain.processor, n_groups=2, n=2, seed=8)
    m1, m2 = plain.train_step(trajs), ckpt.train_step(trajs)
    assert seen and not any(seen)  # the ViT's output never joins the autograd graph
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    a, b = plain.state_dict_for_sync(), ckpt.state_dict_for_sync()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _req_grad(out) -> bool:
    ts = (
        [out]
        if isinstance(out, torch.Tensor)
        else [t for t in vars(out).values() if isinstance(t, torch.Tensor)]
    )
    return any(t.requires_grad for t in ts)
