"""The "async" section of benchmarks/rollout.py: one coroutine per trajectory vs the turn-synchronous loop.

Both sides run the package's own `AgentLoop`; the baseline wraps its engine in `TurnBarrier`, which holds
every turn until all live trajectories have submitted theirs and returns them together - exactly the old
loop's schedule (one batched generate per turn, then every cell, then the next turn).

real       the tiny Qwen-VL really generates every turn (`ComputeEngine`: as many tokens as the scripted
           turn has, through the HF engine's batcher) and the real process sandbox runs every cell; cells
           sleep for a heavy-tailed (log-normal) time and turn lengths spread (log-normal). Same workload,
           same run, baseline then async, repeated. `speedup_real` is the trajectories/s ratio.
simulated  a modelled GPU behind a vLLM-style continuous batcher (`SimEngine`: a decode step reads the
           weights and every running sequence's KV cache, plus per-token compute; prefill is compute;
           prefix cache across turns; KV capacity and max_num_seqs bound the batch) with a simulated
           sandbox, on a virtual clock, at 64-512 concurrent trajectories with the release's turn and length
           settings (max_turns 5, 10,240 tokens per turn, 23,040 per trajectory, 30 s cell timeout).
           The step model's two efficiencies are fitted to a published vLLM measurement (`CALIBRATION`).
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pyvision_rl.agent.loop import AgentLoop, LocalSandboxClient
from pyvision_rl.config import RolloutConfig
from pyvision_rl.engines.base import GenerationEngine, GenerationOutput, GenerationRequest, SamplingParams
from pyvision_rl.types import ExecResult, Task

# ---------------------------------------------------------------- the turn-synchronous baseline


class TurnBarrier(GenerationEngine):
    """Engine wrapper that makes the AgentLoop turn-synchronous: requests are released to the inner engine
    only when every live trajectory has submitted its turn, and all answers come back together."""

    def __init__(self, inner: GenerationEngine):
        self.inner = inner
        self.live: set[str] = set()
        self.waiting: dict[str, tuple[GenerationRequest, SamplingParams, asyncio.Future]] = {}

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[request.request_id] = (request, sampling, fut)
        self._release()
        return await fut

    def leave(self, rid: str) -> None:
        self.live.discard(rid)
        self._release()

    def _release(self) -> None:
        if self.waiting and self.waiting.keys() >= self.live:
            batch, self.waiting = list(self.waiting.values()), {}
            asyncio.ensure_future(self._turn(batch))

    async def _turn(self, batch: list) -> None:
        outs = await asyncio.gather(*(self.inner.generate(r, s) for r, s, _ in batch))
        for (*_, fut), out in zip(batch, outs, strict=True):
            fut.set_result(out)

    def update_weights(self, weights, version: int) -> None:
        self.inner.update_weights(weights, version)


class TurnSyncLoop(AgentLoop):
    """The AgentLoop on a TurnBarrier: every trajectory of a run joins the barrier, and leaves it when it ends."""

    def _start(self, items, version):
        lives = super()._start(items, version)
        self.engine.live = {lv.traj.extra["request_id"] for lv in lives if lv.kind != "error"}
        return lives

    def _finish(self, lv) -> None:
        super()._finish(lv)
        self.engine.leave(lv.traj.extra["request_id"])


# ---------------------------------------------------------------- workloads


@dataclass
class Script:
    """One trajectory's turns: (assistant text, decode length in tokens) and the run time of each cell."""

    turns: list[tuple[str, int]]
    cells: list[float]


def draw_scripts(
    rng: random.Random,
    n: int,
    turn_tokens: tuple[float, float, int, int],
    cell_s: tuple[float, float, float],
    code_turns: list[float],
) -> list[Script]:
    """`turn_tokens`: (median, sigma, min, max) of a log-normal turn length; `cell_s`: (median, sigma, cap)
    of a log-normal cell time; `code_turns[k]`: the probability of k code turns before the answer."""
    med, sig, lo, hi = turn_tokens
    cmed, csig, cap = cell_s
    out = []
    for _ in range(n):
        k = rng.choices(range(len(code_turns)), weights=code_turns)[0]
        cells = [min(cap, cmed * math.exp(rng.gauss(0, csig))) for _ in range(k)]
        lens = [int(min(hi, max(lo, med * math.exp(rng.gauss(0, sig))))) for _ in range(k + 1)]
        turns = [(f"<code>\n```python\nimport time\ntime.sleep({c:.3f})\nprint({i})\n```\n</code>", L)
                 for i, (c, L) in enumerate(zip(cells, lens, strict=False))]  # fmt: skip
        turns.append(("<answer>\n\\boxed{1}\n</answer>", lens[-1]))
        out.append(Script(turns, cells))
    return out


def padded(tok: Any, text: str, n_tokens: int, cache: dict) -> list[int]:
    """Ids of `text` preceded by filler reasoning so that the turn has about `n_tokens` tokens."""
    if "filler" not in cache:
        cache["filler"] = list(
            tok("Let me think about the image step by step. ", add_special_tokens=False)["input_ids"]
        )
    body = list(tok(text, add_special_tokens=False)["input_ids"])
    f = cache["filler"]
    k = max(0, n_tokens - len(body))
    return (f * (k // len(f) + 1))[:k] + body


class _ScriptBook:
    """request id -> Script; turn i of a request id is its i-th call."""

    def __init__(self, items: list[tuple[Task, str]], scripts: list[Script]):
        self.by_rid: dict[str, Script] = {}
        counters: dict[str, int] = {}
        for (task, gid), sc in zip(items, scripts, strict=True):
            i = counters.get(gid, 0)
            counters[gid] = i + 1
            self.by_rid[f"{task.id}#{gid}#{i}"] = sc
        self.turn: dict[str, int] = {}

    def next(self, rid: str) -> tuple[str, int]:
        t = self.turn.get(rid, 0)
        self.turn[rid] = t + 1
        turns = self.by_rid[rid].turns
        return turns[min(t, len(turns) - 1)]


# ---------------------------------------------------------------- real: tiny model + real sandbox


class ComputeEngine(GenerationEngine):
    """The scripted turn as the answer, after the tiny model really generated that many tokens for the
    request's real context (through the HF engine's batcher: real batched compute, real prefill)."""

    def __init__(self, hf: Any, book: _ScriptBook):
        self.hf, self.book, self.cache = hf, book, {}
        self.im_end = hf.tokenizer.convert_tokens_to_ids("<|im_end|>")

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        text, n = self.book.next(request.request_id)
        ids = padded(self.hf.tokenizer, text, n, self.cache)
        finish = "stop" if text.endswith("</code>") else "eos"
        if finish == "eos":
            ids.append(self.im_end)
        cap = min(request.max_new_tokens or sampling.max_new_tokens, sampling.max_new_tokens)
        if len(ids) > cap:
            ids, finish = ids[:cap], "length"
        req = GenerationRequest(request.prompt_ids, request.images, request.request_id, len(ids))
        await self.hf.generate(req, SamplingParams(max_new_tokens=len(ids), stop=[], seed=0))
        return GenerationOutput(ids, [0.0] * len(ids), finish, "")  # type: ignore[arg-type]

    def update_weights(self, weights, version: int) -> None:
        raise NotImplementedError


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def bench_real(model_dir: str, processor: Any, sandbox: Any, tasks: list[Task], n: int, reps: int) -> dict:
    """Baseline vs async, same workload (heavy-tailed cells, spread turn lengths), alternating, `reps` each."""
    import torch

    from pyvision_rl.engines.hf import HFEngine

    # One torch thread, as in a RolloutWorker with num_cpus=1 (Ray sets OMP_NUM_THREADS): on this shared
    # 2-core box more threads make the tiny model's matmuls ~8x slower, not faster.
    torch.set_num_threads(1)
    hf = HFEngine(model_dir, max_batch=256)
    items = [(t, f"g{j}") for j, t in enumerate(tasks) for _ in range(n)]
    scripts = draw_scripts(
        random.Random(0),
        len(items),
        turn_tokens=(40, 0.8, 8, 192),
        cell_s=(0.15, 1.2, 4.0),
        code_turns=[0.1, 0.4, 0.3, 0.2],
    )
    cfg = RolloutConfig(max_turns=5, max_new_tokens=256, max_total_len=4096, prompt_template="tiny_tool")
    client = LocalSandboxClient(sandbox, max_kernels=len(items))
    runs: dict[str, list[dict]] = {"baseline": [], "async": []}
    for rep in range(reps + 1):  # the first round warms up (kernels, processor caches) and is not counted
        for name in ("baseline", "async"):
            book = _ScriptBook(items, scripts)
            engine = ComputeEngine(hf, book)
            cls = TurnSyncLoop if name == "baseline" else AgentLoop
            loop = cls(TurnBarrier(engine) if name == "baseline" else engine, client, processor, cfg)
            busy0, t0 = hf.busy_s, time.perf_counter()
            trajs = loop.run(items, seed=rep)
            wall = time.perf_counter() - t0
            bad = [t for t in trajs if t.end_reason.value != "DONE"]
            assert not bad, [(t.end_reason, t.extra.get("sandbox_error")) for t in bad[:3]]
            lat = [t.timings["total_s"] for t in trajs]
            if rep:
                runs[name].append(
                    {
                        "wall_s": wall,
                        "trajectories_per_s": len(trajs) / wall,
                        "engine_busy": (hf.busy_s - busy0) / wall,
                        "latency_p50_s": _pct(lat, 50),
                        "latency_p99_s": _pct(lat, 99),
                        "model_tokens": sum(sum(t.loss_mask) for t in trajs),
                    }
                )
    hf.close()
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {
        "trajectories": len(items),
        "cells": sum(len(s.cells) for s in scripts),
        "cell_s_p50": _pct([c for s in scripts for c in s.cells], 50),
        "cell_s_p99": _pct([c for s in scripts for c in s.cells], 99),
        "turn_tokens_p50": _pct([L for s in scripts for _, L in s.turns], 50),
        "turn_tokens_p99": _pct([L for s in scripts for _, L in s.turns], 99),
        "baseline": med["baseline"],
        "async": med["async"],
        "speedup_real": med["async"]["trajectories_per_s"] / med["baseline"]["trajectories_per_s"],
        "reps": reps,
        "runs": runs,
    }


# ---------------------------------------------------------------- simulated: a GPU engine model


# The published measurement the step model is fitted to: John Musgrave, "vLLM throughput-latency sweep on
# NVIDIA A100" (https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on): Llama-3.1-8B-Instruct, BF16,
# vLLM 0.23.0, one A100 40GB, 1024 input + 128 output tokens (--ignore-eos): ~75 tokens/s at one concurrent
# request, 6.6x that throughput at 8.
CALIBRATION = {
    "source": "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on",
    "model": "Llama-3.1-8B-Instruct bf16, vLLM 0.23.0, 1x A100 40GB",
    "params": 8.03e9,
    "kv_bytes_per_token": 2 * 32 * 8 * 128 * 2,  # K and V, 32 layers, 8 KV heads, head dim 128, bf16
    "mem_bw": 1.555e12,
    "peak_flops": 312e12,
    "context": 1024 + 64,  # mean context during the 128-token decode
    "points": [(1, 75.0), (8, 6.6 * 75.0)],  # (concurrency, output tokens/s)
}


@dataclass
class GPUModel:
    """Decode step time = (weights + KV of every running token) / (eta_bw x bandwidth) + batch x per-token
    FLOPs / (eta_flops x peak); prefill = its tokens' FLOPs / (eta_flops x peak). Defaults: Qwen2.5-VL-7B
    (8.3 B params, 28 layers, 4 KV heads x 128, bf16) on one H100 SXM at 0.85 memory utilisation."""

    params: float = 8.3e9
    kv_bytes_per_token: float = 2 * 28 * 4 * 128 * 2
    mem_bw: float = 3.35e12
    peak_flops: float = 989e12
    memory: float = 80e9 * 0.85
    eta_bw: float = 0.8
    eta_flops: float = 0.2
    max_num_seqs: int = 256  # vLLM's default

    def step_s(self, batch: int, context_tokens: int) -> float:
        mem = 2 * self.params + context_tokens * self.kv_bytes_per_token
        return mem / (self.eta_bw * self.mem_bw) + batch * 2 * self.params / (
            self.eta_flops * self.peak_flops
        )

    def prefill_s(self, tokens: int) -> float:
        return tokens * 2 * self.params / (self.eta_flops * self.peak_flops)

    @property
    def kv_capacity(self) -> int:
        return int((self.memory - 2 * self.params) / self.kv_bytes_per_token)

    @classmethod
    def calibrated(cls, **kw: Any) -> tuple[GPUModel, dict]:
        """Fit eta_bw and eta_flops to CALIBRATION's two points (a 2x2 linear system in 1/eta)."""
        c = CALIBRATION
        rows = []
        for b, tps in c["points"]:
            tpot = b / tps
            a = (2 * c["params"] + b * c["context"] * c["kv_bytes_per_token"]) / c["mem_bw"]
            f = b * 2 * c["params"] / c["peak_flops"]
            rows.append((a, f, tpot))
        (a1, f1, t1), (a2, f2, t2) = rows
        det = a1 * f2 - a2 * f1
        x, y = (t1 * f2 - t2 * f1) / det, (a1 * t2 - a2 * t1) / det
        gpu = cls(eta_bw=1 / x, eta_flops=1 / y, **kw)
        ref = cls(
            c["params"], c["kv_bytes_per_token"], c["mem_bw"], c["peak_flops"], eta_bw=1 / x, eta_flops=1 / y
        )
        check = {
            f"tokens_per_s_at_{b}": {"published": tps, "model": b / ref.step_s(b, b * c["context"])}
            for b, tps in c["points"]
        }
        return gpu, {"eta_bw": gpu.eta_bw, "eta_flops": gpu.eta_flops, "fit": check, **c}


@dataclass
class _Seq:
    left: int
    ctx: int
    prefill: int
    fut: asyncio.Future
    out: GenerationOutput
    rid: str


class SimEngine(GenerationEngine):
    """vLLM-style continuous batching on a GPUModel, on the event loop's clock: every step decodes one token
    of every running sequence; a new request joins at the next step (its uncached prefill added to that
    step); sequences wait when max_num_seqs or the KV capacity is reached. `busy_s`: time with work."""

    def __init__(self, gpu: GPUModel, book: _ScriptBook, tokenizer: Any, prompt_extra: int = 0):
        self.gpu, self.book, self.tok, self.prompt_extra = gpu, book, tokenizer, prompt_extra
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.running: list[_Seq] = []
        self.queued: list[_Seq] = []
        self.cached: dict[str, int] = {}  # prefix cache: context tokens of a request id already in KV
        self.cache: dict = {}
        self.busy_s = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def generate(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        text, n = self.book.next(request.request_id)
        ids = padded(self.tok, text, n, self.cache)
        finish = "stop" if text.endswith("</code>") else "eos"
        if finish == "eos":
            ids.append(self.im_end)
        cap = min(request.max_new_tokens or sampling.max_new_tokens, sampling.max_new_tokens)
        if len(ids) > cap:
            ids, finish = ids[:cap], "length"
        ctx = len(request.prompt_ids) + self.prompt_extra  # the input image's tokens, not in our tiny ids
        seq = _Seq(
            left=max(1, len(ids)),
            ctx=ctx,
            prefill=ctx - self.cached.get(request.request_id, 0),
            fut=asyncio.get_running_loop().create_future(),
            out=GenerationOutput(ids, [0.0] * len(ids), finish, ""),  # type: ignore[arg-type]
            rid=request.request_id,
        )
        self.queued.append(seq)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())
        self._wake.set()  # type: ignore[union-attr]
        return await seq.fut

    def _admit(self) -> int:
        used = sum(s.ctx + s.left for s in self.running)
        prefill = 0
        while self.queued and len(self.running) < self.gpu.max_num_seqs:
            s = self.queued[0]
            if self.running and used + s.ctx + s.left > self.gpu.kv_capacity:
                break
            self.queued.pop(0)
            self.running.append(s)
            used += s.ctx + s.left
            prefill += s.prefill
        return prefill

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running or self.queued:
            prefill = self._admit()
            dt = self.gpu.step_s(len(self.running), sum(s.ctx for s in self.running))
            m = min(s.left for s in self.running)
            t_pre = self.gpu.prefill_s(prefill)
            self._wake.clear()  # type: ignore[union-attr]
            t0 = loop.time()
            if not self.queued:  # an arrival may join early: wake on it
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=t_pre + m * dt)  # type: ignore[union-attr]
                except TimeoutError:
                    pass
            else:  # arrivals wait anyway (the batch is full): run to the next finish
                await asyncio.sleep(t_pre + m * dt)
            el = loop.time() - t0
            steps = min(m, max(0, math.floor((el - t_pre) / dt + 1e-9)))
            if steps < m:  # woken mid-step: finish the step in progress first
                steps += 1
                await asyncio.sleep(max(0.0, t0 + t_pre + steps * dt - loop.time()))
            self.busy_s += t_pre + steps * dt
            done = []
            for s in self.running:
                s.left -= steps
                s.ctx += steps
                if s.left <= 0:
                    done.append(s)
            for s in done:
                self.running.remove(s)
                self.cached[s.rid] = s.ctx
                s.fut.set_result(s.out)

    def update_weights(self, weights, version: int) -> None:
        raise NotImplementedError


class SimSandbox:
    """A SandboxClient whose cells take their scripted (heavy-tailed) time on the event loop's clock."""

    def __init__(self, book: _ScriptBook):
        self.book = book
        self.calls: dict[str, int] = {}

    async def open(self, traj_id: str, images: list[str], videos: list[str]) -> None:
        await asyncio.sleep(0.03)

    async def execute(self, traj_id: str, code: str, timeout_s: float | None) -> ExecResult:
        i = self.calls.get(traj_id, 0)
        self.calls[traj_id] = i + 1
        d = self.book.by_rid[traj_id].cells[i]
        await asyncio.sleep(d)
        return ExecResult(stdout=str(i), duration_s=d)

    async def close(self, traj_id: str) -> None:
        return None


class _JumpSelector(selectors.DefaultSelector):
    """When the loop would block for `timeout`, advance its virtual clock instead (nothing does real I/O)."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if not ready and timeout is not None and timeout > 0:
            self.clock[0] += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: simulated minutes run in seconds, and the loop's own CPU time
    (tokenizing, parsing) costs no simulated time."""

    def __init__(self) -> None:
        self._clock = [0.0]
        super().__init__(selector=_JumpSelector(self._clock))

    def time(self) -> float:
        return self._clock[0]


def bench_simulated(processor: Any, concurrency: list[int], seed: int = 0) -> dict:
    """Baseline vs async at each concurrency, the release's turn and length settings."""
    gpu, calib = GPUModel.calibrated()
    cfg = RolloutConfig(
        max_turns=5, max_new_tokens=10240, max_total_len=23040, max_images=32, prompt_template="tiny_tool"
    )
    out: dict = {"gpu": {"model": "Qwen2.5-VL-7B bf16 on 1x H100 SXM (modelled)", **gpu.__dict__,
                         "kv_capacity_tokens": gpu.kv_capacity}, "calibration": calib, "runs": {}}  # fmt: skip
    for c in concurrency:
        tasks = [Task(id=f"sim{i}", question="How many squares?", answer="1") for i in range(c)]
        items = [(t, f"g{i}") for i, t in enumerate(tasks)]
        scripts = draw_scripts(
            random.Random(seed + c),
            c,
            turn_tokens=(400, 1.0, 16, 10240),
            cell_s=(1.0, 1.2, 30.0),
            code_turns=[0.1, 0.3, 0.3, 0.2, 0.1],
        )
        res = {}
        for name in ("baseline", "async"):
            book = _ScriptBook(items, scripts)
            engine = SimEngine(gpu, book, processor.tokenizer, prompt_extra=2500)
            loop_cls = TurnSyncLoop if name == "baseline" else AgentLoop
            loop = loop_cls(
                TurnBarrier(engine) if name == "baseline" else engine, SimSandbox(book), processor, cfg
            )
            with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
                ev = runner.get_loop()
                t0, real0 = ev.time(), time.perf_counter()
                trajs = runner.run(loop.run_async(items))
                wall = ev.time() - t0
            bad = [t.end_reason.value for t in trajs if t.end_reason.value != "DONE"]
            res[name] = {
                "sim_wall_s": wall,
                "trajectories_per_s": c / wall,
                "engine_busy": engine.busy_s / wall,
                "model_tokens": sum(sum(t.loss_mask) for t in trajs),
                "not_done": len(bad),
                "real_s": time.perf_counter() - real0,
            }
        res["speedup"] = res["async"]["trajectories_per_s"] / res["baseline"]["trajectories_per_s"]
        out["runs"][str(c)] = res
    # The headline is the release's load per engine: 32 prompts x 8 samples over 4 rollout workers = 64.
    runs = out["runs"]
    head = str(concurrency[0])
    out["speedup_simulated"] = runs[head]["speedup"]
    out["engine_busy_simulated"] = runs[head]["async"]["engine_busy"]
    out["headline_concurrency"] = int(head)
    out["speedup_simulated_min"] = min(r["speedup"] for r in runs.values())
    out["engine_busy_simulated_min"] = min(r["async"]["engine_busy"] for r in runs.values())
    return out


# ---------------------------------------------------------------- the section


@dataclass
class AsyncSection:
    """What benchmarks/rollout.py stores under "async"."""

    real: dict = field(default_factory=dict)
    simulated: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "speedup_real": self.real.get("speedup_real"),
            "engine_busy_real_async": self.real.get("async", {}).get("engine_busy"),
            "speedup_simulated": self.simulated.get("speedup_simulated"),
            "engine_busy_simulated": self.simulated.get("engine_busy_simulated"),
            "speedup_simulated_min": self.simulated.get("speedup_simulated_min"),
            "engine_busy_simulated_min": self.simulated.get("engine_busy_simulated_min"),
            "targets": {"speedup_real": 1.5, "speedup_simulated": 2.0, "engine_busy_simulated": 0.9},
        }

    def print(self) -> None:
        r = self.real
        print("\n(d) async rollouts vs the turn-synchronous loop")
        if r:
            print(
                f"  real: tiny model + process sandbox, {r['trajectories']} trajectories, {r['cells']} cells "
                f"(cell p50/p99 {r['cell_s_p50']:.2f}/{r['cell_s_p99']:.2f} s, turn tokens p50/p99 "
                f"{r['turn_tokens_p50']:.0f}/{r['turn_tokens_p99']:.0f}), median of {r['reps']}"
            )
            print(f"  {'':<10}{'wall s':>9}{'traj/s':>9}{'busy':>7}{'p50 s':>8}{'p99 s':>8}")
            for k in ("baseline", "async"):
                v = r[k]
                print(
                    f"  {k:<10}{v['wall_s']:>9.2f}{v['trajectories_per_s']:>9.2f}{v['engine_busy']:>7.2f}"
                    f"{v['latency_p50_s']:>8.2f}{v['latency_p99_s']:>8.2f}"
                )
            print(f"  speedup_real {r['speedup_real']:.2f}x (target >= 1.5)")
        s = self.simulated
        if s:
            print("  simulated: modelled H100 + vLLM-style batching, release settings, virtual clock")
            print(
                f"  {'trajs':<8}{'base traj/s':>12}{'async traj/s':>13}{'speedup':>9}{'busy base':>10}{'busy async':>11}"
            )
            for c, v in s["runs"].items():
                print(
                    f"  {c:<8}{v['baseline']['trajectories_per_s']:>12.3f}{v['async']['trajectories_per_s']:>13.3f}"
                    f"{v['speedup']:>8.2f}x{v['baseline']['engine_busy']:>10.2f}{v['async']['engine_busy']:>11.2f}"
                )
            fit = s["calibration"]["fit"]
            cal = ", ".join(f"{k}: {v['model']:.0f} vs {v['published']:.0f}" for k, v in fit.items())
            print(f"  step model fit to {s['calibration']['source']} ({cal} tok/s)")
            print(
                f"  at {s['headline_concurrency']} (the release's load per engine): speedup_simulated "
                f"{s['speedup_simulated']:.2f}x (target >= 2), engine_busy_simulated "
                f"{s['engine_busy_simulated']:.2f} (target >= 0.9); minima over all sizes "
                f"{s['speedup_simulated_min']:.2f}x, {s['engine_busy_simulated_min']:.2f}"
            )
