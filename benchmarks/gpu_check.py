"""One-call device check for a machine with one GPU: `make gpu-check` (`make gpu-check DRY_RUN=1`: CPU part).

Phases, each a subprocess under its own timeout (killed with its process group when it runs over), so the
whole check ends within `--budget-s` (480 s) and never hangs:
  env    GPU, driver, torch / CUDA / vLLM / DeepSpeed versions, the NCCL settings actors get
  tests  the `gpu` tests (.venv) and the `vllm` tests (.venv-vllm): every test's outcome (JUnit XML)
  model  a randomly initialised Qwen2.5-VL of ~0.6 B parameters (Qwen2.5-0.5B's text stack with the real
         151,936-entry vocabulary, an 8-block Qwen2.5-VL vision tower), built from a config: no download
  rl     3 colocated RL steps: vLLM and DeepSpeed ZeRO-3 share the GPU (the engine sleeps during the learner
         step), the release's prompt, the real sandbox (Docker where an engine answers, else bwrap)
Reported: per-phase time, rollout tokens/s, learner tokens/s, an MFU estimate of the learner step, weight
sync time, peak GPU memory (nvidia-smi, sampled every 0.5 s), each test's outcome. Written to
`$OUT/gpu_check.json` (`runs/gpu-check/gpu_check.json` when OUT is unset), and printed as a table.

`--dry-run` does what a CPU can: validates the RL config, builds the check model on the meta device (its
parameter count), imports the GPU code paths, and prints the command line of every phase; it is part of
`make test` and takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-0.5B's text stack with the real vocabulary, and a shallow Qwen2.5-VL vision tower (the real one
# has 32 blocks, 0.67 B parameters): ~0.6 B parameters in all.
CHECK_MODEL = {
    "text": dict(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(
        depth=8,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=896,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[3, 7],
        tokens_per_second=2,
        in_channels=3,
    ),
}

# Dense bf16 tensor-core peak per GPU, for the MFU estimate (H100/H200 SXM: 989 TFLOP/s).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}

PHASE_TIMEOUT_S = {"env": 30, "gpu_tests": 70, "vllm_tests": 120, "model": 60, "rl": 230}


def rl_overrides(model_dir: str, out: Path) -> list[str]:
    """The 3-step colocated run on one GPU, as `key=value` overrides of the defaults."""
    return [
        "run.name=rl",
        f"run.output_dir={out}",
        "run.resume=never",
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
        "model.max_pixels=200704",  # 256*28*28: the synthetic images are small anyway
        "data.synthetic.n_train=64",
        "data.synthetic.n_eval=4",
        "rollout.engine=vllm",
        "rollout.num_workers=1",
        "rollout.worker_num_gpus=0.5",
        "rollout.n=4",
        "rollout.gen_batch_size=8",
        "rollout.max_turns=3",
        "rollout.max_new_tokens=256",
        "rollout.max_total_len=4096",
        "rollout.vllm_gpu_memory_utilization=0.35",
        "rollout.vllm_enable_sleep_mode=true",
        "learner.placement=colocated",
        "learner.world_size=1",
        "learner.num_gpus_per_rank=0.5",
        "learner.zero_stage=3",
        "learner.micro_batch_size=4",
        "sync.backend=auto",
        # a random model earns no reward: keep every group so the learner trains a full batch anyway
        "reward.filters.drop_zero_std=false",
        "reward.filters.require_tool_image=false",
        "reward.filters.allowed_end_reasons=[DONE,EXCEED_MAX_TURNS,ERROR_IN_ACTION,OVER_LENGTH]",
        "trainer.total_steps=3",
        "trainer.train_batch_size=8",
        "trainer.max_chunks_per_step=1",
        "trainer.save_every=1000",
        "trainer.eval_every=0",
        "eval.max_tasks=4",
        "eval.max_turns=2",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]


# ---------------------------------------------------------------------------------------------- the model


def check_model_config():
    from transformers import Qwen2_5_VLConfig

    from pyvision_rl.models.tiny import QWEN_SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer()
    ids = {n: tok.convert_tokens_to_ids(n) for n in QWEN_SPECIAL_TOKENS}
    special = dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    conf = Qwen2_5_VLConfig(
        text_config={**CHECK_MODEL["text"], **special},
        vision_config=CHECK_MODEL["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        **special,
    )
    return conf, tok


def build_model(out_dir: str, meta: bool) -> dict:
    """Random weights from the config (bf16, on the GPU when there is one), saved as an HF checkpoint dir."""
    import torch
    from transformers import AutoModelForImageTextToText

    from pyvision_rl.models.loading import build_processor

    conf, tok = check_model_config()
    t0 = time.perf_counter()
    device = "meta" if meta else ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(conf, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    info = {"params": n, "vision_params": n_vision, "vocab": conf.text_config.vocab_size, "device": device}
    if not meta:
        model.generation_config.eos_token_id = [conf.eos_token_id, conf.pad_token_id]
        model.generation_config.pad_token_id = conf.pad_token_id
        model.save_pretrained(out_dir, safe_serialization=True)
        processor = build_processor(tok, "qwen2_5_vl", patch_size=14, merge_size=2)
        processor.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        pc = Path(out_dir) / "processor_config.json"
        if pc.is_file():  # so vLLM loads the dir as a stock Qwen2.5-VL checkpoint
            d = json.loads(pc.read_text())
            d["processor_class"] = "Qwen2_5_VLProcessor"
            pc.write_text(json.dumps(d, indent=2) + "\n")
    info["build_s"] = time.perf_counter() - t0
    return info


# ---------------------------------------------------------------------------------------------- phases


class GpuMemory:
    """Peak `memory.used` of GPU 0 over a phase, sampled from nvidia-smi (every process on the device)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)

    def _run(self, period_s: float) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                self.peak_mib = max(self.peak_mib, float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(period_s)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def run_phase(name: str, cmd: list[str], timeout_s: float, log_dir: Path, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group; on timeout kill the whole group (Ray, vLLM's engine core)."""
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f, GpuMemory() as mem:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = proc.returncode, True
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {
        "rc": rc,
        "ok": rc == 0,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - t0,
        "timeout_s": timeout_s,
        "peak_gpu_mib": mem.peak_mib,
        "log": str(log),
        "tail": tail if rc != 0 else [],
    }


def junit_outcomes(path: Path) -> dict[str, str]:
    """test id -> passed | failed | error | skipped, from pytest's JUnit XML."""
    if not path.is_file():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [c.tag for c in case]
        out[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed").replace(
            "failure", "failed"
        )
    return out


def rl_figures(run_dir: Path, params: int, vision_params: int, gpu_name: str) -> dict:
    """Per-step figures of the RL phase from <run>/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    steps = [r for r in rows if "train/time_s" in r]
    if not steps:
        return {"steps": 0}
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)
    trainable = params - vision_params  # the vision tower is frozen
    per = []
    for r in steps:
        seq = float(r.get("train/seq_tokens", 0.0))
        t = float(r["train/time_s"])
        # old-logp forward (2N) + forward/backward (6N) + the recompute of gradient checkpointing (2N)
        flops = 10 * trainable * seq
        per.append(
            {
                "rollout_tokens_per_s": r.get("throughput/tokens_per_s"),
                "learner_tokens_per_s": seq / t if t else None,
                "learner_s": t,
                "sync_s": r.get("time/sync"),
                "mfu": flops / t / peak if (peak and t) else None,
            }
        )
    last = per[1:] or per  # the first step pays compilation and warm-up
    return {
        "steps": len(steps),
        "per_step": per,
        "rollout_tokens_per_s": sum(p["rollout_tokens_per_s"] or 0 for p in last) / len(last),
        "learner_tokens_per_s": sum(p["learner_tokens_per_s"] or 0 for p in last) / len(last),
        "sync_s": sum(p["sync_s"] or 0 for p in last) / len(last),
        "mfu": (sum(p["mfu"] for p in last) / len(last)) if all(p["mfu"] is not None for p in last) else None,
    }


def print_table(report: dict) -> None:
    print(f"\ngpu-check on {report['device']}  ({'dry run' if report['dry_run'] else 'full'})")
    print(f"{'phase':<12} {'ok':<5} {'seconds':>8} {'limit':>6} {'peak GPU GiB':>13}")
    for name, p in report["phases"].items():
        status = "yes" if p.get("ok") else ("TIME" if p.get("timed_out") else "NO")
        print(
            f"{name:<12} {status:<5} {p.get('seconds', 0):>8.1f} {p.get('timeout_s', 0):>6.0f} "
            f"{p.get('peak_gpu_mib', 0) / 1024:>13.1f}"
        )
    rl = report.get("rl", {})
    if rl.get("steps"):
        mfu = f"{100 * rl['mfu']:.1f} %" if rl.get("mfu") is not None else "n/a"
        print(
            f"RL: {rl['steps']} steps; rollout {rl['rollout_tokens_per_s']:.0f} tok/s; learner "
            f"{rl['learner_tokens_per_s']:.0f} tok/s; MFU {mfu}; sync {rl['sync_s']:.2f} s"
        )
    tests = report.get("tests", {})
    if tests:
        counts: dict[str, int] = {}
        for v in tests.values():
            counts[v] = counts.get(v, 0) + 1
        print("tests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for k, v in tests.items():
            if v in ("failed", "error"):
                print(f"  {v}: {k}")
    for c in report.get("commands", []):
        print(f"  $ {c}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only: config, meta model, command lines")
    ap.add_argument("--python", default=sys.executable, help="the project venv (gpu tests)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"), help="vLLM venv")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check, all phases")
    ap.add_argument("--build-model", default="", help=argparse.SUPPRESS)  # phase entry point
    args = ap.parse_args()
    if args.build_model:
        print(json.dumps(build_model(args.build_model, meta=False)))
        return 0

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu-check"
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    model_dir = out / "model"
    vpy = args.vllm_python if Path(args.vllm_python).exists() else args.python
    junit_gpu, junit_vllm = out / "junit_gpu.xml", out / "junit_vllm.xml"
    # the RL phase's config, validated here on every machine (unknown keys, bad values fail the dry run)
    from pyvision_rl.config import dump_config, load_config

    t0 = time.perf_counter()
    rl_cfg = load_config(None, rl_overrides(str(model_dir), out / "runs"))
    rl_yaml = out / "rl.yaml"
    rl_yaml.write_text(dump_config(rl_cfg))
    t_config = time.perf_counter() - t0
    env_cmd = [
        args.python,
        "-c",
        "import json, torch, deepspeed, transformers, importlib.util as u;"
        "from pyvision_rl.actors.weight_sync import nccl_env;"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,"
        "'deepspeed': deepspeed.__version__, 'transformers': transformers.__version__,"
        "'nccl_env': nccl_env()}))",
    ]
    phases_cmd = {
        "env": env_cmd,
        "gpu_tests": [args.python, "-m", "pytest", "-q", "-ra", "-m", "gpu", f"--junitxml={junit_gpu}"],
        "vllm_tests": [
            vpy,
            "-m",
            "pytest",
            "-q",
            "-ra",
            "-m",
            "vllm",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit_vllm}",
        ],
        "model": [args.python, __file__, "--build-model", str(model_dir)],
        "rl": [vpy, "-m", "pyvision_rl.cli", "train", str(rl_yaml)],
    }
    report: dict = {"dry_run": args.dry_run, "out": str(out), "phases": {}, "tests": {}}
    report["commands"] = [" ".join(c) for c in phases_cmd.values()]
    t_start = time.perf_counter()

    report["config"] = {
        "placement": rl_cfg.learner.placement,
        "zero_stage": rl_cfg.learner.zero_stage,
        "engine": rl_cfg.rollout.engine,
        "sync": rl_cfg.sync.backend,
        "yaml": str(rl_yaml),
    }
    if args.dry_run:
        import torch

        t0 = time.perf_counter()
        import pyvision_rl.actors.weight_sync  # noqa: F401 - the GPU sync paths import without a GPU
        import pyvision_rl.engines.vllm  # noqa: F401

        report["phases"]["config"] = {"ok": True, "seconds": t_config + time.perf_counter() - t0}
        t0 = time.perf_counter()
        info = build_model("", meta=True)
        ok = 0.5e9 <= info["params"] <= 1e9
        report["phases"]["model_meta"] = {"ok": ok, "seconds": time.perf_counter() - t0}
        report["model"] = info
        report["device"] = f"cpu ({os.cpu_count()} cores), torch {torch.__version__}"
    else:
        report["device"] = "unknown"
        for name, cmd in phases_cmd.items():
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 5:
                report["phases"][name] = {"ok": False, "timed_out": True, "seconds": 0.0, "skipped": "budget"}
                continue
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            if name == "rl":  # the run reads its config from defaults + overrides; vLLM caches in the repo
                env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
            p = run_phase(name, cmd, min(PHASE_TIMEOUT_S[name], left), logs, env)
            report["phases"][name] = p
            if name == "env" and p["ok"]:
                lines = Path(p["log"]).read_text().strip().splitlines()
                report["env"] = json.loads(lines[-1])
                report["device"] = report["env"].get("gpu") or "no CUDA device"
            if name == "model" and p["ok"]:
                report["model"] = json.loads(Path(p["log"]).read_text().strip().splitlines()[-1])
        report["tests"] = {**junit_outcomes(junit_gpu), **junit_outcomes(junit_vllm)}
        m = report.get("model", {})
        report["rl"] = rl_figures(
            out / "runs" / "rl", m.get("params", 0), m.get("vision_params", 0), report["device"]
        )
        report["peak_gpu_mib"] = max((p.get("peak_gpu_mib", 0) for p in report["phases"].values()), default=0)
    report["total_s"] = time.perf_counter() - t_start
    report["ok"] = all(p.get("ok") for p in report["phases"].values()) and not any(
        v in ("failed", "error") for v in report["tests"].values()
    )
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(
        f"\nwrote {out / 'gpu_check.json'} ({'ok' if report['ok'] else 'FAILED'}, {report['total_s']:.1f} s)"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
