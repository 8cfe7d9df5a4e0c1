"""The data that moves between parts (README, "Architecture"): Task, ExecResult, Trajectory, EndReason.

Plain dataclasses, picklable, with no torch inside so they travel cheaply through Ray's object store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class EndReason(enum.StrEnum):
    """Why a trajectory stopped (byte-compatible names with the PyVision-RL release)."""

    DONE = "DONE"
    EXCEED_MAX_TURNS = "EXCEED_MAX_TURNS"
    OVER_LENGTH = "OVER_LENGTH"
    EXCEED_MAX_IMAGES = "EXCEED_MAX_IMAGES"
    ERROR_IN_ACTION = "ERROR_IN_ACTION"
    # Ours, not the release's: the sandbox itself failed (not the model's code). Never trained on, counted.
    SANDBOX_ERROR = "SANDBOX_ERROR"


@dataclass
class Task:
    """One dataset row. `images`/`videos` are local file paths; `answer` is the ground truth."""

    id: str
    question: str
    answer: str
    data_source: str = "default"
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecResult:
    """What one code cell produced in the sandbox. `images` are PNG bytes, in `plt.show()` order."""

    stdout: str = ""
    images: list[bytes] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    # True when the failure is the sandbox's (kernel died, could not open, overload), not the code's.
    sandbox_error: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


@dataclass
class ImageRef:
    """An image inside a trajectory: PNG bytes plus the grid (t, h, w) the processor gave it."""

    png: bytes
    grid_thw: tuple[int, int, int]
    source: str = "input"  # "input" | "tool"


@dataclass
class Trajectory:
    """Token-in-token-out record of one rollout. Text produced by the model is never re-tokenized.

    `response_ids` holds everything after the prompt (model tokens and observation tokens);
    `loss_mask[i]` is 1 exactly where `response_ids[i]` was sampled by the model and
    `rollout_logprobs[i]` is its sampling log-prob (0.0 on observation tokens).
    """

    task_id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    n_tool_calls: int = 0  # successfully executed code turns
    n_tool_attempts: int = 0  # all code turns, including failed ones
    n_tool_images: int = 0
    n_turns: int = 0
    end_reason: EndReason = EndReason.ERROR_IN_ACTION
    final_answer: str | None = None
    response_text: str = ""  # decoded model+observation text, for logging and verifiers only
    ground_truth: str = ""
    data_source: str = "default"
    reward: float = 0.0
    acc: float = 0.0
    version: int = 0
    visual_tokens: int = 0
    vision_ok: bool = True  # vision-token groups == image grids (checked by the agent loop)
    advantage: float = 0.0  # full-group advantage set by the selection (rewards.filters.select_for_training)
    group_std: float = 0.0  # the full group's unbiased reward std, set with `advantage`
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def trajectory_to_dict(t: Trajectory) -> dict[str, Any]:
    """JSON-safe dict (images as base64 PNG) for trajectory JSONL files (eval dumps, SFT data)."""
    import base64
    from dataclasses import asdict

    d = asdict(t)
    d["end_reason"] = t.end_reason.value
    d["images"] = [
        {"png_b64": base64.b64encode(im.png).decode(), "grid_thw": list(im.grid_thw), "source": im.source}
        for im in t.images
    ]
    return d


def trajectory_from_dict(d: dict[str, Any]) -> Trajectory:
    """Inverse of `trajectory_to_dict`; raises KeyError/ValueError on a malformed record."""
    import base64

    d = dict(d)
    d["end_reason"] = EndReason(d["end_reason"])
    d["images"] = [
        ImageRef(
            png=base64.b64decode(im["png_b64"]),
            grid_thw=tuple(im["grid_thw"]),
            source=im.get("source", "input"),
        )
        for im in d.get("images", [])
    ]
    known = set(Trajectory.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown trajectory fields {sorted(unknown)}")
    return Trajectory(**d)
