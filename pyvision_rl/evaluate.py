"""Evaluation: accuracy avg@k per data source with the evaluation turn budget, and a trajectory dump.

`run_agent` is the one way this package rolls out a model outside the RL loop (evaluation, demo
before/after tables): an HFEngine and a local sandbox behind the same AgentLoop the RolloutWorkers use.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from pyvision_rl.config import Config
from pyvision_rl.types import Task, Trajectory, trajectory_to_dict

log = logging.getLogger("pyvision_rl")


# What a checkpoint was trained with and evaluation must reuse: the prompt, the image resolution and the
# turn/length budget. Saved with every run checkpoint; `pyvision-rl eval` defaults to them.
TRAINED_WITH = (
    "rollout.prompt_template",
    "rollout.system_prompt",
    "model.min_pixels",
    "model.max_pixels",
    "rollout.max_turns",
    "rollout.max_new_tokens",
    "rollout.max_total_len",
    "eval.max_turns",
)
SETTINGS_FILE = "training_settings.json"


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def training_settings(cfg: Config) -> dict[str, Any]:
    """The `TRAINED_WITH` values of `cfg` (what `save_checkpoint` writes to training_settings.json)."""
    return {k: _get(cfg, k) for k in TRAINED_WITH}


def with_training_settings(cfg: Config, checkpoint: str | Path, explicit: set[str]) -> Config:
    """`cfg` with the checkpoint's training settings for every key the user did not set (`explicit`:
    dotted keys from --config and the overrides); a set key that differs is kept and warned about."""
    p = Path(checkpoint)
    found = next((c / SETTINGS_FILE for c in (p, p.parent) if (c / SETTINGS_FILE).is_file()), None)
    if found is None:
        log.info("%s: no %s (not a run checkpoint); using the given settings", p, SETTINGS_FILE)
        return cfg
    saved = json.loads(found.read_text())
    tree = cfg.model_dump(mode="json")
    for key, value in saved.items():
        if key not in TRAINED_WITH or _get(cfg, key) == value:
            continue
        if key in explicit:
            log.warning(
                "%s=%r differs from the %r this checkpoint was trained with (%s): the model sees another "
                "protocol than in training; drop the setting to evaluate what was trained",
                key,
                _get(cfg, key),
                value,
                found,
            )
            continue
        section, leaf = key.split(".")
        tree[section][leaf] = value
    from pyvision_rl.config import config_from_dict

    return config_from_dict(tree, f"{found} settings")


def resolve_model_dir(checkpoint: str | Path) -> Path:
    """A HF model dir from either the dir itself or a run checkpoint (which holds model/)."""
    p = Path(checkpoint)
    for cand in (p, p / "model"):
        if (cand / "config.json").is_file():
            return cand
    raise FileNotFoundError(
        f"{p}: neither a Hugging Face model dir nor a run checkpoint with model/config.json. "
        "Pass e.g. runs/<name>/checkpoints/step_<k> or a Qwen-VL checkpoint directory."
    )


def run_agent(
    cfg: Config,
    model_path: str | Path,
    tasks: list[Task],
    *,
    k: int = 1,
    temperature: float = 0.0,
    max_turns: int | None = None,
    feed_errors: bool = True,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Trajectory]:
    """Roll out `k` trajectories per task with the model at `model_path` and score them (acc, reward)."""
    from pyvision_rl.agent.loop import AgentLoop, LocalSandboxClient
    from pyvision_rl.engines.hf import HFEngine
    from pyvision_rl.rewards.verifiers import score_trajectory
    from pyvision_rl.sandbox import make_sandbox

    engine = HFEngine(str(model_path), min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    sandbox = make_sandbox(cfg.sandbox)
    loop = AgentLoop(
        engine,
        LocalSandboxClient(sandbox),
        engine.processor,
        cfg.rollout,
        temperature=temperature,
        max_turns=max_turns or cfg.rollout.max_turns,
        feed_errors=feed_errors,
        max_live=cfg.sandbox.max_kernels,
    )
    out: list[Trajectory] = []
    try:
        items = [(t, f"eval-{t.id}") for t in tasks for _ in range(k)]
        for i in range(0, len(items), batch_size):
            trajs = loop.run(items[i : i + batch_size], version=0, seed=seed + i)
            out.extend(score_trajectory(t, cfg.reward) for t in trajs)
    finally:
        loop.close()
        sandbox.close()
    return out


def run_eval(cfg: Config, model_path: str | Path, tasks: list[Task]) -> list[Trajectory]:
    """`run_agent` with the evaluation settings (`eval.k`, temperature, turn budget, feed_errors)."""
    e = cfg.eval
    return run_agent(
        cfg,
        model_path,
        tasks,
        k=e.k,
        temperature=e.temperature,
        max_turns=e.max_turns,
        feed_errors=e.feed_errors,
        seed=cfg.run.seed,
    )


def eval_report(trajs: list[Trajectory], k: int) -> dict[str, Any]:
    """avg@k accuracy overall and per data source, with tool-call statistics and end-reason shares."""
    by_src: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_src[t.data_source].append(t)

    def stats(ts: list[Trajectory]) -> dict[str, Any]:
        n = max(len(ts), 1)
        reasons: dict[str, int] = defaultdict(int)
        for t in ts:
            reasons[str(getattr(t.end_reason, "value", t.end_reason))] += 1
        return {
            f"acc_avg@{k}": sum(t.acc for t in ts) / n,
            "n_trajectories": len(ts),
            "tool_calls_mean": sum(t.n_tool_calls for t in ts) / n,
            "tool_calls_max": max((t.n_tool_calls for t in ts), default=0),
            "tool_calls_zero_ratio": sum(1 for t in ts if t.n_tool_calls == 0) / n,
            "tool_images_mean": sum(t.n_tool_images for t in ts) / n,
            "visual_tokens_mean": sum(t.visual_tokens for t in ts) / n,
            "end_reasons": {r: c / n for r, c in sorted(reasons.items())},
        }

    return {"overall": stats(trajs), "per_data_source": {s: stats(ts) for s, ts in sorted(by_src.items())}}


def write_trajectories(trajs: list[Trajectory], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t in trajs:
            f.write(json.dumps(trajectory_to_dict(t)) + "\n")


def evaluate_checkpoint(
    cfg: Config, checkpoint: str, data: str, out: str | None = None, explicit: set[str] = frozenset()
) -> dict[str, Any]:
    """`pyvision-rl eval CKPT DATA`: avg@k with `eval.*` settings and, for every key not in `explicit`,
    the checkpoint's training settings; writes eval.json + trajectories.jsonl."""
    from pyvision_rl.data import load_tasks

    model_dir = resolve_model_dir(checkpoint)
    cfg = with_training_settings(cfg, checkpoint, set(explicit))
    tasks = load_tasks(data, skip_bad=cfg.data.skip_bad_rows)
    if cfg.eval.max_tasks:
        tasks = tasks[: cfg.eval.max_tasks]
    trajs = run_eval(cfg, model_dir, tasks)
    report = {
        "checkpoint": str(model_dir),
        "data": str(data),
        "settings": training_settings(cfg),
        **eval_report(trajs, cfg.eval.k),
    }
    out_dir = Path(out) if out else Path(checkpoint) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    write_trajectories(trajs, out_dir / "trajectories.jsonl")
    log.info("eval written to %s", out_dir)
    return report
