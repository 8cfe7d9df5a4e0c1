"""PolicyLearner at world size 1 (real DeepSpeed ZeRO-2 on gloo): an RL step moves the policy the right way,
SFT lowers the NLL, save/load round-trips, and an in-process sync makes a plain HF model match."""

import math
import os

import pytest
import torch
from helpers import make_trajs

from pyvision_rl.config import LearnerConfig, ModelConfig
from pyvision_rl.learner.batching import build_micro_batch
from pyvision_rl.learner.engine import _vision_module
from pyvision_rl.learner.losses import group_advantages
from pyvision_rl.learner.weight_sync import InProcessSync, load_named_tensors, pack_bucket, unpack_bucket
from pyvision_rl.models.loading import load_policy
from pyvision_rl.models.processing import suppressed_token_ids, token_logprobs


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    from pyvision_rl.learner.engine import PolicyLearner

    lrn = PolicyLearner(
        tiny_model_dir, LearnerConfig(zero_stage=2, lr=3e-3, micro_batch_size=3), ModelConfig()
    )
    yield lrn


def surrogate(adv, old, new):
    """PPO objective at ratio exp(new-old): -Σ_i A_i Σ_t ρ / N (what a step must lower)."""
    n = sum(len(o) for o in old)
    return -sum(a * torch.exp(nw - o).sum() for a, o, nw in zip(adv.tolist(), old, new, strict=True)) / n


def test_rl_step_lowers_the_surrogate_and_freezes_vision(learner):
    trajs = make_trajs(learner.processor, n_groups=2, n=4, seed=1)
    adv = group_advantages([t.reward for t in trajs], [t.group_id for t in trajs])
    vis_before = _vision_module(learner.model).patch_embed.proj.weight.detach().clone()
    old = learner.model_token_logprobs(trajs)
    m = learner.train_step(trajs)
    new = learner.model_token_logprobs(trajs)
    assert surrogate(adv, old, new) < surrogate(adv, old, old) - 1e-3
    assert m["trajectories"] == 8 and m["tokens"] == sum(sum(t.loss_mask) for t in trajs)
    assert m["grad_norm"] > 0 and math.isfinite(m["loss"])
    assert "entropy" not in m  # entropy_coef = 0: no softmax over the vocabulary was computed
    # recomputed old log-probs differ from the fake rollout ones (-1.0): the diagnostic sees it
    assert m["rollout_logp_abs_diff"] > 0.1
    assert torch.equal(
        vis_before, _vision_module(learner.model).patch_embed.proj.weight
    )  # vision tower frozen


def test_entropy_bonus_reports_entropy(tiny_model_dir):
    from pyvision_rl.learner.engine import PolicyLearner

    lrn = PolicyLearner(tiny_model_dir, LearnerConfig(zero_stage=2, entropy_coef=0.01), ModelConfig())
    m = lrn.train_step(make_trajs(lrn.processor, n_groups=1, n=2, seed=6))
    assert 0 < m["entropy"] < math.log(lrn.model.get_output_embeddings().out_features)


def test_sft_lowers_nll(learner):
    trajs = make_trajs(learner.processor, n_groups=1, n=4, seed=2)
    before = learner.eval_loss(trajs)
    for _ in range(3):
        learner.sft_step(trajs, lr=3e-3)
    assert learner.eval_loss(trajs) < before - 0.05


def test_in_process_sync_makes_hf_model_match(learner, other_model_dir):
    hf, proc = load_policy(other_model_dir)
    trajs = make_trajs(learner.processor, n_groups=1, n=2, seed=3)
    mb = build_micro_batch(proc, trajs, [0.0, 0.0])
    inputs, mask = mb.inputs, mb.mask.bool()
    sup = suppressed_token_ids(proc, hf.get_input_embeddings().num_embeddings)

    class Engine:
        version = -1

        def update_weights(self, named, version):
            load_named_tensors(hf, named)
            self.version = version

    with torch.no_grad():
        mine = token_logprobs(learner.model, inputs, sup)
        before = token_logprobs(hf, inputs, sup)
        assert (mine - before)[mask].abs().max() > 1e-2  # really different weights to start with
        eng = Engine()
        stats = InProcessSync(bucket_mb=1).sync(learner, [eng], version=7)
        after = token_logprobs(hf, inputs, sup)
    assert eng.version == 7 and stats["buckets"] >= 2
    assert torch.allclose(mine[mask], after[mask], atol=1e-5)


def test_pack_roundtrip_keeps_bf16():
    named = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.float32)}
    out = unpack_bucket(pack_bucket(named))
    assert all(torch.equal(named[k], out[k]) and out[k].dtype == named[k].dtype for k in named)


def test_save_load_roundtrip(learner, tmp_path):
    learner.save(str(tmp_path / "ck"))
    hf, _ = load_policy(tmp_path / "ck" / "model")  # a plain transformers-loadable dir
    sd = learner.state_dict_for_sync()
    hf_params = dict(hf.named_parameters())
    assert all(torch.equal(hf_params[k], v) for k, v in sd.items())
    trajs = make_trajs(learner.processor, n_groups=1, n=2, seed=4)
    learner.train_step(trajs)
    assert not all(torch.equal(learner.state_dict_for_sync()[k], v) for k, v in sd.items())
    learner.load(str(tmp_path / "ck"))
    assert all(torch.equal(learner.state_dict_for_sync()[k], v) for k, v in sd.items())


def test_world_size_one_takes_a_free_port_when_the_inherited_one_is_held():
    """A CLI run started from a process that holds its MASTER_PORT (an in-process learner earlier in the same
    shell or pytest session) must not die with EADDRINUSE: world size 1 has no peer to agree with."""
    import socket
    import subprocess
    import sys

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = (
            "import os, torch.distributed as dist\n"
            "from pyvision_rl.learner.engine import init_process_group\n"
            "init_process_group(0, 1, 'gloo')\n"
            f"assert dist.is_initialized() and os.environ['MASTER_PORT'] != '{port}'\n"
            "print('ok', os.environ['MASTER_PORT'])\n"
        )
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("ok"), r.stdout[-2000:]
