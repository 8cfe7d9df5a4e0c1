"""The embedded demo: tiny model -> synthetic tasks -> SFT cold start -> RL through every actor -> plots.

`make demo` (or `pyvision-rl demo configs/tiny_cpu.yaml`) runs it on a laptop-sized CPU machine and prints
held-out accuracy and tool use before and after RL.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pyvision_rl.config import Config, config_from_dict

log = logging.getLogger("pyvision_rl")


def _with(cfg: Config, **updates: Any) -> Config:
    """A copy of `cfg` with dotted-key updates, validated like any override."""
    tree = cfg.model_dump(mode="json")
    for key, value in updates.items():
        node = tree
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return config_from_dict(tree, "demo")


def _heldout(cfg: Config, model_dir: Path, tasks) -> dict[str, float]:
    from pyvision_rl.evaluate import eval_report, run_eval

    trajs = run_eval(cfg, model_dir, tasks)
    o = eval_report(trajs, cfg.eval.k)["overall"]
    return {
        "acc": o[f"acc_avg@{cfg.eval.k}"],
        "tool_calls": o["tool_calls_mean"],
        "zero_tool_share": o["tool_calls_zero_ratio"],
    }


def run_demo(cfg: Config) -> int:
    from rich.console import Console
    from rich.table import Table

    from pyvision_rl.metrics import read_metrics
    from pyvision_rl.plots import plot_run
    from pyvision_rl.sft import run_sft
    from pyvision_rl.trainer import prepare_data, prepare_model, train

    console = Console()
    t_start = time.perf_counter()
    run_dir = cfg.run_dir()
    if run_dir.exists():  # the demo always starts from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    times: dict[str, float] = {}

    if cfg.sandbox.backend == "auto":  # decide once, so every phase uses (and reports) the same boundary
        from pyvision_rl.sandbox.docker_backend import docker_available

        ok, why = docker_available(cfg.sandbox.image)
        cfg = _with(cfg, sandbox__backend="docker" if ok else "process")
        console.print(f"sandbox backend: [bold]{cfg.sandbox.backend}[/]" + ("" if ok else f" ({why})"))

    t0 = time.perf_counter()
    base_model = prepare_model(cfg)
    _, held_out = prepare_data(cfg)
    held_out = held_out[: cfg.eval.max_tasks or None]
    times["setup"] = time.perf_counter() - t0
    console.print(f"[bold]1/4[/] tiny model + {len(held_out)} held-out tasks ready ({times['setup']:.0f}s)")

    t0 = time.perf_counter()
    sft_model = run_sft(cfg, base_model, run_dir / "sft")
    times["sft"] = time.perf_counter() - t0
    console.print(f"[bold]2/4[/] SFT cold start done ({times['sft']:.0f}s): {sft_model}")

    t0 = time.perf_counter()
    before = _heldout(cfg, sft_model, held_out)
    times["eval_before"] = time.perf_counter() - t0
    console.print(
        f"[bold]3/4[/] SFT checkpoint held-out accuracy {before['acc']:.3f}, tool calls {before['tool_calls']:.2f}"
    )

    t0 = time.perf_counter()
    rl_cfg = _with(cfg, model__path=str(sft_model), run__resume="never")
    train(rl_cfg)
    times["rl"] = time.perf_counter() - t0
    final = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    t0 = time.perf_counter()
    after = _heldout(cfg, final / "model", held_out)
    times["eval_after"] = time.perf_counter() - t0
    plots = plot_run(run_dir)
    times["total"] = time.perf_counter() - t_start

    summary = {
        "before_rl": before,
        "after_rl": after,
        "final_checkpoint": str(final),
        "times_s": times,
        "plots": [str(p) for p in plots],
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))

    table = Table(title=f"held-out ({len(held_out)} tasks, greedy, {cfg.eval.max_turns} turns)")
    for col in ("checkpoint", "accuracy", "tool calls / traj", "share without tool"):
        table.add_column(col)
    table.add_row(
        "SFT cold start",
        f"{before['acc']:.3f}",
        f"{before['tool_calls']:.2f}",
        f"{before['zero_tool_share']:.2f}",
    )
    table.add_row(
        f"after RL ({final.name})",
        f"{after['acc']:.3f}",
        f"{after['tool_calls']:.2f}",
        f"{after['zero_tool_share']:.2f}",
    )
    console.print(table)
    console.print(f"accuracy gain through RL: [bold]{after['acc'] - before['acc']:+.3f}[/]")
    rows = [r for r in read_metrics(run_dir) if r.get("rollout/acc_mean") is not None]
    if rows:
        first, last = rows[0], rows[-1]
        summary["rollout_first_step"] = {k: first[k] for k in ("rollout/acc_mean", "rollout/tool_calls_mean")}
        summary["rollout_last_step"] = {k: last[k] for k in ("rollout/acc_mean", "rollout/tool_calls_mean")}
        (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
        console.print(
            f"RL rollouts (sampled, T={cfg.rollout.temperature}): accuracy {first['rollout/acc_mean']:.2f} -> "
            f"{last['rollout/acc_mean']:.2f}, tool calls {first['rollout/tool_calls_mean']:.2f} -> "
            f"{last['rollout/tool_calls_mean']:.2f} (step {first['step']} -> {last['step']})"
        )
    console.print(f"plots: {', '.join(str(p) for p in plots)}")
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}   total time {times['total'] / 60:.1f} min")
    return 0
