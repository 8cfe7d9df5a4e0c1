"""Soak: many trajectories through one SandboxPool actor, then check that nothing was lost or leaked.

Phase "soak": `--trajectories` trajectories (default 10,000), `--concurrency` at a time (default 64), each
opening a kernel with a task image through the SandboxPool Ray actor, running cells and closing it. Most
are normal PyVision trajectories (crop `image_clue_0`, `plt.show()`, a cell that reads the variables of
the earlier ones); every `--attack-every`-th runs one attack of the containment suite
(tests/sandbox/test_sandbox_containment.py, all of them in turn) between a cell before it and a cell
after it that must still answer. Phase "burst": `--burst` trajectories (default 256) opening kernels at
once through a pool that admits them all (sandbox.max_kernels = burst), 3 image cells each.

A trajectory is lost when a call raises, a result is a sandbox failure (`ExecResult.sandbox_error`), a
normal cell fails or returns the wrong output, or the cell after an attack does not answer. Attacks whose
outcome differs from the suite's expectation are counted apart (`uncontained_attacks`).

Afterwards (the pool shut down): leftover containers carrying this pool's owner label, processes left in
the pool process's tree or in the cgroups of containers that no longer exist, the pool process's open file
descriptors (vs after warm-up), task directories left in the pool's private TMPDIR, and docker cgroups
without a container (vs before); the pool process's RSS after warm-up, at the end, and sampled along.
Writes benchmarks/results/soak.json.

    python benchmarks/soak.py [--trajectories 10000] [--concurrency 64] [--burst 256] [--backend docker]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray

from pyvision_rl.actors.sandbox import SandboxPool
from pyvision_rl.config import SandboxConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "sandbox"))
from test_sandbox_containment import ATTACKS  # noqa: E402 - the containment suite's own attacks

IMAGE_CELL = (
    "w, h = image_clue_0.size\ncrop = image_clue_0.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))\n"
    "plt.figure(figsize=(2, 2))\nplt.imshow(crop)\nplt.axis('off')\nplt.show()\nprint(crop.size)\n"
)
# (code, check of the result): a normal trajectory's cells; the last reads the first cells' variables.
NORMAL = [
    (IMAGE_CELL, lambda r: r.ok and len(r.images) == 1 and r.stdout == "(100, 50)\n"),
    ("mean = float(np.asarray(crop).mean())\nprint(round(mean, 1))", lambda r: r.ok and r.stdout == "85.0\n"),
    ("print(w * h, crop.size)", lambda r: r.ok and r.stdout == "20000 (100, 50)\n"),
]
HOST_ROOT = set(os.listdir("/root")) - {".pyenv"} if os.path.isdir("/root") else set()


def contained(res, expect: str) -> bool:
    """The containment suite's expectation for one attack's result."""
    if "CONNECTED" in res.stdout or "[tool.ruff]" in res.stdout or os.path.exists("/usr/pwned"):
        return False
    if expect == "error":
        return bool(res.error)
    if expect == "timeout":
        return res.timed_out
    if expect == "error_or_timeout":
        return bool(res.error) or res.timed_out
    if expect == "error_or_ok":
        return res.error is None or "died" in res.error or "Error" in res.error
    if expect == "truncated":
        return res.error is None and "[output truncated:" in res.stdout
    if expect == "small_image":
        from PIL import Image

        if res.error is not None or len(res.images) != 1:
            return False
        w, h = Image.open(io.BytesIO(res.images[0])).size
        return w * h <= 1_000_000
    if expect == "no_host_root":
        return not any(e in res.stdout for e in HOST_ROOT if len(e) > 3)
    raise ValueError(expect)


class Tally:
    def __init__(self) -> None:
        self.done = 0
        self.lost = 0
        self.sandbox_errors = 0
        self.uncontained: dict[str, int] = {}
        self.examples: list[str] = []
        self.cells = 0
        self.cells_ok = 0

    def lose(self, why: str) -> None:
        self.lost += 1
        if len(self.examples) < 20:
            self.examples.append(why[:300])


async def trajectory(pool, tid: str, image: str, attack: str | None, cells: list, tally: Tally) -> None:
    try:
        await pool.open.remote(tid, [image], [])
        plan: list = []
        if attack is None:
            plan = [(code, 10.0, check, None) for code, check in cells]
        else:
            code, expect = ATTACKS[attack]
            plan = [
                ("survivor = 41", 10.0, lambda r: r.ok, None),
                (code, 2.5 if "timeout" in expect else 10.0, None, expect),
                ("print('alive')", 10.0, lambda r: r.ok and r.stdout == "alive\n", None),
            ]
        for code, timeout, check, expect in plan:
            res = await pool.execute.remote(tid, code, timeout)
            tally.cells += 1
            if res.sandbox_error:
                tally.sandbox_errors += 1
                tally.lose(f"{tid} ({attack or 'normal'}): sandbox error: {res.error}")
                return
            if expect is not None:
                if not contained(res, expect):
                    tally.uncontained[attack] = tally.uncontained.get(attack, 0) + 1
                continue
            if not check(res):
                tally.lose(f"{tid} ({attack or 'normal'}): {code.splitlines()[0]!r} -> {res!r}"[:300])
                return
            tally.cells_ok += 1
        tally.done += 1
    except Exception as e:  # noqa: BLE001 - a raise is a lost trajectory, counted
        tally.lose(f"{tid}: {type(e).__name__}: {e}")
    finally:
        try:
            await pool.close.remote(tid)
        except Exception as e:  # noqa: BLE001
            tally.lose(f"{tid}: close raised {type(e).__name__}: {e}")


async def run_phase(pool, n: int, concurrency: int, image: str, attack_every: int, cells: list,
                    pid: int, prefix: str) -> dict:  # fmt: skip
    tally = Tally()
    names = list(ATTACKS)
    todo = iter(range(n))
    rss: list[float] = []
    proc = psutil.Process(pid)

    async def worker() -> None:
        for i in todo:
            attack = (
                names[(i // attack_every) % len(names)] if attack_every and i % attack_every == 0 else None
            )
            await trajectory(pool, f"{prefix}-{i}", image, attack, cells, tally)
            if i % 500 == 0:
                rss.append(proc.memory_info().rss / 2**20)
                print(
                    f"  {prefix}: {i}/{n} done={tally.done} lost={tally.lost} rss={rss[-1]:.0f} MB",
                    flush=True,
                )

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    metrics = await pool.metrics.remote()
    return {
        "trajectories": n,
        "concurrency": concurrency,
        "completed": tally.done,
        "lost_trajectories": tally.lost,
        "sandbox_errors": tally.sandbox_errors,
        "uncontained_attacks": tally.uncontained,
        "attacks": (n + attack_every - 1) // attack_every if attack_every else 0,
        "cells": tally.cells,
        "wall_s": wall,
        "trajectories_per_s": n / wall,
        "rss_samples_mb": rss,
        "lost_examples": tally.examples,
        "pool_metrics": metrics,
    }


# ----------------------------------------------------------------------------------------- leak checks
_CG = "/sys/fs/cgroup"
_ID = re.compile(r"docker[-/]([0-9a-f]{64})")


def docker_ids(*args: str) -> set[str]:
    r = subprocess.run(["docker", "ps", "-aq", "--no-trunc", *args], capture_output=True, text=True)
    return set(r.stdout.split())


def orphan_cgroups() -> set[str]:
    """docker cgroup directories (any controller) whose container no longer exists."""
    ids = set()
    for d in glob.glob(f"{_CG}/*/docker/*") + glob.glob(f"{_CG}/*/system.slice/docker-*.scope"):
        m = _ID.search(d)
        if m:
            ids.add(m.group(1))
    return ids - docker_ids()


def orphan_processes(pool_pid: int) -> list[int]:
    """Processes left in the pool's process tree, or in the cgroup of a container that is gone."""
    live = docker_ids()
    left = []
    try:
        left = [c.pid for c in psutil.Process(pool_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in psutil.pids():
        try:
            with open(f"/proc/{p}/cgroup") as f:
                m = _ID.search(f.read())
        except OSError:
            continue
        if m and m.group(1) not in live:
            left.append(p)
    return left


def _sockets() -> dict[str, str]:
    """socket inode -> 'unix:<path>' or 'tcp:<remote host:port>' (from /proc/net)."""
    out = {}
    for line in open("/proc/net/unix").readlines()[1:]:
        f = line.split()
        out[f[6]] = "unix:" + (f[7] if len(f) > 7 else "")
    for name in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{name}").readlines()[1:]:
            f = line.split()
            out[f[9]] = f"tcp:port {int(f[2].split(':')[1], 16)}"
    return out


def fd_targets(pid: int) -> list[str]:
    """What the process's descriptors point at (sockets resolved to their kind and peer)."""
    socks, out = _sockets(), []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", t)
        out.append(f"socket {socks.get(m.group(1), '?')}" if m else re.sub(r"\[\d+\]", "[]", t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--attack-every", type=int, default=10, help="every k-th trajectory runs an attack")
    ap.add_argument("--burst", type=int, default=256, help="trajectories opening at once (0: skip)")
    ap.add_argument("--backend", default="docker")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/soak.json"))
    args = ap.parse_args()

    from PIL import Image

    workdir = tempfile.mkdtemp(prefix="pyvision-soak-")
    image = os.path.join(workdir, "clue.png")
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))
    img.save(image)
    os.chmod(workdir, 0o755)
    pool_tmp = os.path.join(workdir, "pool-tmp")  # the pool's TMPDIR: its task directories land here
    os.makedirs(pool_tmp)

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TMPDIR": pool_tmp}})
    cgroups_before = orphan_cgroups()
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "args": vars(args)}
    phases = (
        [("soak", args.trajectories, args.concurrency, args.attack_every, NORMAL[:])]
        if args.trajectories
        else []
    )
    if args.burst:
        phases.append(("burst", args.burst, args.burst, 0, [NORMAL[0]] * 3))
    for name, n, conc, attack_every, cells in phases:
        cfg = SandboxConfig(backend=args.backend, reuse_kernels=True, max_kernels=conc, warm_kernels=8,
                            timeout_s=10.0, memory_mb=512, pids=64, tmpfs_mb=16, max_stdout_bytes=2048,
                            max_images_per_exec=4, max_image_pixels=1_000_000)  # fmt: skip
        pool = SandboxPool.remote(cfg)
        pid = ray.get(pool.__ray_call__.remote(lambda self: os.getpid()))
        proc = psutil.Process(pid)
        # Warm-up (not counted): the pool grows to its working size, Ray's and docker's clients connect.
        # The burst phase warms up only as many as the pool keeps warm: the burst itself must grow it.
        warm = min(conc, 64 if name == "soak" else cfg.warm_kernels)
        asyncio.run(run_phase(pool, warm, warm, image, 0, NORMAL[:1], pid, f"{name}-warm"))
        fds0, rss0, targets0 = proc.num_fds(), proc.memory_info().rss / 2**20, fd_targets(pid)
        print(f"{name}: {n} trajectories, {conc} concurrent (pool pid {pid}, {fds0} fds, {rss0:.0f} MB)")
        res = asyncio.run(run_phase(pool, n, conc, image, attack_every, cells, pid, name))
        rss1 = proc.memory_info().rss / 2**20
        ray.get(pool.shutdown.remote())
        fds1, targets1 = proc.num_fds(), fd_targets(pid)
        for t in targets0:  # what the pool process holds now and did not after warm-up
            if t in targets1:
                targets1.remove(t)
        time.sleep(2.0)
        res.update(
            leaked_containers=len(docker_ids("--filter", f"label=pyvision.sandbox.owner={pid}")),
            leaked_processes=len(orphan_processes(pid)),
            leaked_fds=fds1 - fds0,
            new_fd_kinds=sorted(set(targets1)),
            leaked_temp_dirs=len(os.listdir(pool_tmp)),
            leaked_cgroups=len(orphan_cgroups() - cgroups_before),
            rss_start_mb=rss0,
            rss_end_mb=rss1,
        )
        ray.kill(pool)
        out[name] = res
        print(
            json.dumps(
                {k: v for k, v in res.items() if k not in ("rss_samples_mb", "pool_metrics")}, indent=1
            )
        )
    ray.shutdown()
    soak = out.get("soak") or out["burst"]
    out.update({k: soak[k] for k in ("trajectories", "lost_trajectories", "leaked_containers", "leaked_processes",
                                     "leaked_fds", "leaked_temp_dirs", "leaked_cgroups", "rss_start_mb",
                                     "rss_end_mb", "wall_s")})  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    bad = [p for p in ("soak", "burst") if p in out and (out[p]["lost_trajectories"] or out[p]["leaked_containers"]
           or out[p]["leaked_processes"] or out[p]["leaked_temp_dirs"] or out[p]["leaked_cgroups"])]  # fmt: skip
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
