"""vLLM inside the system: a RolloutWorker actor on real Ray running the agent loop on a VLLMEngine with the
real Docker sandbox, and a 2-step tiny training with rollout.engine=vllm (`make test-vllm`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not importable here: run `make test-vllm`", allow_module_level=True)
ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from helpers import tiny_overrides  # noqa: E402
from test_vllm_engine import _scripted_weights  # noqa: E402 (same directory, pytest's rootdir import)

from pyvision_rl.config import Config, load_config  # noqa: E402
from pyvision_rl.types import EndReason  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(request) -> Path:
    env = os.environ.get("PYVISION_VLLM_MODEL_DIR")
    return Path(env) if env else request.getfixturevalue("tiny_model_dir")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from pyvision_rl.data import load_tasks
    from pyvision_rl.data.synthetic import make_dataset

    train, _ = make_dataset(tmp_path_factory.mktemp("vllm-data"), "color_count", 2, 0, seed=3)
    return load_tasks(train)


@pytest.mark.docker
def test_rollout_worker_on_vllm_runs_code_turns_in_docker(ray_local, tasks, model_dir):
    """Scripted weights make the policy write `print(1)` as a code turn on every turn: the worker's vLLM
    engine generates it, the Docker sandbox runs it, the observation goes back, and the second turn ends
    the trajectory at the turn budget. The log-probs and masks are the learner's contract."""
    from pyvision_rl.actors.rollout import RolloutWorker
    from pyvision_rl.actors.sandbox import SandboxPool
    from pyvision_rl.agent.protocol import ChatTokens, build_image_prompt
    from pyvision_rl.models import load_policy

    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.rollout.max_turns = 2
    cfg.rollout.max_new_tokens = 32
    cfg.rollout.max_total_len = 2048
    cfg.sandbox.backend = "docker"
    cfg.sandbox.warm_kernels = 2
    cfg.sandbox.timeout_s = 20.0
    pool = SandboxPool.remote(cfg.sandbox.model_dump(mode="json"))
    w = RolloutWorker.options(num_cpus=0.5).remote(str(model_dir), cfg.model_dump(mode="json"), [pool])
    try:
        assert ray.get(w.ping.remote())["engine"] == "VLLMEngine"
        hf = load_policy(model_dir)
        tok = hf[1].tokenizer
        last = ChatTokens(tok).prompt_ids(build_image_prompt("q", 8, 8), [1])[-1]
        script = tok("<code>\n```python\nprint(1)\n```\n</code>", add_special_tokens=False)["input_ids"]
        pad = tok.convert_tokens_to_ids("<|image_pad|>")
        ray.get(w.update_weights.remote(_scripted_weights(hf, last, script, pad), 3))
        refs = list(w.rollout.remote([(t, 2, f"g{i}") for i, t in enumerate(tasks)], 3, None))
        trajs = [t for g in ray.get(refs) for t in g]
    finally:
        ray.get(w.shutdown.remote())
        ray.get(pool.shutdown.remote())
    assert len(trajs) == 4
    for t in trajs:
        assert t.version == 3 and t.end_reason == EndReason.EXCEED_MAX_TURNS, t.end_reason
        assert t.n_tool_calls == 1 and t.n_turns == 2
        assert t.response_ids[: len(script)] == script  # turn 1, then the observation, then turn 2
        obs = tok.decode([i for i, m in zip(t.response_ids, t.loss_mask, strict=True) if not m])
        assert "Text Result:" in obs and "1" in obs
        model_lps = [lp for lp, m in zip(t.rollout_logprobs, t.loss_mask, strict=True) if m]
        assert len(model_lps) == 2 * len(script) and all(-1e-3 < lp <= 0.0 for lp in model_lps)
        assert len(t.response_ids) == len(t.loss_mask) == len(t.rollout_logprobs) and t.vision_ok


def test_two_step_training_with_vllm_rollouts(tmp_path, model_dir, ray_local):
    """The driver end to end with rollout.engine=vllm: rollouts on vLLM, weights synced into it after
    each step (version 0 -> 2), DeepSpeed learner on gloo."""
    from pyvision_rl.metrics import read_metrics
    from pyvision_rl.trainer import Trainer

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(tmp_path, model_dir, "vllm", steps=2) + ["rollout.engine=vllm"],
    )
    tr = Trainer(cfg)
    try:
        tr.fit()
    finally:
        tr.shutdown()
    rows = [r for r in read_metrics(cfg.run_dir()) if r.get("step", 0) > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["version"] == 2 and all(r["train/loss"] == r["train/loss"] for r in rows)  # not NaN
