"""The multi-turn agent loop: many trajectories, one batched generate per turn, code run in the sandbox.

Token-in-token-out: prompt ids are rendered once, the model's sampled ids are appended as they came
(minus any vision special token it generated, which has no image features), observations are appended as
ids rendered from the protocol strings (loss mask 0, logprob 0). Images are encoded with the policy's
processor; an observation with images is appended only when it fits in `max_total_len` and
`max_images`, so a vision block in the context always has its image. Every trajectory is checked at the
end: its vision-token groups must equal its images' grids (`vision_ok`).

Limits, in the order they are checked after each model turn:
  OVER_LENGTH        the context reached `max_total_len`, or the turn was cut by the length budget, or an
                     observation (text or images) would not fit;
  ERROR_IN_ACTION    the turn hit `max_new_tokens` (the release treats this as a malformed action); no code
                     and no answer, or a Python error/timeout, when `feed_errors` is off (with it on, the
                     error text is fed back, as in evaluation); a sandbox failure (one trajectory only);
  DONE               a closed `<answer>` block (it wins over code in the same turn, as in the release);
  EXCEED_MAX_TURNS   a code (or malformed, with feed_errors) turn was the `max_turns`-th: not executed;
  EXCEED_MAX_IMAGES  the figures of an execution would take the trajectory past `max_images`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyvision_rl.agent.protocol import (
    DEFAULT_SYSTEM_PROMPT,
    FORMAT_ERROR_MESSAGE,
    IMAGE_TEMPLATE_KEY,
    TIMEOUT_ERROR_MESSAGE,
    VIDEO_TEMPLATE_KEY,
    Action,
    ChatTokens,
    build_image_prompt,
    build_video_prompt,
    load_templates,
    parse_action,
)
from pyvision_rl.engines.base import GenerationEngine, GenerationRequest, SamplingParams
from pyvision_rl.types import EndReason, ExecResult, ImageRef, Task, Trajectory

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sandbox clients


class SandboxClient(Protocol):
    """What the loop needs from a sandbox: one persistent kernel per trajectory id.

    `execute` returns an ExecResult for Python errors and timeouts; it may raise for a sandbox failure,
    which ends that one trajectory. Implementations must be thread-safe (the loop executes concurrently).
    """

    def open(self, traj_id: str, images: list[str], videos: list[str]) -> None: ...

    def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult: ...

    def close(self, traj_id: str) -> None: ...


class LocalSandboxClient:
    """A SandboxClient over an in-process `Sandbox` (`pyvision_rl.sandbox.base.make_sandbox`)."""

    def __init__(self, sandbox: Any):
        self.sandbox = sandbox
        self._kernels: dict[str, Any] = {}
        self._lock = threading.Lock()

    def open(self, traj_id: str, images: list[str], videos: list[str]) -> None:
        kernel = self.sandbox.open(images=list(images), videos=list(videos))
        with self._lock:
            old = self._kernels.pop(traj_id, None)
            self._kernels[traj_id] = kernel
        if old is not None:
            old.close()

    def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult:
        with self._lock:
            kernel = self._kernels.get(traj_id)
        if kernel is None:
            raise KeyError(f"no kernel open for trajectory {traj_id!r}")
        return kernel.execute(code, timeout_s=timeout_s)

    def close(self, traj_id: str) -> None:
        with self._lock:
            kernel = self._kernels.pop(traj_id, None)
        if kernel is not None:
            kernel.close()


# ---------------------------------------------------------------- loop


@dataclass
class LoopSettings:
    """The rollout settings the loop reads (a subset of `config.RolloutConfig`, plus sandbox timeout)."""

    max_turns: int = 5
    max_new_tokens: int = 512
    max_total_len: int = 8192
    max_images: int = 16
    feed_errors: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_template: str = ""
    exec_timeout_s: float | None = None  # None: the sandbox's own timeout_s
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_exec_threads: int = 32
    max_live: int = 0  # trajectories run at once (0: all); the RolloutWorker sets its share of kernel slots

    @classmethod
    def from_config(cls, rollout_cfg: Any, **overrides: Any) -> LoopSettings:
        """From a `RolloutConfig` (pydantic), a dict or a LoopSettings; unknown keys are ignored."""
        if isinstance(rollout_cfg, LoopSettings):
            base = dict(rollout_cfg.__dict__)
        elif hasattr(rollout_cfg, "model_dump"):
            base = rollout_cfg.model_dump()
        else:
            base = dict(rollout_cfg or {})
        names = set(cls.__dataclass_fields__)
        base = {k: v for k, v in base.items() if k in names}
        base.update(overrides)
        return cls(**base)


@dataclass
class _Live:
    traj: Trajectory
    task: Task
    ids: list[int]
    n_inputs: int
    kind: str  # "image" | "video" | "text"
    kernel_open: bool = False
    code: str | None = None
    result: ExecResult | None = None
    crash: str | None = None
    t0: float = field(default_factory=time.perf_counter)


def _rid(task: Task, group_id: str, i: int) -> str:
    return f"{task.id}#{group_id}#{i}"


class AgentLoop:
    """Runs trajectories turn by turn with one batched `engine.generate` over all live ones per turn.

    engine: a GenerationEngine; sandbox_client: a SandboxClient (LocalSandboxClient, or the pool client in
    `actors/rollout.py`); processor: the policy's processor (tokenizer + image processor);
    rollout_cfg: a RolloutConfig, dict or LoopSettings (overrides as keywords).
    After `run`, `last_stats` holds the run's wall times: generate_s, sandbox_s, framework_s, turns.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        sandbox_client: SandboxClient,
        processor: Any,
        rollout_cfg: Any = None,
        **overrides: Any,
    ):
        from pyvision_rl.models.processing import merge_size_of

        self.engine = engine
        self.sandbox = sandbox_client
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.settings = LoopSettings.from_config(rollout_cfg, **overrides)
        if self.settings.system_prompt == "":  # config spelling of "no system block"
            self.settings.system_prompt = None
        self.chat = ChatTokens(self.tokenizer)
        self.merge = merge_size_of(processor)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, self.settings.max_exec_threads), thread_name_prefix="agent-exec"
        )
        self.last_stats: dict[str, float] = {}
        self._grid_cache: dict[tuple[int, int], tuple[int, int, int]] = {}
        keys = load_templates()
        tpl = self.settings.prompt_template
        self.image_key = tpl or IMAGE_TEMPLATE_KEY
        self.video_key = (f"{tpl}_video" if f"{tpl}_video" in keys else tpl) if tpl else VIDEO_TEMPLATE_KEY

    def close(self) -> None:
        """Stop the execution threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ prompts
    def _image_tokens(self, images: Sequence[bytes]) -> list[tuple[int, int, int]]:
        """The processor's (t, h, w) grid of each image. A grid depends only on the image's pixel size
        (the processor's settings are fixed), so grids are cached by size and only new sizes are encoded."""
        import io

        from PIL import Image

        from pyvision_rl.models.processing import encode_images

        sizes = []
        for b in images:
            with Image.open(io.BytesIO(b)) as im:  # reads the header only
                sizes.append(im.size)
        missing = {sz: b for sz, b in zip(sizes, images, strict=True) if sz not in self._grid_cache}
        if missing:
            _, grids = encode_images(self.processor, list(missing.values()))
            self._grid_cache.update({sz: tuple(g) for sz, g in zip(missing, grids, strict=True)})
        return [self._grid_cache[sz] for sz in sizes]

    def _n_tokens(self, grid: Sequence[int]) -> int:
        from pyvision_rl.models.processing import image_token_count

        return image_token_count(grid, self.merge)

    def build_prompt(self, task: Task) -> tuple[list[int], list[ImageRef], str]:
        """Prompt ids, the input images (with grids) and the task kind ("image", "video" or "text")."""
        from PIL import Image

        if task.videos:
            from pyvision_rl.data.video import probe_video

            info = probe_video(task.videos[0])
            text = build_video_prompt(
                task.question, info.width, info.height, info.n_frames, info.fps, self.video_key
            )
            return self.chat.prompt_ids(text, [], self.settings.system_prompt), [], "video"
        if task.images:
            raw = [Path(p).read_bytes() for p in task.images]
            with Image.open(task.images[0]) as im:
                w, h = im.size
            grids = self._image_tokens(raw)
            refs = [
                ImageRef(png=b, grid_thw=tuple(g), source="input") for b, g in zip(raw, grids, strict=True)
            ]
            text = build_image_prompt(task.question, w, h, self.image_key, n_images=len(raw))
            ids = self.chat.prompt_ids(text, [self._n_tokens(g) for g in grids], self.settings.system_prompt)
            return ids, refs, "image"
        # A text-only task: same template, no image block.
        text = build_image_prompt(task.question, 0, 0, self.image_key).removeprefix("<image>\n")
        return self.chat.prompt_ids(text, [], self.settings.system_prompt), [], "text"

    # ------------------------------------------------------------ run
    def run(
        self, tasks_with_group_ids: Sequence[tuple[Task, str]], version: int = 0, seed: int | None = None
    ) -> list[Trajectory]:
        """Roll out one trajectory per (task, group_id), in order. Never raises for one bad trajectory
        (a missing file or a sandbox failure ends that trajectory); engine errors propagate.

        At most `max_live` trajectories run at once (waves): every live trajectory may hold a kernel until
        it ends, and turns are synchronous, so more live trajectories than kernel slots would wait on
        each other forever."""
        items = list(tasks_with_group_ids)
        cap = self.settings.max_live
        if not cap or len(items) <= cap:
            return self._run_wave(items, version, seed, {})
        counters: dict[str, int] = {}
        out: list[Trajectory] = []
        total: dict[str, float] = {}
        for w, i in enumerate(range(0, len(items), cap)):
            wave_seed = None if seed is None else seed + 7919 * w
            out.extend(self._run_wave(items[i : i + cap], version, wave_seed, counters))
            for k, v in self.last_stats.items():
                total[k] = total.get(k, 0.0) + v
        self.last_stats = total
        return out

    def _run_wave(
        self,
        tasks_with_group_ids: Sequence[tuple[Task, str]],
        version: int,
        seed: int | None,
        counters: dict[str, int],
    ) -> list[Trajectory]:
        t_start = time.perf_counter()
        stats = {"generate_s": 0.0, "sandbox_s": 0.0, "prompt_s": 0.0, "turns": 0.0, "generate_calls": 0.0}
        prompts: dict[str, Any] = {}
        all_live: list[_Live] = []
        done: list[_Live] = []
        for task, gid in tasks_with_group_ids:
            i = counters.get(gid, 0)
            counters[gid] = i + 1
            traj = Trajectory(
                task_id=task.id,
                group_id=gid,
                prompt_ids=[],
                version=version,
                ground_truth=str(task.answer),
                data_source=task.data_source,
            )
            traj.extra["request_id"] = _rid(task, gid, i)
            live = _Live(traj=traj, task=task, ids=[], n_inputs=0, kind="text")
            all_live.append(live)
            tp = time.perf_counter()
            try:
                key = task.id + "\0" + "\0".join(task.images + task.videos)
                if key not in prompts:
                    prompts[key] = self.build_prompt(task)
                ids, refs, kind = prompts[key]
            except Exception as e:  # noqa: BLE001 - a bad row costs its trajectory only
                log.warning("task %s: cannot build the prompt (%s: %s)", task.id, type(e).__name__, e)
                traj.extra["error"] = f"prompt: {type(e).__name__}: {e}"
                traj.end_reason = EndReason.ERROR_IN_ACTION
                traj.vision_ok = False
                done.append(live)
                continue
            stats["prompt_s"] += time.perf_counter() - tp
            traj.prompt_ids = list(ids)
            traj.images = list(refs)
            live.ids, live.n_inputs, live.kind = list(ids), len(refs), kind
        active = [lv for lv in all_live if lv not in done]
        try:
            while active:
                active = self._turn(active, done, stats, seed)
        finally:
            self._close_all(all_live)
        for lv in all_live:
            self._finish(lv)
        total = time.perf_counter() - t_start
        stats["total_s"] = total
        stats["framework_s"] = max(0.0, total - stats["generate_s"] - stats["sandbox_s"])
        stats["trajectories"] = float(len(all_live))
        self.last_stats = stats
        return [lv.traj for lv in all_live]

    def _end(self, lv: _Live, reason: EndReason, done: list[_Live]) -> None:
        lv.traj.end_reason = reason
        done.append(lv)

    def _append(self, lv: _Live, ids: list[int], logprobs: list[float] | None, model: bool) -> None:
        t = lv.traj
        t.response_ids.extend(ids)
        t.loss_mask.extend([1 if model else 0] * len(ids))
        t.rollout_logprobs.extend(logprobs if (model and logprobs is not None) else [0.0] * len(ids))
        lv.ids.extend(ids)

    def _turn(self, active: list[_Live], done: list[_Live], stats: dict, seed: int | None) -> list[_Live]:
        s = self.settings
        reqs, batch = [], []
        for lv in active:
            budget = s.max_total_len - len(lv.ids)
            if budget <= 0:
                self._end(lv, EndReason.OVER_LENGTH, done)
                continue
            reqs.append(
                GenerationRequest(
                    prompt_ids=list(lv.ids),
                    images=[r.png for r in lv.traj.images],
                    request_id=lv.traj.extra["request_id"],
                    max_new_tokens=min(budget, s.max_new_tokens),
                )
            )
            batch.append(lv)
        if not batch:
            return []
        sampling = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_new_tokens=s.max_new_tokens,
            stop=["</code>"],
            logprobs=True,
            seed=None if seed is None else seed + int(stats["turns"]),
        )
        tg = time.perf_counter()
        outs = self.engine.generate(reqs, sampling)
        dt = time.perf_counter() - tg
        stats["generate_s"] += dt
        stats["generate_calls"] += 1
        stats["turns"] += 1
        if len(outs) != len(reqs):
            raise RuntimeError(f"engine returned {len(outs)} outputs for {len(reqs)} requests")

        to_exec: list[_Live] = []
        for lv, req, out in zip(batch, reqs, outs, strict=True):
            t = lv.traj
            t.timings["generate_s"] = t.timings.get("generate_s", 0.0) + dt
            ids, lps, removed = self.chat.strip_vision_tokens(out.token_ids, out.logprobs or None)
            if removed:
                t.extra["removed_vision_tokens"] = t.extra.get("removed_vision_tokens", 0) + removed
            self._append(lv, ids, lps if lps is not None else [0.0] * len(ids), model=True)
            t.n_turns += 1
            if out.finish_reason == "length":
                capped = (req.max_new_tokens or s.max_new_tokens) < s.max_new_tokens
                self._end(
                    lv,
                    EndReason.OVER_LENGTH
                    if capped or len(lv.ids) >= s.max_total_len
                    else EndReason.ERROR_IN_ACTION,
                    done,
                )
                continue
            action: Action = parse_action(self.chat.decode(ids))
            if action.kind == "answer":
                t.final_answer = action.answer
                self._end(lv, EndReason.DONE, done)
                continue
            if len(lv.ids) >= s.max_total_len:
                self._end(lv, EndReason.OVER_LENGTH, done)
                continue
            if action.kind == "none":
                if not s.feed_errors:
                    self._end(lv, EndReason.ERROR_IN_ACTION, done)
                elif t.n_turns >= s.max_turns:
                    self._end(lv, EndReason.EXCEED_MAX_TURNS, done)
                else:
                    t.extra["format_errors"] = t.extra.get("format_errors", 0) + 1
                    self._observe_error(lv, FORMAT_ERROR_MESSAGE, done)
                continue
            if t.n_turns >= s.max_turns:
                self._end(lv, EndReason.EXCEED_MAX_TURNS, done)
                continue
            lv.code, lv.result, lv.crash = action.code, None, None
            to_exec.append(lv)

        if to_exec:
            ts = time.perf_counter()
            list(self._pool.map(self._exec_one, to_exec))
            stats["sandbox_s"] += time.perf_counter() - ts
            for lv in to_exec:
                self._observe(lv, done)
        done_ids = {id(lv) for lv in done}
        return [lv for lv in batch if id(lv) not in done_ids]

    def _exec_one(self, lv: _Live) -> None:
        """Run the live trajectory's code (opening its kernel on first use); never raises."""
        rid = lv.traj.extra["request_id"]
        t0 = time.perf_counter()
        try:
            if not lv.kernel_open:
                lv.kernel_open = True
                self.sandbox.open(rid, list(lv.task.images), list(lv.task.videos))
            lv.result = self.sandbox.execute(rid, lv.code or "", self.settings.exec_timeout_s)
        except Exception as e:  # noqa: BLE001 - a sandbox failure costs this trajectory only
            lv.crash = f"{type(e).__name__}: {e}"
        lv.traj.timings["sandbox_s"] = lv.traj.timings.get("sandbox_s", 0.0) + time.perf_counter() - t0

    def _observe_error(self, lv: _Live, message: str, done: list[_Live]) -> None:
        obs = self.chat.error_ids(message)
        if len(lv.ids) + len(obs) > self.settings.max_total_len:
            self._end(lv, EndReason.OVER_LENGTH, done)
            return
        self._append(lv, obs, None, model=False)

    def _observe(self, lv: _Live, done: list[_Live]) -> None:
        s, t, res = self.settings, lv.traj, lv.result
        t.n_tool_attempts += 1
        if lv.crash is not None or res is None:
            log.warning("trajectory %s: sandbox failure: %s", t.extra["request_id"], lv.crash)
            t.extra["sandbox_error"] = lv.crash
            self._end(lv, EndReason.ERROR_IN_ACTION, done)
            return
        if not res.ok:
            t.extra["exec_errors"] = t.extra.get("exec_errors", 0) + 1
            if not s.feed_errors:
                self._end(lv, EndReason.ERROR_IN_ACTION, done)
                return
            msg = res.error or (TIMEOUT_ERROR_MESSAGE if res.timed_out else "Unknown error")
            self._observe_error(lv, msg, done)
            return
        t.n_tool_calls += 1
        if not res.images:
            obs = self.chat.observation_ids(res.stdout)
            if len(lv.ids) + len(obs) > s.max_total_len:
                self._end(lv, EndReason.OVER_LENGTH, done)
                return
            self._append(lv, obs, None, model=False)
            return
        if len(t.images) + len(res.images) > s.max_images:
            self._end(lv, EndReason.EXCEED_MAX_IMAGES, done)
            return
        try:
            grids = self._image_tokens(res.images)
        except Exception as e:  # noqa: BLE001 - an undecodable figure ends this trajectory only
            t.extra["sandbox_error"] = f"figure could not be decoded: {e}"
            self._end(lv, EndReason.ERROR_IN_ACTION, done)
            return
        first = len(t.images)  # image_clue_k counts on after the inputs (video: from 0)
        obs = self.chat.observation_ids(res.stdout, [self._n_tokens(g) for g in grids], first_index=first)
        # Checked before appending: the image tokens never enter the context without their images.
        if len(lv.ids) + len(obs) > s.max_total_len:
            self._end(lv, EndReason.OVER_LENGTH, done)
            return
        self._append(lv, obs, None, model=False)
        t.images.extend(
            ImageRef(png=b, grid_thw=tuple(g), source="tool") for b, g in zip(res.images, grids, strict=True)
        )
        t.n_tool_images += len(res.images)

    def _close_all(self, lives: list[_Live]) -> None:
        opened = [lv for lv in lives if lv.kernel_open]

        def close(lv: _Live) -> None:
            try:
                self.sandbox.close(lv.traj.extra["request_id"])
            except Exception as e:  # noqa: BLE001 - closing must not lose the batch
                log.warning("closing kernel %s failed: %s", lv.traj.extra["request_id"], e)

        if opened:
            list(self._pool.map(close, opened))

    def _finish(self, lv: _Live) -> None:
        from pyvision_rl.models.processing import check_vision_tokens

        t = lv.traj
        full = t.prompt_ids + t.response_ids
        if t.prompt_ids:
            t.vision_ok = check_vision_tokens(
                full, [r.grid_thw for r in t.images], self.merge, self.tokenizer
            )
        t.visual_tokens = self.chat.count_image_tokens(full)
        t.response_text = self.chat.decode(t.response_ids)
        t.timings["total_s"] = time.perf_counter() - lv.t0
        t.extra.setdefault("kind", lv.kind)
