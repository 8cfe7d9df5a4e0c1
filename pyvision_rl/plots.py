"""PNG plots of a run's metrics JSONL: accuracy, reward, tool calls and visual tokens per step."""

from __future__ import annotations

from pathlib import Path

from pyvision_rl.metrics import read_metrics

PANELS = [
    ("accuracy", [("rollout/acc_mean", "rollout (sampled)"), ("eval/acc_mean", "held-out (greedy)")]),
    ("reward", [("rollout/reward_mean", "rollout reward"), ("train_batch/reward_mean", "trained groups")]),
    (
        "tool calls per trajectory",
        [
            ("rollout/tool_calls_mean", "mean"),
            ("rollout/tool_calls_zero_ratio", "share with 0"),
            ("rollout/tool_images_mean", "figures shown"),
        ],
    ),
    (
        "visual tokens per trajectory",
        [
            ("rollout/visual_tokens_mean", "rollout (sampled)"),
            ("eval/visual_tokens_mean", "held-out (greedy)"),
        ],
    ),
]
_FILES = {"accuracy": "accuracy", "reward": "reward", "tool": "tool_calls", "visual": "visual_tokens"}


def plot_run(
    run_dir: str | Path, out_dir: str | Path | None = None, uniform_1fps_tokens: float | None = None
) -> list[Path]:
    """Writes accuracy.png, reward.png, tool_calls.png, visual_tokens.png (and overview.png) under
    `out_dir` (<run>/plots). `uniform_1fps_tokens`: a reference line on the visual-token panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir)
    files = []
    fig_all, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax_all, (title, series) in zip(axes, PANELS, strict=True):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for a in (ax, ax_all):
            for key, label in series:
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    a.plot(xs, ys, marker="o" if len(pts) < 12 else None, label=label)
            if title.startswith("visual") and uniform_1fps_tokens is not None:
                a.axhline(uniform_1fps_tokens, color="grey", ls="--", label="uniform 1 fps (same clips)")
                a.set_yscale("log")
            a.set_title(title)
            a.set_xlabel("RL step")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        name = out / (_FILES[title.split()[0]] + ".png")
        fig.tight_layout()
        fig.savefig(name, dpi=100)
        plt.close(fig)
        files.append(name)
    fig_all.tight_layout()
    overview = out / "overview.png"
    fig_all.savefig(overview, dpi=100)
    plt.close(fig_all)
    files.append(overview)
    return files
