"""The multi-turn agent loop: one coroutine per trajectory, each awaiting its own model turn and its own cell.

Each trajectory submits its next turn the moment its own sandbox call returns: the engine batches whatever
requests are pending (no waves, no barrier between trajectories), and code runs while other trajectories
generate. A trajectory that needs a kernel while every slot is taken waits for one without blocking the
others (the holders never wait on it, so this cannot deadlock).

Token-in-token-out: prompt ids are rendered once, the model's sampled ids are appended as they came
(minus any vision special token it generated, which has no image features), observations are appended as
ids rendered from the protocol strings (loss mask 0, logprob 0). Images are encoded with the policy's
processor; an observation with images is appended only when it fits in `max_total_len` and
`max_images`, so a vision block in the context always has its image. Every trajectory is checked at the
end: its vision-token groups must equal its images' grids (`vision_ok`). Sampling is seeded per (chunk
seed, trajectory, turn), so a trajectory's tokens do not depend on what else is in flight.

End reasons (`after_model_turn` and `after_execution`, pure functions, decide them):
  OVER_LENGTH        the context reached `max_total_len`, or the turn was cut by the length budget, or an
                     observation (text or images) would not fit;
  ERROR_IN_ACTION    the turn hit `max_new_tokens` (the release treats this as a malformed action); no code
                     and no answer, or a Python error/timeout, when `feed_errors` is off (with it on, the
                     error text is fed back, as in evaluation);
  SANDBOX_ERROR      the sandbox itself failed (not the model's code): never trained on, counted;
  DONE               a closed `<answer>` block (it wins over code in the same turn, as in the release);
  EXCEED_MAX_TURNS   a code (or malformed, with feed_errors) turn was the `max_turns`-th: not executed;
  EXCEED_MAX_IMAGES  the figures of an execution would take the trajectory past `max_images`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from pyvision_rl.agent.protocol import (
    FORMAT_ERROR_MESSAGE,
    IMAGE_TEMPLATE_KEY,
    TIMEOUT_ERROR_MESSAGE,
    VIDEO_TEMPLATE_KEY,
    ChatTokens,
    build_image_prompt,
    build_video_prompt,
    load_templates,
    parse_action,
)
from pyvision_rl.config import RolloutConfig
from pyvision_rl.engines.base import GenerationEngine, GenerationRequest, SamplingParams
from pyvision_rl.types import EndReason, ExecResult, ImageRef, Task, Trajectory

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sandbox clients


class SandboxClient(Protocol):
    """What the loop needs from a sandbox: one persistent kernel per trajectory id, awaited.

    `open` may wait for a free kernel; `execute` returns an ExecResult for Python errors and timeouts
    (`sandbox_error` set when the sandbox itself failed); either may raise for a sandbox failure, which
    ends that one trajectory with SANDBOX_ERROR.
    """

    async def open(self, traj_id: str, images: list[str], videos: list[str]) -> None: ...

    async def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult: ...

    async def close(self, traj_id: str) -> None: ...


class LocalSandboxClient:
    """A SandboxClient over an in-process `Sandbox` (`pyvision_rl.sandbox.base.make_sandbox`).

    At most `max_kernels` (default: the sandbox's `cfg.max_kernels`) kernels are open at once: a
    trajectory waits for a slot on the event loop, and the blocking kernel calls run in that many threads.
    """

    def __init__(self, sandbox: Any, max_kernels: int | None = None):
        self.sandbox = sandbox
        self.max_kernels = max(1, max_kernels or getattr(getattr(sandbox, "cfg", None), "max_kernels", 32))
        self._kernels: dict[str, Any] = {}
        self._threads = ThreadPoolExecutor(self.max_kernels, thread_name_prefix="sandbox-client")
        self._slots: tuple[Any, asyncio.Semaphore] | None = None

    def _slot(self) -> asyncio.Semaphore:
        # asyncio primitives bind to one event loop; `AgentLoop.run` starts a new loop per call.
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.max_kernels))
        return self._slots[1]

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def open(self, traj_id: str, images: list[str], videos: list[str]) -> None:
        await self.close(traj_id)
        slot = self._slot()
        await slot.acquire()
        try:
            self._kernels[traj_id] = await self._call(self.sandbox.open, list(images), list(videos))
        except BaseException:
            slot.release()
            raise

    async def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult:
        kernel = self._kernels.get(traj_id)
        if kernel is None:
            raise KeyError(f"no kernel open for trajectory {traj_id!r}")
        return await self._call(kernel.execute, code, timeout_s)

    async def close(self, traj_id: str) -> None:
        kernel = self._kernels.pop(traj_id, None)
        if kernel is not None:
            try:
                await self._call(kernel.close)
            finally:
                self._slot().release()


# ---------------------------------------------------------------- settings and decisions


_R = RolloutConfig.model_fields  # the loop's defaults are the config's: one place declares them


@dataclass
class LoopSettings:
    """The rollout settings the loop reads (a subset of `config.RolloutConfig`, plus sandbox timeout)."""

    max_turns: int = _R["max_turns"].default
    max_new_tokens: int = _R["max_new_tokens"].default
    max_total_len: int = _R["max_total_len"].default
    max_images: int = _R["max_images"].default
    feed_errors: bool = _R["feed_errors"].default
    temperature: float = _R["temperature"].default
    top_p: float = _R["top_p"].default
    top_k: int = _R["top_k"].default
    prompt_template: str = _R["prompt_template"].default
    system_prompt: str | None = _R["system_prompt"].default
    exec_timeout_s: float | None = None  # None: the sandbox's own timeout_s
    max_live: int = 0  # trajectories in flight at once (0: all); bounds memory, never needed for progress

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


Next = Literal["execute", "format_error", "feed_error", "observe"]


def after_model_turn(
    s: LoopSettings, finish_reason: str, action: str, n_turns: int, context_len: int, capped: bool
) -> EndReason | Next:
    """What follows a model turn: an end reason, "execute" its code, or "format_error" (fed back).

    `action` is the parsed kind ("code" | "answer" | "none"), `n_turns` counts this turn, `context_len`
    includes it, `capped`: the turn's token cap was cut below `max_new_tokens` by the length budget."""
    if finish_reason == "length":
        return (
            EndReason.OVER_LENGTH if capped or context_len >= s.max_total_len else EndReason.ERROR_IN_ACTION
        )
    if action == "answer":
        return EndReason.DONE
    if context_len >= s.max_total_len:
        return EndReason.OVER_LENGTH
    if action == "none" and not s.feed_errors:
        return EndReason.ERROR_IN_ACTION
    if n_turns >= s.max_turns:
        return EndReason.EXCEED_MAX_TURNS
    return "format_error" if action == "none" else "execute"


def after_execution(
    s: LoopSettings, result: ExecResult | None, n_images: int, crashed: bool = False
) -> EndReason | Next:
    """What follows an execution: an end reason, "feed_error" (its error fed back) or "observe".

    `result` is None (or `crashed`) when the sandbox call raised; `n_images`: the trajectory's images
    before this result's figures."""
    if crashed or result is None or result.sandbox_error:
        return EndReason.SANDBOX_ERROR
    if not result.ok:
        return "feed_error" if s.feed_errors else EndReason.ERROR_IN_ACTION
    if result.images and n_images + len(result.images) > s.max_images:
        return EndReason.EXCEED_MAX_IMAGES
    return "observe"


def turn_seed(seed: int | None, request_id: str, turn: int) -> int | None:
    """The sampling seed of one turn of one trajectory (None: unseeded)."""
    if seed is None:
        return None
    return zlib.crc32(f"{seed}:{request_id}:{turn}".encode())


# ---------------------------------------------------------------- loop


@dataclass
class _Live:
    traj: Trajectory
    task: Task
    ids: list[int]
    kind: str  # "image" | "video" | "text"
    kernel_open: bool = False
    t0: float = field(default_factory=time.perf_counter)
    # The sandbox names this attempt's kernel, not the request id: a re-submitted chunk repeats request ids,
    # and a cancelled twin's late close must not close the live trajectory's kernel.
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def box(self) -> str:
        """The sandbox's name for this trajectory's kernel (the request id stays its suffix)."""
        return f"{self.nonce}/{self.traj.extra['request_id']}"


def _image_size(png: bytes) -> tuple[int, int]:
    """(w, h) from the image header (the pixels are not decoded)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.size


def _rid(task: Task, group_id: str, i: int) -> str:
    return f"{task.id}#{group_id}#{i}"


class AgentLoop:
    """Rolls out trajectories, one coroutine each, against a batching GenerationEngine and a SandboxClient.

    engine: a GenerationEngine; sandbox_client: a SandboxClient (LocalSandboxClient, or the pool client in
    `actors/rollout.py`); processor: the policy's processor (tokenizer + image processor);
    rollout_cfg: a RolloutConfig, dict or LoopSettings (overrides as keywords).
    After a run, `last_stats` holds: total_s (wall), turns, trajectories, and generate_s / sandbox_s (time
    trajectories spent awaiting the engine / the sandbox, summed over trajectories).
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
        s = self.settings
        self.sampling = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_new_tokens=s.max_new_tokens,
            stop=["</code>"],
            logprobs=True,
        )
        self.chat = ChatTokens(self.tokenizer)
        self.merge = merge_size_of(processor)
        self.last_stats: dict[str, float] = {}
        self._grid_cache: dict[tuple[int, int], tuple[int, int, int]] = {}
        keys = load_templates()
        tpl = self.settings.prompt_template
        self.image_key = tpl or IMAGE_TEMPLATE_KEY
        self.video_key = (f"{tpl}_video" if f"{tpl}_video" in keys else tpl) if tpl else VIDEO_TEMPLATE_KEY

    def close(self) -> None:
        """Nothing to release (kept for callers that close loops)."""

    # ------------------------------------------------------------ prompts
    def _image_tokens(
        self, images: Sequence[bytes], sizes: Sequence[Sequence[int]] | None = None
    ) -> list[tuple[int, int, int]]:
        """The processor's (t, h, w) grid of each image. A grid depends only on the image's pixel size
        (the processor's settings are fixed), so grids are cached by size and only new sizes are encoded.
        `sizes`: each image's (w, h) when already known (the data loader records them)."""
        from pyvision_rl.models.processing import encode_images

        sizes = [tuple(sz) for sz in sizes] if sizes else [_image_size(b) for b in images]
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
        if task.videos:  # the loader's probe when it ran (Task.extra["video_info"]), else probe now
            info = (task.extra.get("video_info") or [None])[0]
            if info is None:
                from pyvision_rl.data.video import probe_video

                info = vars(probe_video(task.videos[0]))
            text = build_video_prompt(
                task.question, info["width"], info["height"], info["n_frames"], info["fps"], self.video_key
            )
            return self.chat.prompt_ids(text, [], self.settings.system_prompt), [], "video"
        if task.images:
            raw = [Path(p).read_bytes() for p in task.images]
            sizes = task.extra.get("image_sizes") or [_image_size(b) for b in raw]  # the loader read them
            grids = self._image_tokens(raw, sizes)
            w, h = sizes[0]
            refs = [
                ImageRef(png=b, grid_thw=tuple(g), source="input") for b, g in zip(raw, grids, strict=True)
            ]
            text = build_image_prompt(task.question, w, h, self.image_key, n_images=len(raw))
            ids = self.chat.prompt_ids(text, [self._n_tokens(g) for g in grids], self.settings.system_prompt)
            return ids, refs, "image"
        # A text-only task: same template, no image block.
        text = build_image_prompt(task.question, 0, 0, self.image_key).removeprefix("<image>\n")
        return self.chat.prompt_ids(text, [], self.settings.system_prompt), [], "text"

    # ------------------------------------------------------------ runs
    def run(
        self, tasks_with_group_ids: Sequence[tuple[Task, str]], version: int = 0, seed: int | None = None
    ) -> list[Trajectory]:
        """`run_async` from synchronous code (starts an event loop; not from inside a running one)."""
        return asyncio.run(self.run_async(tasks_with_group_ids, version, seed))

    async def run_async(
        self, tasks_with_group_ids: Sequence[tuple[Task, str]], version: int = 0, seed: int | None = None
    ) -> list[Trajectory]:
        """Roll out one trajectory per (task, group_id), all concurrently; returns them in input order.
        Never raises for one bad trajectory (a missing file or a sandbox failure ends that trajectory);
        engine errors propagate."""
        out: list[Trajectory | None] = [None] * len(tasks_with_group_ids)
        async for idx, group in self._stream(tasks_with_group_ids, version, seed):
            for i, t in zip(idx, group, strict=True):
                out[i] = t
        return out  # type: ignore[return-value]

    async def stream_groups(
        self, tasks_with_group_ids: Sequence[tuple[Task, str]], version: int = 0, seed: int | None = None
    ) -> AsyncIterator[list[Trajectory]]:
        """Like `run_async`, but yields each group (its trajectories in input order) as soon as its last
        trajectory ends. Stopping early cancels the rest (their kernels are closed)."""
        async for _, group in self._stream(tasks_with_group_ids, version, seed):
            yield group

    async def _stream(
        self, items: Sequence[tuple[Task, str]], version: int, seed: int | None
    ) -> AsyncIterator[tuple[list[int], list[Trajectory]]]:
        t_start = time.perf_counter()
        stats = {"generate_s": 0.0, "sandbox_s": 0.0, "turns": 0.0}
        lives = self._start(items, version)
        members: dict[str, list[int]] = {}
        for i, (_, gid) in enumerate(items):
            members.setdefault(gid, []).append(i)
        left = {gid: len(ix) for gid, ix in members.items()}
        gate = asyncio.Semaphore(self.settings.max_live) if self.settings.max_live > 0 else None
        tasks = {
            asyncio.ensure_future(self._trajectory(lv, seed, stats, gate)): i for i, lv in enumerate(lives)
        }
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=tasks.__getitem__):
                    fut.result()  # engine errors propagate
                    gid = items[tasks[fut]][1]
                    left[gid] -= 1
                    if not left[gid]:
                        yield members[gid], [lives[i].traj for i in members[gid]]
        finally:
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            stats["total_s"] = time.perf_counter() - t_start
            stats["trajectories"] = float(len(items))
            self.last_stats = stats

    def _start(self, items: Sequence[tuple[Task, str]], version: int) -> list[_Live]:
        prompts: dict[str, Any] = {}
        counters: dict[str, int] = {}
        lives = []
        for task, gid in items:
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
            # The verifiers read the row's extra (options, tolerances) and the question (LLM judge).
            traj.extra.update(task.extra)
            traj.extra.setdefault("question", task.question)
            traj.extra["request_id"] = _rid(task, gid, i)
            live = _Live(traj=traj, task=task, ids=[], kind="text")
            lives.append(live)
            try:
                key = task.id + "\0" + "\0".join(task.images + task.videos)
                if key not in prompts:
                    prompts[key] = self.build_prompt(task)
                ids, refs, kind = prompts[key]
            except Exception as e:  # noqa: BLE001 - a bad row costs its trajectory only
                log.warning("task %s: cannot build the prompt (%s: %s)", task.id, type(e).__name__, e)
                traj.extra["error"] = f"prompt: {type(e).__name__}: {e}"
                traj.vision_ok = False
                live.kind = "error"
                continue
            traj.prompt_ids = list(ids)
            traj.images = list(refs)
            live.ids, live.kind = list(ids), kind
        return lives

    # ------------------------------------------------------------ one trajectory
    async def _trajectory(self, lv: _Live, seed: int | None, stats: dict, gate: asyncio.Semaphore | None):
        if lv.kind == "error":  # the prompt could not be built
            lv.traj.end_reason = EndReason.ERROR_IN_ACTION
            self._finish(lv)
            return
        if gate is not None:
            async with gate:
                await self._turns(lv, seed, stats)
        else:
            await self._turns(lv, seed, stats)

    async def _turns(self, lv: _Live, seed: int | None, stats: dict) -> None:
        t = lv.traj
        rid = t.extra["request_id"]
        try:
            while True:
                reason = await self._one_turn(lv, rid, seed, stats)
                if reason is not None:
                    t.end_reason = reason
                    return
        finally:
            if lv.kernel_open:
                try:
                    await asyncio.shield(self.sandbox.close(lv.box))
                except Exception as e:  # noqa: BLE001 - closing must not lose the trajectory
                    log.warning("closing kernel %s failed: %s", lv.box, e)
            self._finish(lv)

    async def _one_turn(self, lv: _Live, rid: str, seed: int | None, stats: dict) -> EndReason | None:
        """One model turn and what follows it; returns the end reason, or None to go on."""
        s, t = self.settings, lv.traj
        budget = s.max_total_len - len(lv.ids)
        if budget <= 0:
            return EndReason.OVER_LENGTH
        req = GenerationRequest(
            prompt_ids=list(lv.ids),
            images=[r.png for r in t.images],
            request_id=rid,
            max_new_tokens=min(budget, s.max_new_tokens),
        )
        tg = time.perf_counter()
        out = await self.engine.generate(req, replace(self.sampling, seed=turn_seed(seed, rid, t.n_turns)))
        dt = time.perf_counter() - tg
        stats["generate_s"] += dt
        stats["turns"] += 1
        t.timings["generate_s"] = t.timings.get("generate_s", 0.0) + dt
        ids, lps, removed = self.chat.strip_vision_tokens(out.token_ids, out.logprobs or None)
        if removed:
            t.extra["removed_vision_tokens"] = t.extra.get("removed_vision_tokens", 0) + removed
        self._append(lv, ids, lps if lps is not None else [0.0] * len(ids), model=True)
        t.n_turns += 1
        action = parse_action(self.chat.decode(ids)) if out.finish_reason != "length" else None
        nxt = after_model_turn(
            s,
            out.finish_reason,
            action.kind if action else "none",
            t.n_turns,
            len(lv.ids),
            capped=(req.max_new_tokens or s.max_new_tokens) < s.max_new_tokens,
        )
        if nxt == EndReason.DONE:
            t.final_answer = action.answer  # type: ignore[union-attr]
        if isinstance(nxt, EndReason):
            return nxt
        if nxt == "format_error":
            t.extra["format_errors"] = t.extra.get("format_errors", 0) + 1
            return self._observe_error(lv, FORMAT_ERROR_MESSAGE)
        return await self._execute(lv, rid, action.code or "", stats)  # type: ignore[union-attr]

    async def _execute(self, lv: _Live, rid: str, code: str, stats: dict) -> EndReason | None:
        s, t = self.settings, lv.traj
        t.n_tool_attempts += 1
        t0 = time.perf_counter()
        res, crash = None, None
        try:
            if not lv.kernel_open:
                lv.kernel_open = True  # closed at the end even if opening failed half-way
                await self.sandbox.open(lv.box, list(lv.task.images), list(lv.task.videos))
            res = await self.sandbox.execute(lv.box, code, s.exec_timeout_s)
        except Exception as e:  # noqa: BLE001 - a sandbox failure costs this trajectory only
            crash = f"{type(e).__name__}: {e}"
        dt = time.perf_counter() - t0
        stats["sandbox_s"] += dt
        t.timings["sandbox_s"] = t.timings.get("sandbox_s", 0.0) + dt
        nxt = after_execution(s, res, len(t.images), crashed=crash is not None)
        if nxt == EndReason.SANDBOX_ERROR:
            t.extra["sandbox_error"] = crash or (res.error if res is not None else None) or "sandbox failure"
            log.warning("trajectory %s: sandbox failure: %s", rid, t.extra["sandbox_error"])
            return nxt
        assert res is not None
        if res.ok:
            t.n_tool_calls += 1
        else:
            t.extra["exec_errors"] = t.extra.get("exec_errors", 0) + 1
        if isinstance(nxt, EndReason):
            return nxt
        if nxt == "feed_error":
            return self._observe_error(
                lv, res.error or (TIMEOUT_ERROR_MESSAGE if res.timed_out else "Unknown error")
            )
        return self._observe(lv, res)

    def _append(self, lv: _Live, ids: list[int], logprobs: list[float] | None, model: bool) -> None:
        t = lv.traj
        t.response_ids.extend(ids)
        t.loss_mask.extend([1 if model else 0] * len(ids))
        t.rollout_logprobs.extend(logprobs if (model and logprobs is not None) else [0.0] * len(ids))
        lv.ids.extend(ids)

    def _observe_error(self, lv: _Live, message: str) -> EndReason | None:
        obs = self.chat.error_ids(message)
        if len(lv.ids) + len(obs) > self.settings.max_total_len:
            return EndReason.OVER_LENGTH
        self._append(lv, obs, None, model=False)
        return None

    @staticmethod
    def _tool(lv: _Live) -> str:
        """Which of the release's tools renders this trajectory's observations."""
        return "video" if lv.kind == "video" else "image"

    def _observe(self, lv: _Live, res: ExecResult) -> EndReason | None:
        s, t = self.settings, lv.traj
        if not res.images:
            obs = self.chat.observation_ids(res.stdout, kind=self._tool(lv))
            if len(lv.ids) + len(obs) > s.max_total_len:
                return EndReason.OVER_LENGTH
            self._append(lv, obs, None, model=False)
            return None
        try:
            grids = self._image_tokens(res.images)
        except Exception as e:  # noqa: BLE001 - an undecodable figure is the sandbox's failure
            t.extra["sandbox_error"] = f"figure could not be decoded: {e}"
            return EndReason.SANDBOX_ERROR
        first = len(t.images)  # image_clue_k counts on after the inputs (video: from 0)
        tokens = [self._n_tokens(g) for g in grids]
        obs = self.chat.observation_ids(res.stdout, tokens, first_index=first, kind=self._tool(lv))
        # Checked before appending: the image tokens never enter the context without their images.
        if len(lv.ids) + len(obs) > s.max_total_len:
            return EndReason.OVER_LENGTH
        self._append(lv, obs, None, model=False)
        t.images.extend(
            ImageRef(png=b, grid_thw=tuple(g), source="tool") for b, g in zip(res.images, grids, strict=True)
        )
        t.n_tool_images += len(res.images)
        return None

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
        t.extra["kind"] = lv.kind if lv.kind != "error" else "text"
