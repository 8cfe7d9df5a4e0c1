"""Multi-turn SFT cold start: loss on the model's tokens only, on the same DeepSpeed learner as RL.

Data: a trajectory JSONL (`sft.data_path`, as written by `pyvision-rl eval` or `expert_trajectories`), or,
when empty, scripted expert trajectories for the synthetic tasks, produced through the real agent loop
and sandbox (so observations are exactly what the policy will see in RL).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from pyvision_rl.config import Config, ConfigError
from pyvision_rl.types import EndReason, Task, Trajectory, trajectory_from_dict

log = logging.getLogger("pyvision_rl")


def expert_trajectories(
    cfg: Config, model_path: str, tasks: list[Task], tool_fraction: float, seed: int
) -> list[Trajectory]:
    """Scripted expert trajectories (tool use for `tool_fraction` of tasks, direct answers otherwise)."""
    from pyvision_rl.agent.loop import AgentLoop, LocalSandboxClient
    from pyvision_rl.agent.scripted import ScriptedEngine
    from pyvision_rl.data.synthetic import expert_turns
    from pyvision_rl.models.loading import load_processor
    from pyvision_rl.sandbox import make_sandbox

    rng = random.Random(seed)
    processor = load_processor(model_path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    turns = {t.id: expert_turns(t, use_tool=rng.random() < tool_fraction) for t in tasks}
    engine = ScriptedEngine.from_turns(processor.tokenizer, turns)
    sandbox = make_sandbox(cfg.sandbox)
    loop = AgentLoop(
        engine,
        LocalSandboxClient(sandbox),
        processor,
        cfg.rollout,
        feed_errors=True,
        max_live=cfg.sandbox.max_kernels,
    )
    try:
        trajs = loop.run([(t, f"sft-{t.id}") for t in tasks], version=0)
    finally:
        loop.close()
        sandbox.close()
    good = [t for t in trajs if t.end_reason == EndReason.DONE and t.vision_ok]
    if len(good) < len(trajs):
        log.warning(
            "%d of %d expert trajectories did not finish cleanly; dropped", len(trajs) - len(good), len(trajs)
        )
    return good


def load_trajectory_jsonl(path: str | Path) -> list[Trajectory]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"sft.data_path={p} does not exist (a trajectory JSONL, e.g. from `pyvision-rl eval`)."
        )
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(trajectory_from_dict(json.loads(line)))
        except Exception as e:
            raise ConfigError(f"{p}, line {i}: not a trajectory record ({type(e).__name__}: {e})") from None
    return out


def run_sft(cfg: Config, model_path: str | None = None, out_dir: Path | None = None) -> Path:
    """Train `sft.steps` steps of SFT and save to `out_dir` (default <run>/sft); returns the HF model dir."""
    from pyvision_rl.evaluate import SETTINGS_FILE, training_settings, write_trajectories
    from pyvision_rl.learner.engine import PolicyLearner
    from pyvision_rl.trainer import prepare_data, prepare_model

    out_dir = Path(out_dir or cfg.run_dir() / "sft")
    model_path = model_path or prepare_model(cfg)
    if cfg.sft.data_path:
        trajs = load_trajectory_jsonl(cfg.sft.data_path)
    else:
        train, _ = prepare_data(cfg)
        t0 = time.perf_counter()
        tasks = train[: cfg.sft.max_tasks or None]
        trajs = expert_trajectories(cfg, model_path, tasks, cfg.sft.tool_fraction, cfg.run.seed)
        log.info("built %d expert trajectories in %.1fs", len(trajs), time.perf_counter() - t0)
        write_trajectories(trajs, out_dir / "expert.jsonl")
    if not trajs:
        raise ConfigError("no SFT trajectories: check sft.data_path or the synthetic data settings.")
    if cfg.learner.world_size != 1:
        log.warning(
            "SFT runs in-process with world size 1 (learner.world_size=%d is used by RL)",
            cfg.learner.world_size,
        )
    learner_cfg = cfg.learner.model_copy(
        update={"lr": cfg.sft.lr, "micro_batch_size": cfg.sft.batch_size, "mini_batch_size": 0}
    )
    learner = PolicyLearner(model_path, learner_cfg, cfg.model, rank=0, world_size=1)
    rng = random.Random(cfg.run.seed)
    try:
        from tqdm import tqdm

        bar = tqdm(range(cfg.sft.steps), desc="sft", disable=not cfg.logging.progress, dynamic_ncols=True)
        losses = []
        for _ in bar:
            batch = rng.sample(trajs, min(cfg.sft.batch_size, len(trajs)))
            m = learner.sft_step(batch, lr=cfg.sft.lr)
            losses.append(m["sft_loss"])
            bar.set_postfix(loss=f"{m['sft_loss']:.3f}")
        learner.save(str(out_dir))
    finally:
        learner.close()
    (out_dir / "sft_log.json").write_text(json.dumps({"losses": losses, "n_trajectories": len(trajs)}))
    # what `pyvision-rl eval` of this checkpoint defaults to (the turn budget, template... it was trained with)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(training_settings(cfg), indent=1))
    return out_dir / "model"
