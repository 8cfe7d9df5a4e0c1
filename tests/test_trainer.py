"""The driver through real Ray actors on CPU: a tiny run's metrics, exact resume, actor faults, bad input.

Everything is real: Ray, RolloutWorkers with the tiny Qwen-VL on transformers, SandboxPools on the process
(bwrap) backend, RewardServices and a DeepSpeed learner on gloo.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import tiny_overrides

from pyvision_rl.config import load_config
from pyvision_rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}


@pytest.mark.slow
def test_full_tiny_run_metrics(tmp_path, tiny_model_dir, ray_local):
    from pyvision_rl.trainer import Trainer

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(tmp_path, tiny_model_dir, steps=2)
        + ["trainer.eval_every=2", "eval.max_tasks=4", "eval.max_turns=2"],
    )
    tr = Trainer(cfg)
    try:
        last = tr.fit()
    finally:
        tr.shutdown()
    rows = read_metrics(cfg.run_dir())
    assert [r["step"] for r in rows] == [0, 1, 2]
    baseline, rows = rows[0], rows[1:]
    assert baseline["eval/count"] == 4 and 0.0 <= baseline["eval/acc_mean"] <= 1.0  # held-out before RL
    expected = {
        "rollout/reward_mean",
        "rollout/acc_mean",
        "rollout/tool_calls_mean",
        "rollout/tool_calls_min",
        "rollout/tool_calls_max",
        "rollout/tool_calls_zero_ratio",
        "rollout/tool_images_mean",
        "rollout/visual_tokens_mean",
        "chunks_used",
        "staleness_max",
        "time/rollout_and_reward",
        "time/train",
        "time/sync",
        "time/step",
        "throughput/tokens_per_s",
        "throughput/trajectories_per_s",
        "train/loss",
        "filter/groups_trained",
        "version",
        "eval/acc_mean",
    } | {f"rollout/end_reason/{r}" for r in ("DONE", "EXCEED_MAX_TURNS", "OVER_LENGTH", "ERROR_IN_ACTION")}
    for r in rows:
        missing = {k for k in expected - {"eval/acc_mean"} if k not in r}
        assert not missing, f"step {r['step']} lacks {missing}"
        assert r["rollout/count"] == r["chunks_used"] * 4 * 4  # every rollout of every chunk is summarized
        assert r["filter/groups_trained"] == 2
        assert 0.0 <= r["rollout/acc_mean"] <= 1.0
        assert (
            abs(
                sum(
                    r[f"rollout/end_reason/{x}"]
                    for x in (
                        "DONE",
                        "EXCEED_MAX_TURNS",
                        "OVER_LENGTH",
                        "EXCEED_MAX_IMAGES",
                        "ERROR_IN_ACTION",
                    )
                )
                - 1
            )
            < 1e-6
        )
        assert r["time/step"] >= r["time/train"] > 0 and r["throughput/tokens_per_s"] > 0
        assert r["rollout/visual_tokens_mean"] >= 16  # the input image alone is 16 tokens
        assert r["staleness_max"] == 0 and r["version"] == r["step"]
        assert math.isfinite(r["train/loss"])
    assert "eval/acc_mean" in rows[-1] and rows[-1]["eval/count"] == 4
    assert last["version"] == 2
    ck = cfg.run_dir() / "checkpoints" / "step_2"
    assert (ck / "COMPLETE").exists() and (ck / "model" / "config.json").exists()
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["cursor"] == rows[-1]["cursor"]
    # The checkpoint is an ordinary HF model directory.
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(ck / "model").model_type == "qwen2_5_vl"


def _trained(run_dir: Path) -> list[tuple[int, list[str], dict]]:
    return [(r["step"], r["trained_tasks"], r["cursor"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """A run SIGKILLed after its step-2 checkpoint and resumed sees the same prompts per step as one that
    ran straight through, and ends at the same step count."""
    cmd = [sys.executable, "-m", "pyvision_rl.cli", "train", str(REPO / "configs/tiny_cpu.yaml")]
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**ENV, "RAY_TMPDIR": ray_tmp}
    straight = tiny_overrides(tmp_path, tiny_model_dir, "straight", steps=4)
    subprocess.run(cmd + straight, env=env, check=True, cwd=REPO, capture_output=True, timeout=600)

    killed = tiny_overrides(tmp_path, tiny_model_dir, "killed", steps=4)
    proc = subprocess.Popen(
        cmd + killed,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = tmp_path / "killed" / "checkpoints" / "step_2" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never wrote its step-2 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    # Reap the Ray services of the killed run, by PID: only processes started with this run's RAY_TMPDIR.
    import psutil

    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            mine = any(ray_tmp in a for a in p.info["cmdline"] or ()) or (
                (p.info["environ"] or {}).get("RAY_TMPDIR") == ray_tmp
            )
        except (psutil.Error, TypeError):
            continue
        if mine and p.pid != os.getpid():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    time.sleep(1.0)
    subprocess.run(cmd + killed, env=env, check=True, cwd=REPO, capture_output=True, timeout=600)

    a, b = _trained(tmp_path / "straight"), _trained(tmp_path / "killed")
    assert [s for s, _, _ in b] == [1, 2, 3, 4]
    assert a == b
    assert (tmp_path / "killed" / "checkpoints" / "step_4" / "COMPLETE").exists()


@pytest.mark.slow
def test_killing_a_rollout_worker_loses_no_group(tmp_path, tiny_model_dir, ray_local):
    import ray

    from pyvision_rl.trainer import Trainer

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", tiny_overrides(tmp_path, tiny_model_dir, steps=1))
    tr = Trainer(cfg)
    killed = threading.Event()
    submit = tr._submit

    def submit_then_kill(sb):
        submit(sb)
        if not killed.is_set():  # the worker dies with this sub-batch in flight
            ray.kill(tr.workers[sb.worker], no_restart=False)
            killed.set()

    tr._submit = submit_then_kill
    try:
        m = tr.train_one_step()
    finally:
        tr.shutdown()
    assert killed.is_set()
    assert m["events/requeued_subbatches"] >= 1 and m["events/worker_restarts"] >= 1
    assert m["filter/groups_trained"] == 2
    # Every group of every chunk used was rolled out in full despite the kill.
    assert m["rollout/count"] == m["chunks_used"] * 4 * 4


@pytest.mark.slow
def test_killing_sandbox_kernels_mid_step_loses_no_group(tmp_path, tiny_model_dir, ray_local):
    """Kernels killed from outside (as an OOM killer or a crashed container would) cost at most their own
    trajectories' tool calls: every group still comes back complete and the step trains."""
    from pyvision_rl.trainer import Trainer

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", tiny_overrides(tmp_path, tiny_model_dir, steps=1))
    import psutil
    import ray

    tr = Trainer(cfg)
    stop = threading.Event()
    kills = []
    # Only this run's kernels: the processes under this trainer's SandboxPool actors (never a pattern
    # kill, which would hit the kernels of every run on the machine).
    pool_pids = ray.get([p.__ray_call__.remote(lambda self: os.getpid()) for p in tr.pools])

    def killer():
        while not stop.is_set():
            for pid in pool_pids:
                try:
                    procs = psutil.Process(pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for proc in procs:
                    try:
                        if any("kernel.py" in a for a in proc.cmdline()):
                            os.kill(proc.pid, signal.SIGKILL)
                            kills.append(proc.pid)
                    except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                        pass
            time.sleep(0.3)

    try:
        threading.Thread(target=killer, daemon=True).start()
        m = tr.train_one_step()
    finally:
        stop.set()
        tr.shutdown()
    assert kills, "no kernel was ever running"
    assert m["rollout/count"] == m["chunks_used"] * 4 * 4
    # a killed kernel is the sandbox's failure (SANDBOX_ERROR, never trained on): the step still fills,
    # from more groups when some of their trajectories were excluded
    assert m["filter/trajectories_trained"] == 2 * 4 and m["filter/groups_trained"] >= 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyvision_rl.cli", *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_config_stops_with_the_key_named(tmp_path):
    r = _cli("train", "configs/tiny_cpu.yaml", "trainer.totl_steps=3", f"run.output_dir={tmp_path}")
    assert r.returncode == 2
    assert "unknown key 'trainer.totl_steps'" in r.stderr and "trainer.total_steps" in r.stderr
    r = _cli("train", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_bad_data_stops_with_file_row_field(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "1", "image_path": "nope.png"}) + "\n")
    r = _cli(
        "train",
        "configs/tiny_cpu.yaml",
        f"run.output_dir={tmp_path}",
        f"model.path={tiny_model_dir}",
        f"data.train_path={data}",
    )
    assert r.returncode == 2
    assert str(data) in r.stderr and "row 1" in r.stderr and "image" in r.stderr
    r = _cli("train", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path}", f"model.path={tmp_path}")
    assert r.returncode == 2 and "model.path" in r.stderr


@pytest.mark.slow
def test_one_step_off_rollouts_are_bounded(tmp_path, tiny_model_dir, ray_local):
    """max_staleness=1: the next step's first chunk rolls out while the learner trains, and is trained one
    version later; nothing is ever more than one version stale."""
    from pyvision_rl.trainer import Trainer

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(tmp_path, tiny_model_dir, steps=3) + ["trainer.max_staleness=1"],
    )
    tr = Trainer(cfg)
    try:
        tr.fit()
    finally:
        tr.shutdown()
    rows = read_metrics(cfg.run_dir())
    assert [r["staleness_max"] for r in rows] == [0, 1, 1]
    assert all(r["filter/groups_trained"] == 2 for r in rows)


@pytest.mark.slow
def test_killing_the_reward_service_after_it_scored_loses_no_group(tmp_path, tiny_model_dir, ray_local):
    """SIGKILL the RewardService after it scored a step and before the learner fetched the trajectories:
    they are returns of calls the driver made (the driver owns them), so the step still trains on all of
    them with nothing rolled out again, and the restart is counted when the next reports come back."""
    import ray

    from pyvision_rl.trainer import Trainer

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", tiny_overrides(tmp_path, tiny_model_dir, steps=2))
    tr = Trainer(cfg)
    collect, killed = tr._collect_step, []

    def collect_then_kill():
        st = collect()
        if not killed:
            pid = tr._reward_pids[0]
            os.kill(pid, signal.SIGKILL)  # only the service this trainer started, by its pid
            killed.append(pid)
            time.sleep(1.0)
        return st

    tr._collect_step = collect_then_kill
    try:
        m1 = tr.train_one_step()
        m2 = tr.train_one_step()
        new_pid = tr._reward_pids[0]
    finally:
        tr.shutdown()
    assert killed and new_pid != killed[0]
    for m in (m1, m2):
        assert m["filter/groups_trained"] == 2 and m["filter/trajectories_trained"] > 0
        assert m["rollout/count"] == m["chunks_used"] * 4 * 4 and math.isfinite(m["train/loss"])
    assert m1["events/requeued_subbatches"] == m2["events/requeued_subbatches"] == 0
    assert m1["events/reward_restarts"] == 0 and m2["events/reward_restarts"] == 1
    assert ray.is_initialized()


def _two_workers(tmp_path: Path, model: Path, name: str, steps: int = 2) -> list[str]:
    """Overrides for runs with 2 rollout workers (and, where asked, 2 learner ranks) on 2 CPUs."""
    return tiny_overrides(tmp_path, model, name, steps=steps) + [
        "rollout.num_workers=2",
        "rollout.worker_num_cpus=0.5",
        "ray.learner_num_cpus=0.25",
    ]


@pytest.mark.slow
def test_a_dead_learner_rank_is_rebuilt_and_the_step_redone(tmp_path, tiny_model_dir, ray_local):
    """World size 2: rank 1 dies as step 2's learner step starts; the group is rebuilt from the step-1
    checkpoint and the step redone (counted). Past trainer.learner_retries the run stops, saying why."""
    import ray

    from pyvision_rl.actors.learner import LearnerGroup
    from pyvision_rl.trainer import Trainer

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        _two_workers(tmp_path, tiny_model_dir, "rank", steps=3)
        + ["rollout.num_workers=1", "learner.world_size=2", "trainer.learner_retries=1"],
    )
    tr = Trainer(cfg)
    try:
        tr.train_one_step()
        tr.save_checkpoint()  # step 1
        group = tr.learners
        real = LearnerGroup.train_step

        def rank_dies(self, refs):
            ray.kill(self.actors[1], no_restart=True)  # dies with the step's calls about to arrive
            return real(self, refs)

        group.train_step = rank_dies.__get__(group)
        m = tr.train_one_step()
        assert tr.learners is not group and m["events/learner_rebuilds"] == 1
        assert m["filter/trajectories_trained"] > 0 and math.isfinite(m["train/loss"])
        assert len(tr.learners.actors) == 2
        tr.save_checkpoint()  # step 2
        LearnerGroup.train_step = rank_dies  # every attempt of step 3 loses a rank
        try:
            with pytest.raises(RuntimeError, match=r"failed 2 times at step 3 \(trainer.learner_retries=1\)"):
                tr.train_one_step()
        finally:
            LearnerGroup.train_step = real
        assert tr.events["learner_rebuilds"] == 2
    finally:
        tr.shutdown()


@pytest.mark.slow
def test_deterministic_runs_agree(tmp_path, tiny_model_dir, ray_local):
    """run.deterministic: two 2-step runs of the same config and seed, 2 rollout workers each, log the same
    metrics (all but timings)."""
    from pyvision_rl.trainer import Trainer

    def run(name: str) -> list[dict]:
        cfg = load_config(
            REPO / "configs/tiny_cpu.yaml",
            _two_workers(tmp_path, tiny_model_dir, name)
            + ["run.deterministic=true", "trainer.save_every=10"],
        )
        tr = Trainer(cfg)
        try:
            tr.fit()
        finally:
            tr.shutdown()
        timing = ("time/", "throughput/")
        return [
            {k: v for k, v in r.items() if not k.startswith(timing) and not k.endswith(("_s", "_ms"))}
            for r in read_metrics(cfg.run_dir())
        ]

    a, b = run("det_a"), run("det_b")
    assert [r["step"] for r in a] == [1, 2]
    diff = {
        k: (x.get(k), y.get(k))
        for x, y in zip(a, b, strict=True)
        for k in x.keys() | y.keys()
        if x.get(k) != y.get(k)
    }
    assert not diff, diff
