"""Sandbox latency and throughput, both backends side by side, against a fresh `python -c` per cell.

Measures: p50/p99 of `print(1)` in a warm kernel; of a PyVision-style cell (crop image_clue_0, plt.show);
of a kernel start from the warm pool (open with the task image); and cells/s with 32 concurrent kernels.
Then, per backend and per mode (a fresh box per trajectory vs sandbox.reuse_kernels=true): kernel start
p50 from the pool, close p50, the CPU cost per trajectory, and trajectories/s for an "open, 1 image cell,
close" loop with 32 concurrent trajectories. CPU is counted where it is spent: the boxes' own CPU (a
cpuacct cgroup around this process for the process backend; Docker's cgroup parent for containers), the
Docker engine's daemons (dockerd, containerd), this process (the client side), and the whole host from
/proc/stat (includes everything else running on the machine, so it is only an upper bound).
Prints tables, checks the targets and writes benchmarks/results/sandbox.json.

    python benchmarks/sandbox.py [--backends process,docker] [--n 200] [--concurrency 32] [--trajectories 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox import make_sandbox
from pyvision_rl.sandbox.base import SandboxError

IMAGE_CELL = (
    "w, h = image_clue_0.size\ncrop = image_clue_0.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))\n"
    "plt.figure(figsize=(3, 3))\nplt.imshow(crop)\nplt.axis('off')\nplt.show()\nprint(crop.size)\n"
)
TARGETS = {"docker": {"print_p50_ms": 5.0, "image_cell_p50_ms": 100.0, "open_p50_ms": 50.0}}
TARGETS["process"] = {"image_cell_p50_ms": 100.0, "open_p50_ms": 50.0}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def summary(xs: list[float]) -> dict:
    return {"p50_ms": 1000 * pct(xs, 50), "p99_ms": 1000 * pct(xs, 99), "n": len(xs)}


def make_image(d: str) -> str:
    from PIL import Image

    p = os.path.join(d, "bench.png")
    Image.effect_noise((640, 480), 64).convert("RGB").save(p)
    return p


def bench_backend(backend: str, image: str, n: int, concurrency: int) -> dict:
    cfg = SandboxConfig(backend=backend, warm_kernels=4, max_kernels=concurrency, timeout_s=30)
    out: dict = {}
    with make_sandbox(cfg) as sb:
        sb.pool.wait_full(120)
        with sb.open([image]) as k:
            k.execute("print(1)")
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                r = k.execute("print(1)")
                lat.append(time.perf_counter() - t)
                assert r.stdout == "1\n"
            out["print"] = summary(lat)
            lat = []
            for _ in range(max(20, n // 4)):
                t = time.perf_counter()
                r = k.execute(IMAGE_CELL)
                lat.append(time.perf_counter() - t)
                assert r.ok and len(r.images) == 1, r
            out["image_cell"] = summary(lat)
        lat = []
        for _ in range(20):
            sb.pool.wait_full(120)  # measure the warm path: a ready box is waiting
            t = time.perf_counter()
            k = sb.open([image])
            lat.append(time.perf_counter() - t)
            k.close()
        out["open"] = summary(lat)
    # Throughput: `concurrency` live kernels, one thread each, image cells back to back.
    cfg = SandboxConfig(backend=backend, warm_kernels=concurrency, max_kernels=concurrency, timeout_s=60)
    with make_sandbox(cfg) as sb:
        sb.pool.wait_full(300)
        kernels = [sb.open([image]) for _ in range(concurrency)]
        per = max(3, n // 20)
        errors = []

        def work(k):
            for _ in range(per):
                r = k.execute(IMAGE_CELL)
                if not r.ok:
                    errors.append(r.error)

        threads = [threading.Thread(target=work, args=(k,)) for k in kernels]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        for k in kernels:
            k.close()
        out["throughput"] = {
            "cells_per_s": concurrency * per / dt,
            "kernels": concurrency,
            "errors": len(errors),
        }
    return out


# ------------------------------------------------------------------------------------------ CPU accounting
_CG_ROOT = "/sys/fs/cgroup/cpuacct"


class CpuMeter:
    """CPU-seconds spent by the boxes, the engine, this process and the host between `start` and `stop`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.cg = None
        if backend == "process" and os.path.isdir(_CG_ROOT) and os.geteuid() == 0:
            # A cpuacct group around this process: bwrap boxes are its children and stay in it, and the
            # group keeps their CPU after they are killed (rusage is lost when a pid namespace dies).
            cg = os.path.join(_CG_ROOT, f"pyvision-bench-{os.getpid()}")
            try:
                os.makedirs(cg, exist_ok=True)
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                self.cg = cg
            except OSError:
                self.cg = None
        elif backend == "docker" and os.path.exists(os.path.join(_CG_ROOT, "docker", "cpuacct.usage")):
            self.cg = os.path.join(_CG_ROOT, "docker")  # containers' parent: keeps removed ones' CPU

    def _read(self) -> dict:
        out = {"self": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        out["host"] = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        if self.cg:
            with open(os.path.join(self.cg, "cpuacct.usage")) as f:
                out["cgroup"] = int(f.read()) / 1e9
        if self.backend == "docker":
            tot = 0.0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        st = f.read()
                except OSError:
                    continue
                comm = st[st.index("(") + 1 : st.rindex(")")]
                if comm in ("dockerd", "containerd"):
                    fields = st[st.rindex(")") + 2 :].split()
                    tot += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            out["engine"] = tot
        return out

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> dict:
        t1 = self._read()
        d = {k: t1[k] - self._t0[k] for k in t1 if k in self._t0}
        if self.backend == "process" and "cgroup" in d:
            d["boxes"] = d.pop("cgroup") - d["self"]  # the group holds this process too
        elif "cgroup" in d:
            d["boxes"] = d.pop("cgroup")
        return d

    def close(self) -> None:
        if self.cg and self.backend == "process":
            try:  # move back to the root group, then remove ours
                with open(os.path.join(_CG_ROOT, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                os.rmdir(self.cg)
            except OSError:
                pass


def bench_mode(backend: str, reuse: bool, image: str, trajectories: int, concurrency: int, cell: str) -> dict:
    """One backend in one mode: start/close latency from the pool, then a loop of `trajectories`
    trajectories (open with the image, one image cell, close), `concurrency` at a time, with CPU counted."""
    cfg = SandboxConfig(backend=backend, warm_kernels=8, max_kernels=concurrency, timeout_s=60,
                        reuse_kernels=reuse)  # fmt: skip
    out: dict = {}
    meter = CpuMeter(backend)  # before the sandbox starts, so that every box lands in the group
    try:
        with make_sandbox(cfg) as sb:
            sb.pool.wait_full(300)
            lat, close_lat = [], []
            for _ in range(20):
                sb.pool.wait_full(120)  # measure the warm path: a ready box is waiting
                t = time.perf_counter()
                k = sb.open([image])
                lat.append(time.perf_counter() - t)
                assert k.execute("print(1)").stdout == "1\n"
                t = time.perf_counter()
                k.close()
                close_lat.append(time.perf_counter() - t)
            out["open"] = summary(lat)
            out["close"] = summary(close_lat)
            sb.pool.wait_full(120)
            time.sleep(1.0)  # let background removals of the latency phase finish outside the window
            errors: list[str] = []
            todo: list[int] = []
            lock = threading.Lock()

            def work() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        todo.pop()
                    k = sb.open([image])
                    r = k.execute(IMAGE_CELL if cell == "image" else "print(1 + 1)")
                    if not (r.ok and len(r.images) == (1 if cell == "image" else 0)):
                        errors.append(str(r.error))
                    k.close()

            # Warm-up round (not counted): with reuse the pool grows once to its steady size (live +
            # warm boxes), which a long run amortises; without reuse this changes nothing.
            todo = list(range(concurrency))
            warm = [threading.Thread(target=work) for _ in range(concurrency)]
            for th in warm:
                th.start()
            for th in warm:
                th.join()
            sb.pool.wait_full(300)
            time.sleep(1.0)
            todo = list(range(trajectories))
            errors.clear()
            started0 = sb.pool.started
            meter.start()
            threads = [threading.Thread(target=work) for _ in range(concurrency)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            dt = time.perf_counter() - t
            # The pool tops itself up after the loop: that start-up work belongs to these trajectories.
            sb.pool.wait_full(300)
            time.sleep(1.0)
            cpu = meter.stop()
            out["loop"] = {
                "trajectories": trajectories,
                "concurrency": concurrency,
                "wall_s": dt,
                "trajectories_per_s": trajectories / dt,
                "errors": len(errors),
                "cpu_s": cpu,
                "cpu_ms_per_trajectory": {k: 1000 * v / trajectories for k, v in cpu.items()},
                "boxes_started": sb.pool.started - started0,
                "boxes_recycled": getattr(sb, "recycled", 0),
                "boxes_unhealthy": sb.pool.replaced,
            }
    finally:
        meter.close()
    return out


def bench_baseline(image: str, n: int) -> dict:
    """A fresh `python -c` per cell (what a non-persistent tool runner pays)."""
    lat = []
    for _ in range(max(5, n // 20)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "print(1)"], check=True, capture_output=True)
        lat.append(time.perf_counter() - t)
    img_code = (
        "import io, numpy as np, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
        f"from PIL import Image; image_clue_0 = Image.open({image!r})\n"
        + IMAGE_CELL.replace("plt.show()", "plt.savefig(io.BytesIO())")
    )
    lat2 = []
    for _ in range(max(5, n // 40)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", img_code], check=True, capture_output=True)
        lat2.append(time.perf_counter() - t)
    return {"print": summary(lat), "image_cell": summary(lat2)}


def print_modes(modes: dict) -> None:
    names = list(modes)
    print(f"{'per mode (open, 1 cell, close)':40s}" + "".join(f"{n:>18s}" for n in names))

    def row(label: str, get) -> None:
        cells = []
        for n in names:
            try:
                cells.append(get(modes[n]))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"{label:40s}" + "".join(f"{c:>18s}" for c in cells))

    row(
        "kernel start from pool p50 / p99 ms",
        lambda m: f"{m['open']['p50_ms']:.1f} / {m['open']['p99_ms']:.1f}",
    )
    row("close p50 ms", lambda m: f"{m['close']['p50_ms']:.1f}")
    row("trajectories/s (32 concurrent)", lambda m: f"{m['loop']['trajectories_per_s']:.1f}")
    for key, label in (("boxes", "box CPU ms / trajectory"), ("engine", "engine CPU ms / trajectory"),
                       ("self", "client CPU ms / trajectory"), ("host", "host CPU ms / traj (upper bd)")):  # fmt: skip
        row(label, lambda m, key=key: f"{m['loop']['cpu_ms_per_trajectory'][key]:.0f}")
    row("boxes started in the loop", lambda m: str(m["loop"]["boxes_started"]))
    row("errors", lambda m: str(m["loop"]["errors"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="process,docker")
    ap.add_argument("--n", type=int, default=200, help="print(1) samples (image cells: n/4)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--trajectories", type=int, default=96, help="trajectories per mode in the open/cell/close loop"
    )
    ap.add_argument("--cell", choices=["image", "print"], default="image", help="the loop's one cell")
    ap.add_argument("--skip-latency", action="store_true", help="only the per-mode table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sandbox.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "backends": {}}
    with tempfile.TemporaryDirectory() as d:
        image = make_image(d)
        results["modes"] = {}
        for b in args.backends.split(","):
            for reuse in (False, True):
                name = f"{b} {'reuse' if reuse else 'fresh'}"
                try:
                    results["modes"][name] = bench_mode(
                        b, reuse, image, args.trajectories, args.concurrency, args.cell
                    )
                except SandboxError as e:
                    results["modes"][name] = {"skipped": str(e)}
        if not args.skip_latency:
            for b in args.backends.split(","):
                try:
                    results["backends"][b] = bench_backend(b, image, args.n, args.concurrency)
                except SandboxError as e:
                    results["backends"][b] = {"skipped": str(e)}
            results["backends"]["python -c"] = bench_baseline(image, args.n)
    results["modes_cell"] = args.cell
    print_modes(results["modes"])
    rows = [("print(1) p50 / p99 ms", "print"), ("image cell p50 / p99 ms", "image_cell"),
            ("kernel start (warm pool) p50 / p99 ms", "open")]  # fmt: skip
    names = list(results["backends"])
    print(f"{'':40s}" + "".join(f"{n:>22s}" for n in names))
    for label, key in rows:
        cells = []
        for n in names:
            v = results["backends"][n].get(key)
            cells.append(f"{v['p50_ms']:9.2f} / {v['p99_ms']:8.2f}" if v else "-")
        print(f"{label:40s}" + "".join(f"{c:>22s}" for c in cells))
    cells = []
    for n in names:
        v = results["backends"][n].get("throughput")
        cells.append(f"{v['cells_per_s']:.1f} ({v['kernels']} kernels)" if v else "-")
    print(f"{'image cells/s, concurrent kernels':40s}" + "".join(f"{c:>22s}" for c in cells))
    ok = True
    checks = []
    for b, targets in TARGETS.items():
        res = results["backends"].get(b, {})
        for key, limit in targets.items():
            metric = key.rsplit("_p50_ms", 1)[0]
            got = res.get(metric, {}).get("p50_ms")
            if got is None:
                continue
            passed = got <= limit
            ok &= passed
            checks.append({"backend": b, "metric": key, "value": got, "target": limit, "pass": passed})
            print(f"target {b:8s} {key:20s} {got:8.2f} <= {limit:6.1f}  {'PASS' if passed else 'FAIL'}")
    results["targets"] = checks
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
