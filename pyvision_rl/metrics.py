"""Run logging: a metrics JSONL per run, wandb (scalars and rollout tables), a sink for the driver's Ray
gauges, and the interaction-collapse monitor.

The driver never sees trajectories, only small per-trajectory summaries (`TrajSummary` dicts made by the
RewardService); `summarize_rollouts` turns a step's summaries into the logged rollout metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pyvision_rl")

END_REASONS = ("DONE", "EXCEED_MAX_TURNS", "OVER_LENGTH", "EXCEED_MAX_IMAGES", "ERROR_IN_ACTION")


def trajectory_summary(t: Any) -> dict[str, Any]:
    """The few numbers the driver logs about one trajectory (built where the trajectory lives)."""
    return {
        "group_id": t.group_id,
        "task_id": t.task_id,
        "reward": float(t.reward),
        "acc": float(t.acc),
        "n_tool_calls": int(t.n_tool_calls),
        "n_tool_images": int(t.n_tool_images),
        "end_reason": getattr(t.end_reason, "value", str(t.end_reason)),
        "visual_tokens": int(t.visual_tokens),
        "length": len(t.prompt_ids) + len(t.response_ids),
        "model_tokens": int(sum(t.loss_mask)),
        "version": int(t.version),
        "data_source": t.data_source,
    }


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize_rollouts(summaries: list[dict[str, Any]], prefix: str = "rollout/") -> dict[str, float]:
    """Reward/accuracy means, tool-call mean/min/max/zero-ratio, tool images, end-reason shares, tokens."""
    if not summaries:
        return {f"{prefix}count": 0}
    tc = [s["n_tool_calls"] for s in summaries]
    reasons = Counter(s["end_reason"] for s in summaries)
    out = {
        f"{prefix}count": len(summaries),
        f"{prefix}reward_mean": _mean([s["reward"] for s in summaries]),
        f"{prefix}acc_mean": _mean([s["acc"] for s in summaries]),
        f"{prefix}tool_calls_mean": _mean(tc),
        f"{prefix}tool_calls_min": min(tc),
        f"{prefix}tool_calls_max": max(tc),
        f"{prefix}tool_calls_zero_ratio": sum(1 for x in tc if x == 0) / len(tc),
        f"{prefix}tool_images_mean": _mean([s["n_tool_images"] for s in summaries]),
        f"{prefix}visual_tokens_mean": _mean([s["visual_tokens"] for s in summaries]),
        f"{prefix}length_mean": _mean([s["length"] for s in summaries]),
        f"{prefix}model_tokens": sum(s["model_tokens"] for s in summaries),
    }
    for r in END_REASONS:
        out[f"{prefix}end_reason/{r}"] = reasons.get(r, 0) / len(summaries)
    return out


class CollapseMonitor:
    """Warns when mean tool calls per trajectory stay under `threshold` for `patience` steps."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.low_steps = threshold, patience, 0

    def update(self, tool_calls_mean: float, step: int) -> bool:
        if math.isnan(tool_calls_mean):
            return False
        self.low_steps = self.low_steps + 1 if tool_calls_mean < self.threshold else 0
        if self.low_steps >= self.patience:
            log.warning(
                "interaction collapse: mean tool calls %.3f < %.3f for %d steps (step %d). "
                "Consider reward.tool_bonus, reward.filters.require_tool_image=true or a lower learner.lr.",
                tool_calls_mean,
                self.threshold,
                self.low_steps,
                step,
            )
            return True
        return False


class MetricsLogger:
    """Appends one JSON line per step to <run>/metrics.jsonl and mirrors it to wandb and to `sink`."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Any,
        resume_step: int = 0,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():  # drop lines past the checkpoint we resumed from
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self._wandb = self._init_wandb(run_dir, cfg)
        self._sink = sink  # e.g. the driver's Ray gauges (Ray stays out of this module)

    @staticmethod
    def _init_wandb(run_dir: Path, cfg: Any):
        mode = cfg.logging.wandb
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "disabled":
            return None
        try:
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            os.environ.setdefault("WANDB_SILENT", "true")
            return wandb.init(
                project=cfg.logging.project,
                name=cfg.run.name,
                mode=mode,
                dir=str(run_dir),
                config=cfg.model_dump(mode="json"),
                resume="allow",
                id=_wandb_id(run_dir),
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
        except Exception as e:  # logging must never take the run down
            log.warning("wandb disabled: %s", e)
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=step)
            except Exception as e:
                log.warning("wandb log failed: %s", e)
        if self._sink is not None:
            try:
                self._sink(rec)
            except Exception as e:
                log.debug("metrics sink: %s", e)

    def log_rollouts(self, step: int, rows: list[dict[str, Any]], key: str = "rollouts") -> None:
        """The viewer's sample as a wandb Table (`viewer.table_rows`), the input image as a wandb Image."""
        if self._wandb is None or not rows:
            return
        try:
            import io

            import wandb
            from PIL import Image

            cols = list(rows[0])
            data = [
                [wandb.Image(Image.open(io.BytesIO(r[c]))) if c == "image" and r[c] else r[c] for c in cols]
                for r in rows
            ]
            self._wandb.log({key: wandb.Table(columns=cols, data=data)}, step=step)
        except Exception as e:  # logging must never take the run down
            log.warning("wandb rollout table failed: %s", e)

    def close(self) -> None:
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:
                pass


def _wandb_id(run_dir: Path) -> str:
    p = Path(run_dir) / ".wandb_id"
    if p.exists():
        return p.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    p.write_text(rid)
    return rid


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
