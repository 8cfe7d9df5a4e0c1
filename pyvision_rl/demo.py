"""The embedded demo: tiny model -> synthetic tasks -> SFT cold start -> RL through every actor -> plots.

`make demo` (or `pyvision-rl demo configs/tiny_cpu.yaml`) runs it on a laptop-sized CPU machine and prints
held-out accuracy and tool use before and after RL; `make demo-video` (configs/tiny_cpu_video.yaml) does
the same on long clips and adds visual tokens per trajectory, frames shown, and what uniform 1 fps
sampling of the same clips would cost.
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

# Logged per RL step (metrics.summarize_rollouts) and reported for the first and the last step.
ROLLOUT_KEYS = (
    "rollout/acc_mean",
    "rollout/tool_calls_mean",
    "rollout/visual_tokens_mean",
    "rollout/tool_images_mean",
)


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
        "visual_tokens": o["visual_tokens_mean"],
        "frames_shown": o["tool_images_mean"],
    }


def uniform_1fps_visual_tokens(model_dir: str | Path, cfg: Config, tasks) -> float | None:
    """Mean visual tokens that showing each task's video at 1 fps would cost (None: no video tasks).

    Every frame at 0, 1, 2 ... s is one image to the policy's processor (the same processor and pixel
    limits that count the rollouts' figures), at the video's own frame size.
    """
    from PIL import Image

    from pyvision_rl.data.video import probe_video
    from pyvision_rl.models.loading import load_processor
    from pyvision_rl.models.processing import encode_images, image_token_count, merge_size_of

    videos = [t.videos[0] for t in tasks if t.videos]
    if not videos:
        return None
    processor = load_processor(model_dir, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    per_frame: dict[tuple[int, int], int] = {}
    total = 0
    for path in videos:
        info = probe_video(path)
        size = (info.width, info.height)
        if size not in per_frame:
            _, (grid,) = encode_images(processor, [Image.new("RGB", size)])
            per_frame[size] = image_token_count(grid, merge_size_of(processor))
        step = max(1, round(info.fps))
        total += len(range(0, info.n_frames, step)) * per_frame[size]
    return total / len(videos)


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
    train_tasks, held_out = prepare_data(cfg)
    held_out = held_out[: cfg.eval.max_tasks or None]
    uniform = uniform_1fps_visual_tokens(base_model, cfg, train_tasks)
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
    plots = plot_run(run_dir, uniform_1fps_tokens=uniform)
    times["total"] = time.perf_counter() - t_start

    summary: dict[str, Any] = {
        "before_rl": before,
        "after_rl": after,
        "final_checkpoint": str(final),
        "times_s": times,
        "plots": [str(p) for p in plots],
    }
    if uniform is not None:
        summary["uniform_1fps_visual_tokens_mean"] = uniform
    rows = [r for r in read_metrics(run_dir) if r.get("rollout/acc_mean") is not None]
    if rows:
        summary["rollout_first_step"] = {k: rows[0].get(k) for k in ROLLOUT_KEYS}
        summary["rollout_last_step"] = {k: rows[-1].get(k) for k in ROLLOUT_KEYS}
        summary["rollout_steps"] = [rows[0]["step"], rows[-1]["step"]]
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))

    cols = ("checkpoint", "accuracy", "tool calls / traj", "share without tool", "visual tokens / traj")
    table = Table(title=f"held-out ({len(held_out)} tasks, greedy, {cfg.eval.max_turns} turns)")
    for col in (*cols, "figures shown / traj"):
        table.add_column(col)
    for name, r in (("SFT cold start", before), (f"after RL ({final.name})", after)):
        table.add_row(
            name,
            f"{r['acc']:.3f}",
            f"{r['tool_calls']:.2f}",
            f"{r['zero_tool_share']:.2f}",
            f"{r['visual_tokens']:.1f}",
            f"{r['frames_shown']:.2f}",
        )
    console.print(table)
    console.print(f"accuracy gain through RL: [bold]{after['acc'] - before['acc']:+.3f}[/]")
    if rows:
        first, last = summary["rollout_first_step"], summary["rollout_last_step"]
        rl = Table(title=f"RL rollouts (sampled, T={cfg.rollout.temperature})")
        for col in (
            "RL step",
            "accuracy",
            "tool calls / traj",
            "visual tokens / traj",
            "figures shown / traj",
        ):
            rl.add_column(col)
        for step, r in zip(summary["rollout_steps"], (first, last), strict=True):
            rl.add_row(str(step), *(f"{r[k]:.2f}" for k in ROLLOUT_KEYS))
        if uniform is not None:
            rl.add_row("uniform 1 fps (same clips)", "", "", f"{uniform:.0f}", "")
        console.print(rl)
        console.print(
            f"sampled accuracy {first['rollout/acc_mean']:.2f} -> {last['rollout/acc_mean']:.2f}, "
            f"tool calls {first['rollout/tool_calls_mean']:.2f} -> {last['rollout/tool_calls_mean']:.2f}"
            + (
                f", visual tokens {last['rollout/visual_tokens_mean']:.0f} per trajectory vs {uniform:.0f} "
                f"at 1 fps ({uniform / max(last['rollout/visual_tokens_mean'], 1e-9):.0f}x fewer)"
                if uniform is not None
                else ""
            )
        )
    console.print(f"plots: {', '.join(str(p) for p in plots)}")
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}   total time {times['total'] / 60:.1f} min")
    return 0
