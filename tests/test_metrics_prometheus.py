"""The `pyvision_*` metrics reach Ray's Prometheus endpoint (what the Ray dashboard and cluster/grafana/
read) during a real tiny run, with the values the run logged."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_overrides

from pyvision_rl.config import load_config
from pyvision_rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SERIES = re.compile(r"^(ray_pyvision_\w+)\{([^}]*)\} (\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, run: str) -> dict[str, float]:
    """{series name: value} of the run's pyvision series on the node's metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[3]) for m in SERIES.finditer(text) if f'run="{run}"' in m[2]}


@pytest.mark.slow
def test_pyvision_series_on_rays_prometheus_endpoint(tmp_path, tiny_model_dir):
    import ray

    from pyvision_rl.trainer import Trainer

    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        tiny_overrides(tmp_path, tiny_model_dir, name="prom", steps=2)
        + ["logging.rollouts_every=0", "trainer.eval_every=2", "eval.max_tasks=4", "eval.max_turns=2"],
    )
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=port)
    seen_during: list[dict[str, float]] = []
    done = threading.Event()

    def poll() -> None:  # scrape while the run trains, as Prometheus would
        while not done.wait(2.0):
            try:
                got = _scrape(port, "prom")
            except OSError:
                continue
            if got:
                seen_during.append(got)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        tr = Trainer(cfg)
        try:
            tr.fit()
        finally:
            tr.shutdown()
        last = read_metrics(cfg.run_dir())[-1]
        deadline = time.monotonic() + 90  # Ray exports every few seconds
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            got = _scrape(port, "prom")
            if got.get("ray_pyvision_version") == 2.0:
                break
            time.sleep(2)
    finally:
        done.set()
        poller.join(timeout=10)
        ray.shutdown()
    assert got.get("ray_pyvision_version") == 2.0, sorted(got)[:20]
    assert seen_during, "no pyvision series while the run was training"
    for key in (
        "rollout/acc_mean",
        "rollout/reward_mean",
        "rollout/tool_calls_mean",
        "rollout/end_reason/DONE",
        "filter/trajectories_trained",
        "time/step",
        "throughput/tokens_per_s",
        "train/loss",
        "events/worker_restarts",
    ):
        name = "ray_pyvision_" + re.sub(r"\W", "_", key).lower()
        assert name in got, f"{name} missing; have {sorted(got)[:30]}"
        assert math.isclose(got[name], float(last[key]), rel_tol=1e-6, abs_tol=1e-9), (
            name,
            got[name],
            last[key],
        )
    assert 0.0 <= got["ray_pyvision_rollout_acc_mean"] <= 1.0
    assert got["ray_pyvision_time_step"] > 0 and got["ray_pyvision_throughput_tokens_per_s"] > 0
    assert got["ray_pyvision_filter_trajectories_trained"] == 2 * 4  # train_batch_size x rollout.n
    # Every series the Grafana dashboard plots is one the run exports.
    dash = json.loads((REPO / "cluster/grafana/pyvision-rl.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    wanted = {n for e in exprs for n in re.findall(r"ray_pyvision_\w+", e)}
    assert wanted and wanted <= set(got), sorted(wanted - set(got))
