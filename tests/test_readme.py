"""The README's "Using it" block, executed as written (in a scratch directory, `/tmp/` moved into it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def usage_commands() -> list[str]:
    """The shell commands of the first bash block under '## Using it', continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Using it\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_usage_block_is_what_this_test_runs():
    cmds = usage_commands()
    assert cmds[0] == "source .venv/bin/activate"
    verbs = [c.split()[1] for c in cmds if c.startswith("pyvision-rl ")]
    assert verbs == ["--help", "make-tiny-model", "make-data", "sandbox", "sft", "train", "eval", "view"]
    # the eval example names a checkpoint that the train example writes (step_<total_steps>)
    steps = re.search(r"trainer\.total_steps=(\d+)", next(c for c in cmds if " train " in c)).group(1)
    assert f"checkpoints/step_{steps} " in next(c for c in cmds if " eval " in c)


@pytest.mark.slow
def test_readme_usage_block_runs_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in (".venv", "configs"):
        (work / name).symlink_to(REPO / name)
    # A fresh shell, as a user has: no process-group variables leaked from earlier in-process learner tests.
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    cmds = [c.replace("/tmp/", f"{tmp_path}/") for c in usage_commands()]
    activate, *cmds = cmds
    for cmd in cmds:
        if cmd.startswith("pyvision-rl view"):
            continue
        r = subprocess.run(
            ["bash", "-c", f"{activate} && {cmd}"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        if cmd.startswith("pyvision-rl sandbox run"):
            out = json.loads(r.stdout)
            assert out["error"] is None and out["n_images"] == 1 and out["stdout"].strip().startswith("(")
    report = json.loads((work / "runs/quick/checkpoints/step_2/eval/eval.json").read_text())
    assert report["settings"]["rollout.prompt_template"] == "tiny_tool"  # what it was trained with
    assert report["overall"]["n_trajectories"] == 16
    (view,) = [c for c in cmds if c.startswith("pyvision-rl view")]
    p = subprocess.Popen(
        ["bash", "-c", f"{activate} && exec {view} --port 0"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = p.stdout.readline().split(" at ", 1)[1].split()[0]
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "step_2.html" in page and "eval_step_0.html" in page  # the last step and the baseline eval
    finally:
        p.terminate()
        p.wait(timeout=10)
