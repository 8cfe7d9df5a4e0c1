"""benchmarks/gpu_check.py's CPU-testable parts: the phase runner's timeout (kills the whole process group),
the JUnit and metrics readers that turn a GPU run into the JSON report, and the dry run itself."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_phase_timeout_kills_the_process_group(tmp_path):
    # a child that spawns a grandchild and both sleep: the phase must end at its limit, grandchild included
    pid_file = tmp_path / "pid"
    code = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open('{pid_file}', 'w').write(str(p.pid)); time.sleep(60)"
    t0 = time.perf_counter()
    p = gpu_check.run_phase("hang", [sys.executable, "-c", code], 2.0, tmp_path)
    assert p["timed_out"] and not p["ok"] and time.perf_counter() - t0 < 20
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"  # gone (or a zombie)
    ok = gpu_check.run_phase("ok", [sys.executable, "-c", "print('hi')"], 30.0, tmp_path)
    assert ok["ok"] and (tmp_path / "ok.log").read_text().strip() == "hi"


def test_junit_outcomes_and_rl_figures(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="t1"/>'
        '<testcase classname="a" name="t2"><failure message="x"/></testcase>'
        '<testcase classname="b" name="t3"><skipped/></testcase></testsuite></testsuites>'
    )
    assert gpu_check.junit_outcomes(tmp_path / "j.xml") == {
        "a::t1": "passed",
        "a::t2": "failed",
        "b::t3": "skipped",
    }
    rows = [
        {
            "step": k,
            "train/time_s": 2.0,
            "train/seq_tokens": 4000.0,
            "time/sync": 0.5,
            "throughput/tokens_per_s": 100.0 * k,
        }
        for k in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rl = gpu_check.rl_figures(tmp_path, params=700_000_000, vision_params=200_000_000, gpu_name="NVIDIA H200")
    assert rl["steps"] == 3 and rl["learner_tokens_per_s"] == pytest.approx(2000.0)
    assert rl["rollout_tokens_per_s"] == pytest.approx(250.0)  # steps 2 and 3: the first one warms up
    assert rl["mfu"] == pytest.approx(10 * 5e8 * 4000 / 2.0 / 989e12)
    assert gpu_check.rl_figures(tmp_path / "none", 1, 0, "x") == {"steps": 0}


def test_dry_run_writes_the_report(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        env={**__import__("os").environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["ok"] and rep["dry_run"] and 0.5e9 <= rep["model"]["params"] <= 1e9
    assert rep["model"]["vocab"] == 151_936 and rep["config"]["placement"] == "colocated"
    assert any("pyvision_rl.cli train" in c for c in rep["commands"])
