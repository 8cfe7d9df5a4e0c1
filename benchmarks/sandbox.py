"""Sandbox latency and throughput, both backends side by side, against a fresh `python -c` per cell.

Measures: p50/p99 of `print(1)` in a warm kernel; of a PyVision-style cell (crop image_clue_0, plt.show);
of a kernel start from the warm pool (open with the task image); and cells/s with 32 concurrent kernels.
Prints a table, checks the targets and writes benchmarks/results/sandbox.json.

    python benchmarks/sandbox.py [--backends process,docker] [--n 200] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

from pyvision_rl.config import SandboxConfig
from pyvision_rl.sandbox.base import SandboxError, make_sandbox

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="process,docker")
    ap.add_argument("--n", type=int, default=200, help="print(1) samples (image cells: n/4)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sandbox.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "backends": {}}
    with tempfile.TemporaryDirectory() as d:
        image = make_image(d)
        for b in args.backends.split(","):
            try:
                results["backends"][b] = bench_backend(b, image, args.n, args.concurrency)
            except SandboxError as e:
                results["backends"][b] = {"skipped": str(e)}
        results["backends"]["python -c"] = bench_baseline(image, args.n)
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
