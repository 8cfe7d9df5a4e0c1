"""The `pyvision-rl` command: fast help (no heavy imports), `data convert`, `view`, eval's checkpoint settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pyvision_rl.config import load_config
from pyvision_rl.data import DataError, load_tasks
from pyvision_rl.evaluate import SETTINGS_FILE, training_settings, with_training_settings

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pyvision_rl.cli"]
HEAVY = ("torch", "transformers", "ray", "deepspeed", "wandb", "vllm", "matplotlib")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_help_of_every_command_imports_nothing_heavy():
    """Each `--help` parses every registrar without torch/transformers/Ray: the 7 s help was those imports."""
    code = (
        "import sys\n"
        "from pyvision_rl.cli import build_parser, main\n"
        "p = build_parser()\n"
        "cmds = [[c] for c in p._subparsers._group_actions[0].choices]\n"
        "cmds += [['sandbox', 'run'], ['data', 'convert']]\n"
        "for c in [[]] + cmds:\n"
        "    try:\n"
        "        main(c + ['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (c, e.code)\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\n"
        "print('CMDS', len(cmds))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-500:]
    n = int(r.stdout.rsplit("CMDS", 1)[1])
    assert n >= 10  # train eval sft demo make-data make-tiny-model sandbox data view + 2 nested


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(path)


def test_data_convert_release_layouts(tmp_path):
    """Raw validation rows (paths relative to an image root) and RL rows (absolute paths from the
    authors' machine, re-rooted) convert to rows that load_tasks reads back to the same tasks."""
    root = tmp_path / "images"
    _image(root / "vstar" / "a.jpg")
    val = tmp_path / "vstar_image_val_dataset.json"
    val.write_text(
        json.dumps(
            [
                {
                    "id": "0",
                    "question": "What colour?\n(A) red\n(B) blue",
                    "answer": "A",
                    "ability": "visual_search",
                    "data_source": "vstar",
                    "image_path": "vstar/a.jpg",
                }
            ]
        )
    )
    rl = tmp_path / "pyvision_image_rl_data.json"
    rl_row = {
        "prompt": [{"role": "user", "content": "<image>\nHow many?"}],
        "data_source": "thinklite",
        "ability": "math",
        "env_name": "pyvision_gym_w_image_hint",
        "reward_model": {"ground_truth": "3", "style": "model"},
        "extra_info": {"index": 7, "question": "How many?", "answer": "3", "split": "train"},
        "mm_hint": {"hint_path": "/mnt/authors/rl_data/vstar/a.jpg", "hint_type": "image"},
    }
    rl.write_text(json.dumps([rl_row]))
    out = tmp_path / "out"
    r = _run("data", "convert", str(val), "--image-root", str(root), "--out", str(out / "val.jsonl"))
    assert r.returncode == 0, r.stderr
    r = _run(
        "data",
        "convert",
        str(rl),
        "--image-root",
        str(root),
        "--strip-prefix",
        "/mnt/authors/rl_data/",
        "--out",
        str(out / "rl.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    (v,) = load_tasks(out / "val.jsonl")
    (t,) = load_tasks(out / "rl.jsonl")
    assert (v.id, v.answer, v.data_source) == ("0", "A", "vstar") and v.question.startswith("What colour?")
    assert (t.id, t.question, t.answer, t.data_source) == ("thinklite-7", "How many?", "3", "thinklite")
    assert v.images == t.images == [str((root / "vstar" / "a.jpg").resolve())]
    assert t.extra["env_name"] == "pyvision_gym_w_image_hint"
    # The same loader reads the original given the root: conversion changes nothing but the paths.
    (orig,) = load_tasks(rl, media_root=root, strip_prefix="/mnt/authors/rl_data/")
    assert (orig.id, orig.question, orig.answer) == (t.id, t.question, t.answer)


def test_data_convert_bad_rows_name_file_row_field(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.png")
    rows = [
        {"id": "0", "question": "q", "answer": "1", "data_source": "d", "image_path": "a.png"},
        {"id": "1", "question": "q", "data_source": "d", "image_path": "a.png"},  # no answer
        {"id": "2", "question": "q", "answer": "1", "data_source": "d", "image_path": "gone.png"},
    ]
    src = tmp_path / "x_image_val_dataset.json"
    src.write_text(json.dumps(rows))
    r = _run("data", "convert", str(src), "--image-root", str(root), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2
    with pytest.raises(DataError) as e:  # the CLI's message is load_tasks' message
        load_tasks(src, media_root=root)
    assert str(e.value) in r.stderr and "row 2, field 'answer'" in r.stderr
    r = _run(
        "data",
        "convert",
        str(src),
        "--image-root",
        str(root),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--skip-bad",
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 1 tasks" in r.stdout and "skipped 2 bad rows" in r.stdout
    assert "'image_path': 1" in r.stdout and "'answer': 1" in r.stdout


def test_eval_defaults_to_the_checkpoint_training_settings(tmp_path, caplog):
    """The demo's failure mode: eval without --config used the release prompt on a `tiny_tool` policy."""
    trained = load_config(REPO / "configs/tiny_cpu.yaml")
    ck = tmp_path / "checkpoints" / "step_2"
    (ck / "model").mkdir(parents=True)
    (ck / SETTINGS_FILE).write_text(json.dumps(training_settings(trained)))
    cfg = with_training_settings(load_config(None), ck / "model", explicit=set())  # the model dir works too
    assert training_settings(cfg) == training_settings(trained)
    assert cfg.rollout.prompt_template == "tiny_tool" and cfg.model.max_pixels == 12544
    assert cfg.eval.max_turns == trained.eval.max_turns
    with caplog.at_level(logging.WARNING, logger="pyvision_rl"):
        cfg = with_training_settings(
            load_config(None, ["rollout.prompt_template=vistool_with_img_info_v2"]),
            ck,
            explicit={"rollout.prompt_template"},
        )
    assert cfg.rollout.prompt_template == "vistool_with_img_info_v2"  # the user's choice is kept ...
    assert cfg.model.max_pixels == 12544  # ... the rest comes from the checkpoint
    assert any("rollout.prompt_template" in r.message and "tiny_tool" in r.message for r in caplog.records)
    # A bare HF model dir has no settings: the given config stands.
    assert with_training_settings(load_config(None), tmp_path / "elsewhere", set()) == load_config(None)


def test_view_serves_the_run_pages(tmp_path):
    rollouts = tmp_path / "run" / "rollouts"
    rollouts.mkdir(parents=True)
    (rollouts / "index.html").write_text("<html>index</html>")
    p = subprocess.Popen(
        [*CLI, "view", str(tmp_path / "run"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = p.stdout.readline()
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/index.html")
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"index" in resp.read()
    finally:
        p.terminate()
        p.wait(timeout=10)
    r = _run("view", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no rollouts/index.html" in r.stderr
