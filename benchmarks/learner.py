"""Learner benchmark: step time and peak memory vs tokens per step; a long sequence; weight-sync throughput.

Run: `.venv/bin/python benchmarks/learner.py [--sync-gb 1.0] [--sizes 4,8,16]`
Prints three tables and writes benchmarks/results/learner.json.

1. PolicyLearner (world size 1, ZeRO-2, tiny model, CPU fp32 or GPU bf16): one GRPO step over N trajectories
   (~90 tokens, two images each); median of 3 steps after a warm-up; peak memory = max RSS (CPU) or
   max CUDA allocated (GPU).
2. `long_sequence`: one learner step (ZeRO-2, gradient checkpointing, as the 7B recipe) on one 16,384-token
   trajectory with 2,048 model tokens, on a tiny model with Qwen's real vocabulary (151,936), in a fresh
   subprocess whose peak RSS (ru_maxrss, the whole process: torch, DeepSpeed, model, optimizer, step) is
   `peak_gb`. Full logits would be 16,384 x 151,936 x 4 B = 10 GB per copy; the target is <= 3 GB.
3. Weight sync of a `--sync-gb` state dict (fp32 tensors of 64 MB) through Ray's object store into
   another actor's preallocated tensors (pack -> put -> get -> unpack -> copy, 256 MB buckets, as the
   object_store backend does), beside a plain in-process `copy_` of the same bytes; the ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def peak_mem_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_steps(sizes: list[int]) -> list[dict]:
    from pyvision_rl.config import LearnerConfig, ModelConfig
    from pyvision_rl.learner.engine import PolicyLearner
    from pyvision_rl.models.tiny import make_tiny_model

    # the learner tests' trajectories, run from their file (neither benchmarks/ nor tests/ is a package)
    make_trajs = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tests/helpers.py"))["make_trajs"]
    d = make_tiny_model(Path(tempfile.mkdtemp()) / "m")
    lrn = PolicyLearner(str(d), LearnerConfig(zero_stage=2, lr=1e-4, micro_batch_size=8), ModelConfig())
    rows = []
    for n in sizes:
        trajs = make_trajs(lrn.processor, n_groups=max(1, n // 4), n=4, seed=n)
        lrn.train_step(trajs)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            m = lrn.train_step(trajs)
            times.append(time.perf_counter() - t0)
        tokens = sum(t.length for t in trajs)
        rows.append(
            {
                "trajectories": len(trajs),
                "tokens_per_step": tokens,
                "model_tokens": int(m["tokens"]),
                "step_s": statistics.median(times),
                "tokens_per_s": tokens / statistics.median(times),
                "peak_mem_mb": peak_mem_mb(),
            }
        )
    lrn.close()
    return rows


QWEN_VOCAB = 151_936


def long_sequence_child(tokens: int, model_tokens: int, vocab: int) -> dict:
    """Runs in its own process (see `bench_long_sequence`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pyvision_rl.config import LearnerConfig, ModelConfig
    from pyvision_rl.learner.engine import PolicyLearner
    from pyvision_rl.models.processing import special_ids
    from pyvision_rl.models.tiny import make_tiny_model
    from pyvision_rl.types import EndReason, Trajectory

    d = make_tiny_model(Path(tempfile.mkdtemp()) / "m")
    conf = AutoConfig.from_pretrained(d)
    conf.text_config.vocab_size = vocab  # the tiny tokenizer, Qwen's embedding and LM-head size
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(conf).save_pretrained(d)
    lrn = PolicyLearner(
        str(d), LearnerConfig(zero_stage=2, micro_batch_size=1), ModelConfig(gradient_checkpointing=True)
    )
    tok = lrn.processor.tokenizer
    sp = special_ids(tok)
    g = torch.Generator().manual_seed(0)
    n_plain = min(sp.values())  # BPE ids below the special tokens

    def rand(n: int) -> list[int]:
        return torch.randint(0, n_plain, (n,), generator=g).tolist()

    prompt = [sp["im_start"]] + rand(1022) + [sp["im_end"]]
    turns = 8  # model turns, each followed by an observation (tool output) except the last
    obs_len = (tokens - len(prompt) - model_tokens) // (turns - 1)
    resp, mask = [], []
    for k in range(turns):
        seg = rand(model_tokens // turns)
        resp += seg
        mask += [1] * len(seg)
        if k < turns - 1:
            n = obs_len if k < turns - 2 else tokens - len(prompt) - model_tokens - obs_len * (turns - 2)
            resp += rand(n)
            mask += [0] * n
    traj = Trajectory(
        task_id="long",
        group_id="g",
        prompt_ids=prompt,
        response_ids=resp,
        loss_mask=mask,
        rollout_logprobs=[-10.0 if m else 0.0 for m in mask],
        end_reason=EndReason.DONE,
        reward=1.0,
        advantage=0.5,
    )
    assert traj.length == tokens and sum(mask) == model_tokens
    t0 = time.perf_counter()
    m = lrn.train_step([traj])
    step_s = time.perf_counter() - t0
    lrn.close()
    return {
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "tokens": traj.length,
        "model_tokens": int(m["tokens"]),
        "vocab": vocab,
        "step_s": step_s,
        "loss_finite": bool(torch.isfinite(torch.tensor(m["loss"]))),
        "grad_norm": m["grad_norm"],
    }


def bench_long_sequence(tokens: int = 16_384, model_tokens: int = 2_048, vocab: int = QWEN_VOCAB) -> dict:
    """`long_sequence_child` in a fresh interpreter, so ru_maxrss is this step's process alone."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--long-sequence-child", f"{tokens},{model_tokens},{vocab}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"long-sequence step failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sync(gb: float, bucket_mb: int = 256) -> dict:
    import ray

    from pyvision_rl.actors.weight_sync import apply_packed_buckets
    from pyvision_rl.learner.weight_sync import pack_bucket

    n_tensors = max(1, int(gb * 1024 / 64))
    sd = {f"w{i}": torch.randn(16 * 2**20) for i in range(n_tensors)}  # 64 MB fp32 each
    nbytes = sum(t.numel() * 4 for t in sd.values())

    # in-process copy of the same bytes into preallocated tensors
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    for _ in range(2):  # the second round is the steady state (destination pages already faulted in)
        t0 = time.perf_counter()
        for k, v in sd.items():
            dst[k].copy_(v)
        t_copy = time.perf_counter() - t0
    del dst

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=int(3 * nbytes) + 2**28
    )

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self, shapes):
            self.params = {k: torch.empty(s) for k, s in shapes.items()}

        def update_weights(self, named, version):
            for k, t in named.items():
                self.params[k].copy_(t)

        def run(self, refs, version):
            return apply_packed_buckets(self, refs, version)

        def checksum(self):
            return float(sum(p.double().sum() for p in self.params.values()))

    rx = Receiver.remote({k: v.shape for k, v in sd.items()})
    ray.get(rx.checksum.remote())
    per = max(1, bucket_mb // 64)
    names = list(sd)
    results = []
    for _ in range(2):  # the second round is the steady state (object store pages already mapped)
        t0 = time.perf_counter()
        refs = [
            ray.put(pack_bucket({k: sd[k] for k in names[i : i + per]})) for i in range(0, len(names), per)
        ]
        t_put = time.perf_counter() - t0
        got = ray.get(rx.run.remote(refs, 1))
        t_total = time.perf_counter() - t0
        del refs
        results.append((t_put, t_total, got))
    t_put, t_total, got = results[-1]
    ok = (
        abs(ray.get(rx.checksum.remote()) - float(sum(v.double().sum() for v in sd.values()))) < 1e-3 * nbytes
    )
    ray.shutdown()
    return {
        "state_dict_gb": nbytes / 1e9,
        "bucket_mb": bucket_mb,
        "received_bytes": got,
        "checksum_ok": bool(ok),
        "object_store_s": t_total,
        "object_store_put_s": t_put,
        "object_store_gb_per_s": nbytes / 1e9 / t_total,
        "in_process_copy_s": t_copy,
        "in_process_gb_per_s": nbytes / 1e9 / t_copy,
        "ratio_object_store_over_copy": t_total / t_copy,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,32", help="trajectories per step")
    ap.add_argument("--sync-gb", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/results/learner.json")
    ap.add_argument("--long-sequence-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.long_sequence_child:
        print(json.dumps(long_sequence_child(*[int(x) for x in args.long_sequence_child.split(",")])))
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    steps = bench_steps([int(x) for x in args.sizes.split(",")])
    print(f"\nLearner step (tiny model, ZeRO-2, world size 1, {device})")
    print(f"{'trajs':>6} {'tokens':>8} {'model tok':>9} {'step s':>8} {'tok/s':>9} {'peak MB':>9}")
    for r in steps:
        print(
            f"{r['trajectories']:>6} {r['tokens_per_step']:>8} {r['model_tokens']:>9} {r['step_s']:>8.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['peak_mem_mb']:>9.0f}"
        )
    long = bench_long_sequence()
    print(
        f"\nLong sequence: {long['tokens']} tokens, {long['model_tokens']} model tokens, vocab {long['vocab']}: "
        f"peak RSS {long['peak_gb']:.2f} GB (target <= 3), step {long['step_s']:.1f} s"
    )
    sync = bench_sync(args.sync_gb)
    print(f"\nWeight sync, {sync['state_dict_gb']:.2f} GB fp32 state dict, {sync['bucket_mb']} MB buckets")
    print(
        f"  object store (pack+put+get+copy): {sync['object_store_s']:.3f} s  {sync['object_store_gb_per_s']:.2f} GB/s"
        f"  (put alone {sync['object_store_put_s']:.3f} s)"
    )
    print(
        f"  in-process copy_:                 {sync['in_process_copy_s']:.3f} s  {sync['in_process_gb_per_s']:.2f} GB/s"
    )
    print(
        f"  ratio object store / copy:        {sync['ratio_object_store_over_copy']:.1f}x   checksum ok: {sync['checksum_ok']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": device, "steps": steps, "long_sequence": long, "sync": sync}, indent=1) + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
