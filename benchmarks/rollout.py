"""Rollout benchmarks. Prints a table and writes benchmarks/results/rollout.json.

(a) Agent-loop overhead: expert tool trajectories (code turn with a figure, then the answer) replayed by a
    zero-cost ScriptedEngine through the AgentLoop and the process sandbox, against the same cells run
    through the same sandbox alone (same kernels, same concurrency). Target: overhead < 10% of sandbox time.
(b) Visual tokens per video sample: on demand (the expert code reads frames in the sandbox and shows only
    what it needs) versus uniform 1 fps sampling of the same videos at the same resolution, counted with
    the policy's processor. Two sets: the repo's synthetic `video_event` tasks (64x64, 3-6 s) and longer,
    larger synthetic videos of the same kind (closer to the paper's setting; it reports ~5K vs ~45K).
(c) `--engines`: the agent-loop workload on the HF engine vs vLLM (tokens/s, trajectories/s), from the
    vLLM venv: `make setup-vllm && .venv-vllm/bin/python benchmarks/rollout.py --engines
    --model .cache/vllm-tiny-model` (writes benchmarks/results/rollout_engines.json).

(d) `--async`: one coroutine per trajectory vs the turn-synchronous loop, real (tiny model, process
    sandbox, heavy-tailed cells) and simulated (a modelled GPU behind vLLM-style batching, 64-512
    trajectories, release settings); see benchmarks/rollout_async.py. Stored under "async".

Usage: .venv/bin/python benchmarks/rollout.py [--n 16] [--reps 3] [--out benchmarks/results/rollout.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pyvision_rl.agent.loop import AgentLoop, LocalSandboxClient  # noqa: E402
from pyvision_rl.agent.scripted import ScriptedEngine  # noqa: E402
from pyvision_rl.config import RolloutConfig, SandboxConfig  # noqa: E402
from pyvision_rl.types import Task  # noqa: E402


def load_rows(path: Path) -> list[Task]:
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append(
            Task(
                id=r["id"],
                question=r["question"],
                answer=str(r["answer"]),
                data_source=r["data_source"],
                images=[str(path.parent / r["image_path"])] if "image_path" in r else [],
                videos=[str(path.parent / r["video_path"])] if "video_path" in r else [],
                extra=r.get("extra", {}),
            )
        )
    return out


# ---------------------------------------------------------------- (a) loop overhead


def bench_overhead(processor, sandbox, tasks: list[Task], reps: int) -> dict:
    from pyvision_rl.data.synthetic import expert_code, expert_turns

    turns = {t.id: expert_turns(t, use_tool=True) for t in tasks}
    threads = len(tasks)

    def sandbox_alone() -> float:
        def one(t: Task) -> None:
            k = sandbox.open(images=t.images, videos=t.videos)
            try:
                r = k.execute(expert_code(t), timeout_s=30)
                assert r.ok and r.images, r.error
            finally:
                k.close()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, tasks))
        return time.perf_counter() - t0

    # One loop for all runs, as a RolloutWorker keeps one (its client's threads stay warm).
    engine = ScriptedEngine.from_turns(processor.tokenizer, turns)
    loop = AgentLoop(
        engine,
        LocalSandboxClient(sandbox, max_kernels=threads),
        processor,
        RolloutConfig(),
        prompt_template="tiny_tool",
        exec_timeout_s=30,
    )

    def loop_run() -> dict:
        engine.turns.clear()  # replay the scripts from their first turn
        trajs = loop.run([(t, t.id) for t in tasks])
        assert all(t.end_reason.value == "DONE" and t.n_tool_images == 1 for t in trajs)
        return dict(loop.last_stats)

    loop_run()  # warm-up: imports, processor caches
    alone, runs = [], []
    for _ in range(reps):
        sandbox.pool.wait_full(60)
        alone.append(sandbox_alone())
        sandbox.pool.wait_full(60)
        runs.append(loop_run())
    loop.close()
    total = statistics.median(r["total_s"] for r in runs)
    base = statistics.median(alone)
    fw = max(0.0, total - base)  # wall time beyond the same cells run alone at the same concurrency
    turns_n = runs[0]["turns"]
    return {
        "trajectories": len(tasks),
        "turns_per_run": turns_n,
        "loop_total_s": total,
        "loop_framework_s": fw,
        "framework_ms_per_turn": 1000 * fw / max(turns_n, 1),
        "sandbox_alone_s": base,
        "trajectories_per_s": len(tasks) / total,
        "overhead_vs_sandbox": (total - base) / base,
        "framework_share_of_sandbox": fw / base,
        "reps": reps,
    }


# ---------------------------------------------------------------- (b) visual tokens


def _long_videos(out: Path, n: int, size: int, seconds: int, fps: int, seed: int = 0) -> list[Task]:
    """The video_event task, longer and larger: a coloured square appears at a random frame."""
    from pyvision_rl.data.synthetic import COLORS, VIDEO_QUESTION
    from pyvision_rl.data.video import write_video

    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        T = seconds * fps
        color = ["red", "green", "blue"][i % 3]
        first = int(rng.integers(1, T - 1))
        frames = np.full((T, size, size, 3), 20, dtype=np.uint8)
        sq = size // 4
        y, x = int(rng.integers(0, size - sq)), int(rng.integers(0, size // 2 - sq))
        frames[first:, y : y + sq, x : x + sq] = COLORS[color]
        p = out / f"long_{i}.mp4"
        write_video(p, frames, fps)
        tasks.append(
            Task(
                id=f"long-{i}",
                question=VIDEO_QUESTION.format(color=color),
                answer=str(first),
                videos=[str(p)],
                extra={"kind": "video_event", "color": color},
            )
        )
    return tasks


def _native_frame_code(task: Task, w: int, h: int) -> str:
    """Coarse-to-fine search for the first frame; shows the frame before and the frame of the event at the
    video's own resolution (figure size = frame size)."""
    ch = {"red": 0, "green": 1, "blue": 2}[task.extra["color"]]
    show = (
        f"plt.figure(figsize=({w / 100}, {h / 100}), dpi=100)\nplt.axes([0, 0, 1, 1])\n"
        "plt.imshow(fr)\nplt.axis('off')\nplt.show()\n"
    )
    return (
        "import numpy as np\n"
        "v = video_clue_0\n"
        "def hit(ix):\n"
        "    f = v.get_batch(ix).asnumpy().astype(np.int16)\n"
        f"    m = (f[..., {ch}] > 150) & (f.sum(-1) - f[..., {ch}] < 150)\n"
        "    return m.sum((1, 2)) > 20\n"
        "step = 8\n"
        "coarse = list(range(0, len(v), step))\n"
        "j = int(np.argmax(hit(coarse)))\n"
        "lo = max(coarse[j] - step + 1, 0)\n"
        "fine = list(range(lo, coarse[j] + 1))\n"
        "i = fine[int(np.argmax(hit(fine)))]\n"
        "for k in (max(i - 1, 0), i):\n"
        "    fr = v[k].asnumpy()\n" + "".join("    " + line + "\n" for line in show.splitlines()) + "print(i)"
    )


def bench_video_tokens(processor, sandbox, tasks: list[Task], code_fn=None) -> dict:
    from pyvision_rl.data.synthetic import answer_text, code_text, expert_turns
    from pyvision_rl.data.video import probe_video, read_frames
    from pyvision_rl.models.processing import encode_images, image_token_count, merge_size_of

    turns = {}
    for t in tasks:
        if code_fn is None:
            turns[t.id] = expert_turns(t, use_tool=True)
        else:
            info = probe_video(t.videos[0])
            turns[t.id] = [code_text(code_fn(t, info.width, info.height)), answer_text(t.answer)]
    engine = ScriptedEngine.from_turns(processor.tokenizer, turns)
    loop = AgentLoop(
        engine,
        LocalSandboxClient(sandbox),
        processor,
        RolloutConfig(),
        prompt_template="tiny_tool",
        exec_timeout_s=60,
        max_total_len=65536,
    )
    try:
        trajs = loop.run([(t, t.id) for t in tasks])
    finally:
        loop.close()
    ok = [t for t in trajs if t.end_reason.value == "DONE" and t.final_answer == t.ground_truth]
    merge = merge_size_of(processor)
    uniform, frames_1fps, per_frame = [], [], []
    for t in tasks:
        info = probe_video(t.videos[0])
        frame = read_frames(t.videos[0])[0]
        from PIL import Image

        _, grids = encode_images(processor, [Image.fromarray(frame)])
        tok = image_token_count(grids[0], merge)
        k = max(1, math.ceil(info.n_frames / info.fps))  # one frame per second
        uniform.append(k * tok)
        frames_1fps.append(k)
        per_frame.append(tok)
    info0 = probe_video(tasks[0].videos[0])
    on_demand = statistics.mean(t.visual_tokens for t in trajs)
    return {
        "videos": len(tasks),
        "resolution": f"{info0.width}x{info0.height}",
        "frames_mean": statistics.mean(probe_video(t.videos[0]).n_frames for t in tasks),
        "fps": info0.fps,
        "solved": len(ok),
        "on_demand_tokens_mean": on_demand,
        "on_demand_images_mean": statistics.mean(t.n_tool_images for t in trajs),
        "uniform_1fps_tokens_mean": statistics.mean(uniform),
        "uniform_1fps_frames_mean": statistics.mean(frames_1fps),
        "tokens_per_native_frame": statistics.mean(per_frame),
        "reduction_x": statistics.mean(uniform) / max(on_demand, 1e-9),
    }


# ---------------------------------------------------------------- (c) HF vs vLLM engines


def bench_engines(model_dir: str, n_tasks: int, samples: int, reps: int, out: Path) -> int:
    """The agent-loop workload (tiny model, sampled turns, format errors fed back, process sandbox) on the
    HF engine and on vLLM; run from .venv-vllm (it has both). Model tokens/s and trajectories/s per engine."""
    import asyncio

    from pyvision_rl.data.synthetic import make_dataset
    from pyvision_rl.engines.hf import HFEngine
    from pyvision_rl.engines.vllm import VLLMEngine
    from pyvision_rl.models import load_processor
    from pyvision_rl.sandbox import make_sandbox

    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    train, _ = make_dataset(work / "img", "color_count", n_tasks, 0, seed=0)
    items = [(t, f"g{i}") for i, t in enumerate(load_rows(train)) for _ in range(samples)]
    rcfg = RolloutConfig(max_turns=3, max_new_tokens=64, max_total_len=2048, feed_errors=True)
    sb = make_sandbox(SandboxConfig(backend="process", warm_kernels=8, max_kernels=4 * len(items)))
    processor = load_processor(model_dir)
    result: dict = {"machine": {"cpus": os.cpu_count()}, "trajectories": len(items), "engines": {}}
    try:
        for name, build in (
            ("hf", lambda: HFEngine(model_dir)),
            ("vllm", lambda: VLLMEngine(model_dir, max_model_len=2048)),
        ):
            t0 = time.perf_counter()
            engine = build()
            start_s = time.perf_counter() - t0
            loop = AgentLoop(engine, LocalSandboxClient(sb), processor, rcfg)
            runs = []
            for rep in range(reps + 1):  # the first run warms up (kernels, caches) and is not counted
                t0 = time.perf_counter()
                trajs = asyncio.run(loop.run_async(items, seed=None))
                wall = time.perf_counter() - t0
                tokens = sum(sum(t.loss_mask) for t in trajs)
                if rep:
                    runs.append(
                        {"wall_s": wall, "model_tokens": tokens, "turns": sum(t.n_turns for t in trajs)}
                    )
            engine.close()
            wall = statistics.median(r["wall_s"] for r in runs)
            tokens = statistics.median(r["model_tokens"] for r in runs)
            result["engines"][name] = {
                "start_s": start_s,
                "wall_s": wall,
                "model_tokens": tokens,
                "tokens_per_s": tokens / wall,
                "trajectories_per_s": len(items) / wall,
                "turns_per_run": statistics.median(r["turns"] for r in runs),
                "runs": runs,
            }
    finally:
        sb.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n(c) agent loop on HF vs vLLM ({len(items)} trajectories, tiny model, CPU, median of {reps})")
    print(f"  {'engine':<8}{'start s':>9}{'wall s':>9}{'tokens':>9}{'tok/s':>9}{'traj/s':>9}{'turns':>7}")
    for name, e in result["engines"].items():
        print(
            f"  {name:<8}{e['start_s']:>9.1f}{e['wall_s']:>9.2f}{e['model_tokens']:>9.0f}"
            f"{e['tokens_per_s']:>9.0f}{e['trajectories_per_s']:>9.2f}{e['turns_per_run']:>7.0f}"
        )
    print(f"\nwrote {out}")
    return 0


# ---------------------------------------------------------------- (d) async rollouts vs turn-synchronous


def run_async_section(args) -> int:
    """(d): see benchmarks/rollout_async.py. Writes the "async" key of the output JSON (others kept)."""
    from rollout_async import AsyncSection, bench_real, bench_simulated

    from pyvision_rl.data.synthetic import make_dataset
    from pyvision_rl.models import load_processor, make_tiny_model
    from pyvision_rl.sandbox import make_sandbox

    work = Path(tempfile.mkdtemp(prefix="bench-async-"))
    model = make_tiny_model(work / "tiny")
    processor = load_processor(model)
    train, _ = make_dataset(work / "img", "color_count", 8, 0, seed=0)
    tasks = load_rows(train)
    n = 8 * args.async_n
    sb = make_sandbox(SandboxConfig(backend="process", warm_kernels=n, max_kernels=n, timeout_s=30))
    section = AsyncSection()
    try:
        section.real = bench_real(str(model), processor, sb, tasks, args.async_n, max(1, args.reps - 1))
    finally:
        sb.close()
    section.simulated = bench_simulated(processor, [int(x) for x in args.sim_sizes.split(",")])
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"machine": {"cpus": os.cpu_count()}}
    result["async"] = {**section.summary(), "real": section.real, "simulated": section.simulated}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    section.print()
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", action="store_true", help="only (c): HF vs vLLM (run from .venv-vllm)")
    ap.add_argument("--model", default="", help="(c): tiny checkpoint dir (default: build one)")
    ap.add_argument("--n", type=int, default=16, help="trajectories per overhead run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/rollout.json"))
    ap.add_argument("--async", dest="async_only", action="store_true", help="only (d): async vs turn-sync")
    ap.add_argument("--async-n", type=int, default=4, help="(d) real: trajectories per task (8 tasks)")
    ap.add_argument("--sim-sizes", default="64,128,256,512", help="(d) simulated: concurrent trajectories")
    args = ap.parse_args()
    if args.async_only:
        return run_async_section(args)
    if args.engines:
        from pyvision_rl.models import make_tiny_model

        model = args.model or str(make_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny"))
        return bench_engines(
            model, args.n // 2, 4, args.reps, Path(args.out).with_name("rollout_engines.json")
        )

    from pyvision_rl.data.synthetic import make_dataset
    from pyvision_rl.models import load_processor, make_tiny_model
    from pyvision_rl.sandbox import make_sandbox

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    processor = load_processor(make_tiny_model(work / "tiny"))
    train, _ = make_dataset(work / "img", "color_count", args.n, 0, seed=0)
    img_tasks = load_rows(train)
    vtrain, _ = make_dataset(work / "vid", "video_event", args.videos, 0, seed=0)
    vid_tasks = load_rows(vtrain)
    long_tasks = _long_videos(work / "long", max(2, args.videos // 2), size=336, seconds=30, fps=4)

    sb = make_sandbox(
        SandboxConfig(backend="process", warm_kernels=args.n, max_kernels=4 * args.n, timeout_s=60)
    )
    try:
        overhead = bench_overhead(processor, sb, img_tasks, args.reps)
        short = bench_video_tokens(processor, sb, vid_tasks)
        long = bench_video_tokens(processor, sb, long_tasks, _native_frame_code)
    finally:
        sb.close()
    run_async_section(args)
    result = {
        **json.loads(Path(args.out).read_text()),
        "machine": {"cpus": os.cpu_count()},
        "sandbox_backend": "process",
        "overhead": overhead,
        "video_tokens": {"synthetic_video_event": short, "long_synthetic_336px_30s": long},
        "paper_reference": {"on_demand": 5000, "uniform_1fps": 45000, "reduction_x": 9.0},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    o = overhead
    print("\n(a) agent-loop overhead (zero-cost scripted engine, process sandbox)")
    print(f"  {'trajectories':<34}{o['trajectories']}")
    print(f"  {'loop wall time (s)':<34}{o['loop_total_s']:.3f}")
    print(f"  {'sandbox alone, same cells (s)':<34}{o['sandbox_alone_s']:.3f}")
    print(f"  {'trajectories / s':<34}{o['trajectories_per_s']:.2f}")
    print(f"  {'framework time per turn (ms)':<34}{o['framework_ms_per_turn']:.1f}")
    print(
        f"  {'framework time / sandbox time':<34}{100 * o['framework_share_of_sandbox']:.1f}%  (target < 10%)"
    )
    print(f"  {'loop wall vs sandbox alone':<34}{100 * o['overhead_vs_sandbox']:+.1f}%")
    print("\n(b) visual tokens per video sample")
    print(f"  {'set':<28}{'res':>9}{'frames':>8}{'on-demand':>11}{'1 fps':>9}{'cut':>7}{'solved':>8}")
    for name, v in result["video_tokens"].items():
        print(
            f"  {name:<28}{v['resolution']:>9}{v['frames_mean']:>8.0f}{v['on_demand_tokens_mean']:>11.0f}"
            f"{v['uniform_1fps_tokens_mean']:>9.0f}{v['reduction_x']:>6.1f}x{v['solved']:>5}/{v['videos']}"
        )
    print("  paper (PyVision-Video-7B): ~5K on-demand vs ~45K uniform, 9x")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
