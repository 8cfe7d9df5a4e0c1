"""SFT cold start and evaluation through the CLI, on the tiny model, real sandbox and DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyvision_rl.cli", *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sft_then_eval(tmp_path, tiny_model_dir):
    common = [
        f"run.output_dir={tmp_path}",
        "run.name=s",
        f"model.path={tiny_model_dir}",
        "sandbox.backend=process",
        "sandbox.warm_kernels=2",
        "data.synthetic.n_train=12",
        "data.synthetic.n_eval=4",
        "logging.progress=false",
    ]
    r = cli(
        "sft",
        "configs/tiny_cpu.yaml",
        *common,
        "sft.steps=4",
        "sft.batch_size=4",
        "sft.max_tasks=8",
        "sft.tool_fraction=1.0",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sft_dir = tmp_path / "s" / "sft"
    log = json.loads((sft_dir / "sft_log.json").read_text())
    assert len(log["losses"]) == 4 and all(x > 0 for x in log["losses"])
    assert log["n_trajectories"] == 8  # every expert trajectory finished cleanly through the sandbox
    experts = [json.loads(ln) for ln in (sft_dir / "expert.jsonl").read_text().splitlines()]
    assert all(e["n_tool_calls"] == 1 and e["end_reason"] == "DONE" for e in experts)
    assert (sft_dir / "model" / "config.json").is_file()
    trained_with = json.loads((sft_dir / "training_settings.json").read_text())
    assert trained_with["rollout.max_turns"] == 3 and "rollout.prompt_template" in trained_with

    # A trajectory JSONL is also valid SFT input (sft.data_path).
    r = cli(
        "sft",
        "configs/tiny_cpu.yaml",
        *common,
        "run.name=s2",
        f"sft.data_path={sft_dir / 'expert.jsonl'}",
        "sft.steps=2",
        "sft.batch_size=4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "s2" / "sft" / "model" / "config.json").is_file()

    out = tmp_path / "ev"
    r = cli(
        "eval",
        str(sft_dir),
        str(tmp_path / "s" / "data" / "eval.jsonl"),
        "--config",
        "configs/tiny_cpu.yaml",
        "--out",
        str(out),
        "sandbox.backend=process",
        "eval.k=2",
        "eval.max_turns=3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "eval.json").read_text())
    assert rep["overall"]["n_trajectories"] == 8  # 4 tasks x k=2
    # eval defaults to what the SFT checkpoint was trained with, except what was set explicitly
    assert rep["settings"] == {**trained_with, "eval.max_turns": 3}
    assert 0.0 <= rep["overall"]["acc_avg@2"] <= 1.0
    assert "synthetic_count" in rep["per_data_source"]
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "response_text" in json.loads(lines[0])


def test_bad_sft_data_is_named(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a trajectory"}\n')
    r = cli(
        "sft",
        "configs/tiny_cpu.yaml",
        f"run.output_dir={tmp_path}",
        f"model.path={tiny_model_dir}",
        f"sft.data_path={bad}",
    )
    assert r.returncode == 2 and f"{bad}, line 1" in r.stderr


def test_eval_of_a_missing_checkpoint_is_named(tmp_path):
    r = cli("eval", str(tmp_path / "nope"), str(tmp_path / "d.jsonl"))
    assert r.returncode == 2 and "nope" in r.stderr and "checkpoint" in r.stderr
